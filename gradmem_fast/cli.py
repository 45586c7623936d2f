"""Command line: ``gradmem-fast demo`` (``python -m gradmem_fast demo``)."""
import sys

COMMANDS = {"demo": "gradmem_fast.demo"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: gradmem-fast {" + ",".join(COMMANDS) + "} [options]", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"gradmem-fast: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
