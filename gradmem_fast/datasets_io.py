"""Documents from any Hugging Face ``datasets`` source, for ``write`` and ``capacity``.

Sources (one of ``--input PATH`` or ``--dataset NAME``):

- ``--input FILE.jsonl`` (or any other name): our JSON-lines reader (``fileio.read_jsonl``), whose errors
  name the line; ``--input-format datasets`` reads a ``.json``/``.jsonl`` file with ``datasets`` instead.
- ``--input DIR``: a folder written by ``Dataset.save_to_disk`` (memory-mapped Arrow: rows are read from
  disk as they are needed); a ``DatasetDict`` folder needs ``--split``.
- ``--input FILE.parquet | .csv | .arrow`` (or ``.json``/``.jsonl`` with ``--input-format datasets``):
  streamed with ``load_dataset(builder, data_files=..., streaming=True)``, row by row.
- ``--dataset NAME [--config C] [--split S]``: a Hugging Face Hub dataset, streamed; without network it
  fails with an error that says so and names the local forms.

``--offset`` skips that many rows (0-based) and ``--limit`` keeps at most that many after them; only those
rows are read. Every record carries its 1-based row number in ``Record.line`` (for JSON lines: the line
number), which the commands print after the source's name, as they print line numbers. Missing ids default
to the 0-based row number (the line number minus one for JSON lines), as before.

Streaming ends at the reader: the commands then keep the selected documents' texts and token ids (the
memories themselves are streamed to the output by ``write``), so a set too large for memory is written in
pieces with ``--offset``/``--limit``.

Why ``datasets`` is an extra (``pip install gradmem-fast[data]``) and not an install requirement: it brings
pyarrow, pandas, multiprocess and dill (about 150 MB) that the Python API and the JSON-lines commands never
use; it is imported only when a source needs it, and its absence is an error that names the extra.
"""

import itertools
import json
import os
from collections.abc import Iterator

from .errors import UserError
from .fileio import Record, _valid_id, read_jsonl

# File suffix -> datasets builder (streamed).
BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}
INPUT_FORMATS = ("auto", "jsonl", "datasets")


def add_source_arguments(p, what: str = "document") -> None:
    """The source options shared by ``write`` and ``capacity`` (``--text-field``/``--id-field`` are the
    commands' own)."""
    p.add_argument(
        "--input",
        default=None,
        help=f"JSON lines (one {what} per line), a folder saved with Dataset.save_to_disk, or a "
        ".parquet/.csv/.arrow file (.json/.jsonl with --input-format datasets); or use --dataset",
    )
    p.add_argument("--dataset", default=None, help="a Hugging Face Hub dataset name, streamed (needs network)")
    p.add_argument("--config", dest="dataset_config", default=None, help="with --dataset: its configuration name")
    p.add_argument(
        "--split",
        default=None,
        help="the split to read (--dataset: default train; a DatasetDict folder: required)",
    )
    p.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default="auto",
        help="auto (a folder or .parquet/.csv/.arrow: datasets; anything else: our JSON-lines reader, "
        "whose errors name the line), jsonl, or datasets",
    )
    p.add_argument("--offset", type=int, default=0, help=f"skip this many {what}s (rows) first (default 0)")
    p.add_argument("--limit", type=int, default=None, help=f"read at most this many {what}s (default: all)")


def source_name(args) -> str:
    """The source as messages name it."""
    return args.input if args.input is not None else f"--dataset {args.dataset}"


def check_source_arguments(args) -> None:
    """Exactly one source; offsets and limits in range (every message names its flag)."""
    if (args.input is None) == (args.dataset is None):
        raise UserError("give exactly one source: --input PATH or --dataset NAME")
    if args.dataset is None and (args.dataset_config is not None):
        raise UserError("--config names a configuration of a --dataset (a Hub dataset); leave it out with --input")
    if args.offset is None or args.offset < 0:
        raise UserError(f"--offset must be >= 0, got {args.offset}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.input is not None and not os.path.exists(args.input):
        raise UserError(f"input {args.input!r} does not exist")


def uses_datasets(args) -> bool:
    """Whether the source is read with ``datasets`` (else with our JSON-lines reader)."""
    if args.dataset is not None or args.input_format == "datasets":
        return True
    if args.input_format == "jsonl":
        return False
    suffix = os.path.splitext(args.input)[1].lower()
    return os.path.isdir(args.input) or suffix in (".parquet", ".csv", ".arrow")


def read_records(args, what: str = "input") -> list[Record]:
    """The selected records of the command's source (``--offset``/``--limit`` applied), in order."""
    check_source_arguments(args)
    if not uses_datasets(args):
        records = read_jsonl(args.input, args.text_field, args.id_field, what=what)
        if args.offset >= len(records):
            raise UserError(f"--offset {args.offset} is past the end of {args.input} ({len(records)} record(s))")
        end = None if args.limit is None else args.offset + args.limit
        return records[args.offset : end]
    rows = _open_rows(args)
    source = source_name(args)
    if hasattr(rows, "__len__"):  # a memory-mapped Dataset: select the rows instead of reading past them
        if args.offset >= len(rows):
            raise UserError(f"--offset {args.offset} is past the end of {source} ({len(rows)} row(s))")
        end = len(rows) if args.limit is None else min(len(rows), args.offset + args.limit)
        rows, skip = rows.select(range(args.offset, end)), 0
    else:
        skip = args.offset
    try:
        selected = itertools.islice(rows, skip, None if args.limit is None else skip + args.limit)
        records = list(iter_records(selected, source, args.text_field, args.id_field, args.offset))
    except UserError:
        raise
    except (ValueError, OSError, KeyError) as exc:  # a malformed file shows while it streams
        raise UserError(f"cannot read {source} ({type(exc).__name__}: {exc})") from None
    if not records:
        raise UserError(f"--offset {args.offset} is past the end of {source_name(args)} (no row left to read)")
    return records


def iter_records(rows, source: str, text_field: str, id_field: str, start: int = 0) -> Iterator[Record]:
    """Records of an iterable of dict rows (read one at a time) whose first row is row ``start`` of the
    source. A missing column is an error naming the flag; a wrong value names the row."""
    seen: dict = {}
    for index, row in enumerate(rows, start=start):
        if text_field not in row:
            raise UserError(f"{source}: no column {text_field!r} (--text-field); its columns are {sorted(row)}")
        text = row[text_field]
        if not isinstance(text, str):
            raise UserError(f"{source}:{index + 1}: column {text_field!r} must hold strings, got {type(text).__name__}")
        if id_field in row:
            doc_id = row[id_field]
            if not _valid_id(doc_id):
                raise UserError(
                    f"{source}:{index + 1}: column {id_field!r} (--id-field) must hold integers or strings, "
                    f"got {json.dumps(doc_id, default=str)}"
                )
        else:
            doc_id = index
        if doc_id in seen:
            raise UserError(f"{source}:{index + 1}: id {json.dumps(doc_id)} was already used on row {seen[doc_id]}")
        seen[doc_id] = index + 1
        yield Record(index + 1, doc_id, text)


def _quiet(datasets) -> None:
    datasets.utils.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError(
            "reading this source needs the `datasets` library: pip install datasets (or gradmem-fast[data])"
        ) from None
    _quiet(datasets)
    return datasets


def _open_rows(args):
    """An iterable of dict rows of the source: memory-mapped (a saved folder) or streamed (files, Hub)."""
    datasets = _import_datasets()
    if args.dataset is not None:
        split = args.split or "train"
        try:
            return datasets.load_dataset(args.dataset, args.dataset_config, split=split, streaming=True)
        except (ConnectionError, OSError) as exc:
            raise UserError(
                f"--dataset {args.dataset!r}: cannot load it from the Hugging Face Hub ({exc}); without network, "
                "save it elsewhere and pass the folder or its files with --input"
            ) from None
        except ValueError as exc:  # an unknown split or configuration
            raise UserError(f"--dataset {args.dataset!r}: {exc}") from None
    path = args.input
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise UserError(f"--input {path!r} is a folder but not one written by save_to_disk ({exc})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if args.split is None or args.split not in loaded:
                raise UserError(
                    f"--input {path!r} holds several splits {sorted(loaded)}: pick one with --split"
                    + ("" if args.split is None else f" (not {args.split!r})")
                )
            loaded = loaded[args.split]
        elif args.split is not None:
            raise UserError(f"--split: {path!r} holds a single dataset, not splits; leave --split out")
        return loaded
    suffix = os.path.splitext(path)[1].lower()
    builder = BUILDERS.get(suffix)
    if builder is None:
        raise UserError(
            f"--input {path!r}: --input-format datasets reads {', '.join(sorted(BUILDERS))} files or a "
            "save_to_disk folder"
        )
    if args.split is not None:
        raise UserError(f"--split: a single file {path!r} has no splits; leave --split out")
    try:
        return datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train", streaming=True)
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read --input {path!r} as {builder} ({exc})") from None
