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

- ``stage`` also has ``kind`` (grow, bisect or linear) and ``proven`` (the longest prefix proven after that
  stage: the capacity so far).

TensorBoard (``--log-format``): beside the JSON lines, event files in ``DIR/<command>`` (rank r > 0:
``DIR/<command>.rank{r}``), one run per command for ``tensorboard --logdir DIR``, written through
``torch.utils.tensorboard.SummaryWriter`` from the same records, so the two logs hold the same numbers:

- ``check``: ``loss/<id>``, ``accuracy/<id>``, ``exact/<id>`` (0 or 1), ``prefix/<id>`` at step ``step``;
- ``step``: ``loss/<id>`` at step ``step``;
- ``stage``: ``target/<id>``, ``steps/<id>``, ``exact/<id>``, ``prefix/<id>``, ``proven/<id>`` (the
  capacity curve) at step ``stage``.

``auto`` (default) adds the event files when the optional ``tensorboard`` package is installed and says in
one line that it is not otherwise; ``jsonl`` writes the JSON lines only; ``tensorboard`` requires the package
(a clear error before any work when it is missing). Event files are flushed every 10 seconds and at the end
(a killed run may lose its last seconds there; the JSON lines keep everything).

Why JSON lines always: readable with any tool (``pandas.read_json(path, lines=True)``) and no dependency.
"""

import importlib.util
import json
import os
import sys
import time

from .errors import UserError

LOG_FORMATS = ("auto", "jsonl", "tensorboard")
# event -> (the field that is the TensorBoard step, the fields written as scalars ``<field>/<id>``)
SCALARS = {
    "check": ("step", ("loss", "accuracy", "exact", "prefix")),
    "step": ("step", ("loss",)),
    "stage": ("stage", ("target", "steps", "exact", "prefix", "proven")),
}
FLUSH_SECONDS = 10


class RunLog:
    """An open log file; ``record(event, **fields)`` appends one line (and, with ``events_dir``, writes the
    event's scalars to TensorBoard event files there). A ``RunLog(None)`` records nothing."""

    def __init__(self, path: str | None, command: str = "", options: dict | None = None, events_dir: str | None = None):
        self.path = path
        self.events_dir = events_dir
        self._fh = None
        self._tb = None
        self._start = time.time()
        if path is None:
            return
        try:
            self._fh = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot open the log file {path!r}: {exc.strerror or exc}") from None
        if events_dir is not None:
            writer_class = _summary_writer_class()
            if writer_class is None:
                raise UserError("TensorBoard event files need the tensorboard package (pip install tensorboard)")
            self._tb = writer_class(log_dir=events_dir, flush_secs=FLUSH_SECONDS)
        self.record("start", command=command, options=options or {})

    def record(self, event: str, **fields) -> None:
        if self._fh is None:
            return
        line = {"event": event, "time": round(time.time(), 3), **fields}
        self._fh.write(json.dumps(line, ensure_ascii=False, default=_plain) + "\n")
        self._fh.flush()
        if self._tb is not None and event in SCALARS:
            step_field, names = SCALARS[event]
            step, key = int(fields[step_field]), fields["id"]
            for name in names:
                if name in fields:
                    value = fields[name]
                    value = value.item() if hasattr(value, "item") else value  # a tensor or numpy number
                    self._tb.add_scalar(f"{name}/{key}", float(value), global_step=step)

    def close(self) -> None:
        if self._fh is not None:
            self.record("end", seconds=round(time.time() - self._start, 3))
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(value):
    """Numbers from tensors or numpy as plain JSON numbers; anything else as its text."""
    item = getattr(value, "item", None)
    return item() if item is not None else str(value)


def _summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or None when tensorboard is not importable."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def tensorboard_installed() -> bool:
    """Whether the tensorboard package is there (without importing it: that takes seconds)."""
    return importlib.util.find_spec("tensorboard") is not None


def check_logdir(logdir: str | None, log_format: str = "auto") -> None:
    """``--logdir``: an existing folder, or a new one whose parent exists (created by ``open_log``);
    ``--log-format``: one of ``LOG_FORMATS``, tensorboard only when the package is installed."""
    if log_format not in LOG_FORMATS:
        raise UserError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    if logdir is None:
        if log_format != "auto":
            raise UserError(f"--log-format {log_format} needs --logdir")
        return
    if log_format == "tensorboard" and not tensorboard_installed():
        raise UserError(
            "--log-format tensorboard needs the tensorboard package, which is not installed "
            "(pip install 'gradmem-fast[tensorboard]' or pip install tensorboard)"
        )
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise UserError(f"--logdir {logdir!r} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(logdir))
    if not os.path.isdir(parent):
        raise UserError(f"--logdir {logdir!r}: its parent directory {parent!r} does not exist")


def open_log(
    logdir: str | None, command: str, options: dict | None = None, rank: int = 0, log_format: str | None = None
) -> RunLog:
    """The run's log in ``logdir`` (``RunLog(None)`` without one). ``log_format``: see the module docstring
    (None: ``options["log_format"]``, else auto)."""
    if logdir is None:
        return RunLog(None)
    if log_format is None:
        log_format = (options or {}).get("log_format") or "auto"
    check_logdir(logdir, log_format)
    os.makedirs(logdir, exist_ok=True)
    base = command if rank == 0 else f"{command}.rank{rank}"
    events_dir = None
    if log_format != "jsonl":
        if _summary_writer_class() is not None:
            events_dir = os.path.join(logdir, base)
        elif log_format == "tensorboard":  # installed (check_logdir) but not importable
            raise UserError("--log-format tensorboard: torch.utils.tensorboard cannot be imported")
        elif rank == 0:
            print(
                f"gradmem-fast {command}: note: tensorboard is not installed; --logdir gets the JSON-lines log "
                "only (pip install tensorboard for event files)",
                file=sys.stderr,
                flush=True,
            )
    return RunLog(os.path.join(logdir, f"{base}.jsonl"), command, options, events_dir)


def add_argument(p) -> None:
    """``--logdir`` and ``--log-format`` of ``write`` and ``capacity``."""
    p.add_argument(
        "--logdir",
        default=None,
        help="append a JSON-lines log of the run to DIR/<command>.jsonl: per-document loss, accuracy and "
        "exactness at each check (write), per-stage records (capacity); TensorBoard event files in DIR/<command> "
        "with --log-format",
    )
    p.add_argument(
        "--log-format",
        choices=list(LOG_FORMATS),
        default="auto",
        help="auto (default): JSON lines, plus TensorBoard event files when tensorboard is installed; jsonl: "
        "JSON lines only; tensorboard: both, an error if tensorboard is missing",
    )
