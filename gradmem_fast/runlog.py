"""``--logdir``: a JSON-lines log of a run (``write`` and ``capacity``), one object per line, appended.

Files: ``DIR/write.jsonl`` (rank r > 0 of a torchrun write: ``DIR/write.rank{r}.jsonl``) and
``DIR/capacity.jsonl``. A file is only ever appended to (a rerun adds a new ``start`` record; nothing is
overwritten), and every line is flushed when written, so a killed run keeps what it logged. Every record has
``event`` and ``time`` (Unix seconds). Events:

- ``start``: ``command`` and ``options`` (the parsed command-line options of the run).
- ``check`` (``write`` with a stop rule): one per document per check of the rule, ``id``, ``step`` (updates
  taken when the check's forward ran), ``loss`` (mean over the scored tokens), ``accuracy`` (teacher-forced),
  ``exact`` (greedy decoding reproduces the document), ``prefix`` (tokens it reproduces).
- ``step`` (``write --stop none``, no checks): one per document per step, ``id``, ``step`` (0-based),
  ``loss`` (before that step's update).
- ``stage`` (``capacity``): one per text per stage, ``id``, ``stage``, ``target``, ``steps``, ``exact``,
  ``prefix``, ``seconds`` (the stage's wall time, shared by its texts).
- ``end``: ``seconds`` since ``start``.

Why JSON lines and not TensorBoard event files: readable with any tool (``pandas.read_json(path,
lines=True)``) and no dependency; TensorBoard output is left for a later change (issue 25 item 7).
"""

import json
import os
import time

from .errors import UserError


class RunLog:
    """An open log file; ``record(event, **fields)`` appends one line. A ``RunLog(None)`` records nothing."""

    def __init__(self, path: str | None, command: str = "", options: dict | None = None):
        self.path = path
        self._fh = None
        self._start = time.time()
        if path is None:
            return
        try:
            self._fh = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot open the log file {path!r}: {exc.strerror or exc}") from None
        self.record("start", command=command, options=options or {})

    def record(self, event: str, **fields) -> None:
        if self._fh is None:
            return
        line = {"event": event, "time": round(time.time(), 3), **fields}
        self._fh.write(json.dumps(line, ensure_ascii=False, default=_plain) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self.record("end", seconds=round(time.time() - self._start, 3))
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(value):
    """Numbers from tensors or numpy as plain JSON numbers; anything else as its text."""
    item = getattr(value, "item", None)
    return item() if item is not None else str(value)


def check_logdir(logdir: str | None) -> None:
    """``--logdir``: an existing folder, or a new one whose parent exists (created by ``open_log``)."""
    if logdir is None:
        return
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise UserError(f"--logdir {logdir!r} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(logdir))
    if not os.path.isdir(parent):
        raise UserError(f"--logdir {logdir!r}: its parent directory {parent!r} does not exist")


def open_log(logdir: str | None, command: str, options: dict | None = None, rank: int = 0) -> RunLog:
    """The run's log in ``logdir`` (``RunLog(None)`` without one)."""
    if logdir is None:
        return RunLog(None)
    check_logdir(logdir)
    os.makedirs(logdir, exist_ok=True)
    name = f"{command}.jsonl" if rank == 0 else f"{command}.rank{rank}.jsonl"
    return RunLog(os.path.join(logdir, name), command, options)


def add_argument(p) -> None:
    """``--logdir`` of ``write`` and ``capacity``."""
    p.add_argument(
        "--logdir",
        default=None,
        help="append a JSON-lines log of the run to DIR/<command>.jsonl: per-document loss, accuracy and "
        "exactness at each check (write), per-stage records (capacity)",
    )
