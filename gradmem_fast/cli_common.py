"""Helpers shared by the command-line commands (``cli``, ``capacity``): messages, versions, option checks.

A module of its own so that a command module can use them without importing ``cli`` (which imports every
command: that would be an import cycle).
"""

import sys

from .errors import UserError
from .models import check_device

PROG = "gradmem-fast"


def warn(command, message):
    """Print a warning line on stderr (the command goes on)."""
    print(f"{PROG} {command}: warning: {message}", file=sys.stderr, flush=True)


def note(command, message):
    """Print an informational line on stderr."""
    print(f"{PROG} {command}: {message}", file=sys.stderr, flush=True)


def versions() -> dict:
    """Versions of the libraries that shape the numbers, for the metadata of what a command writes."""
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {
        "gradmem_fast": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def positive_int(name, value, minimum=1):
    """Reject an integer option below ``minimum`` with a message naming the flag."""
    if value is None or value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")


def device_and_dtype(args, local_rank=0):
    """The resolved device string, after ``--device`` and ``--dtype`` are checked (nothing loaded)."""
    from .models import resolve_device, resolve_dtype

    check_device(args.device)
    device = resolve_device(args.device, local_rank)
    resolve_dtype(args.dtype, device)
    return device
