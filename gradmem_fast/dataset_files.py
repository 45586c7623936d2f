"""Outputs as Hugging Face ``Dataset`` folders (``--output-format dataset``), and reading them back.

A dataset output is a folder written by ``Dataset.save_to_disk`` plus ``gradmem_fast.json``, which holds the
metadata a safetensors memory file keeps in its header (the same keys: format, model, config, weights
signature, ...) and tells our folders apart from any other. ``load_from_disk(folder)`` opens it as an
ordinary dataset.

- ``write``: one row per document, in input order: ``id``, ``text``, ``token_ids`` (what was written, the
  end-of-text token included), ``memory`` ([m, d]) and the ``fileio.DOC_STATS`` columns (``exact`` as a
  bool). Ids are one column of int64 or of strings; a mix of both is stored as JSON strings (the
  metadata's ``ids_format`` says which, as in a memory file). ``gradmem-fast read --memories FOLDER``
  reads it like a memory file.
- ``capacity``: one row per stage of every text: ``id``, ``stage``, ``target``, ``steps``, ``converged``
  (the stage ended exact), ``prefix`` and ``memory`` (that stage's final memory); the whole JSON report
  (without memories) is in ``gradmem_fast.json``.

Rows are streamed into an Arrow file (the memories are never all in memory), which ``save_to_disk`` copies
into a temporary folder beside the output; the folder is renamed into place only when complete, so a
failing command leaves no partial output. An existing output is replaced (``--force``) only when it is one
of our folders.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Iterable

from .errors import UserError

MARKER = "gradmem_fast.json"
# Arrow has no bfloat16: such memories are stored widened to float32 (exact).
_ARROW_FLOAT = {"float64": "float64", "float32": "float32", "float16": "float16", "bfloat16": "float32"}


def is_dataset_folder(path: str) -> bool:
    """Whether ``path`` is a folder this module wrote."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MARKER))


def check_folder_output(path: str, inputs, force: bool, flag: str = "--output") -> None:
    """Refuse a dataset output that would destroy data: an input, anything that is not one of our folders,
    or one of our folders without ``force``."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"output directory {directory!r} does not exist")
    for in_flag, in_path in inputs:
        if in_path and os.path.exists(path) and os.path.exists(in_path) and os.path.samefile(path, in_path):
            raise UserError(f"{flag} {path!r} is the same as {in_flag} {in_path!r}; choose another output path")
    if os.path.lexists(path):
        if not is_dataset_folder(path):
            raise UserError(
                f"{flag} {path!r} exists and is not a gradmem-fast dataset folder: it is never replaced; "
                "choose another output path"
            )
        if not force:
            raise UserError(f"{flag} {path!r} already exists; pass --force to replace it")


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yield a temporary folder path beside ``path``; on success it replaces ``path``, on failure it is
    deleted (with ``path`` untouched)."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.tmp-{os.getpid()}")
    old = os.path.join(directory, f".{base}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if os.path.lexists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _id_column(ids):
    """(values, feature dtype, ids_format) of the ids: int64, strings, or JSON strings for a mix."""
    if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return list(ids), "int64", "int64"
    if all(isinstance(i, str) for i in ids):
        return list(ids), "string", "string"
    return [json.dumps(i) for i in ids], "string", "json"


def _save(path: str, features, rows: Iterable[dict], metadata: dict) -> None:
    """Stream ``rows`` into an Arrow file, save it as a dataset folder at ``path`` (atomically) with the
    metadata file."""
    from .datasets_io import _import_datasets

    datasets = _import_datasets()
    from datasets.arrow_writer import ArrowWriter

    with atomic_folder(path) as tmp:
        staging = tmp + ".rows"
        os.makedirs(staging)
        try:
            arrow = os.path.join(staging, "rows.arrow")
            with ArrowWriter(features=features, path=arrow) as writer:
                for row in rows:
                    writer.write(row)
                writer.finalize()
            datasets.Dataset.from_file(arrow).save_to_disk(tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as fh:
            json.dump(metadata, fh, sort_keys=True)


def write_memory_dataset(
    path: str, memory_chunks, shape, dtype, ids, texts, token_ids, stats: dict, metadata: dict
) -> None:
    """``write``'s dataset output: ``memory_chunks`` ([n_i, m, d] tensors of ``dtype`` in input order, ``shape``
    [N, m, d] in all), one id, text and token list per document, ``stats`` (name -> [N] tensor) and the
    memory file's ``metadata``."""
    import torch

    from .datasets_io import _import_datasets
    from .fileio import DOC_STATS

    datasets = _import_datasets()
    values, id_dtype, ids_format = _id_column(ids)
    columns = {name: stats[name].tolist() for name in DOC_STATS}

    def rows():
        index = 0
        for chunk in memory_chunks:
            if chunk.dtype != dtype or tuple(chunk.shape[1:]) != tuple(shape[1:]):
                raise ValueError(f"memory chunk {tuple(chunk.shape)} {chunk.dtype} does not fit {shape} {dtype}")
            for memory in chunk.detach().cpu():
                row = {
                    "id": values[index],
                    "text": texts[index],
                    "token_ids": list(token_ids[index]),
                    "memory": memory.to(getattr(torch, stored)).numpy(),
                }
                row.update({name: columns[name][index] for name in DOC_STATS})
                row["exact"] = bool(row["exact"])
                yield row
                index += 1
        if index != len(values):
            raise ValueError(f"memory chunks hold {index} rows for {len(values)} ids")

    stored = arrow_dtype(dtype)
    m, d = shape[1], shape[2]
    features = datasets.Features(
        {
            "id": datasets.Value(id_dtype),
            "text": datasets.Value("string"),
            "token_ids": datasets.Sequence(datasets.Value("int64")),
            "memory": datasets.Array2D((int(m), int(d)), stored),
            "loss_before": datasets.Value("float32"),
            "loss_after": datasets.Value("float32"),
            "accuracy": datasets.Value("float32"),
            "steps": datasets.Value("int64"),
            "tokens": datasets.Value("int64"),
            "exact": datasets.Value("bool"),
            "prefix": datasets.Value("int64"),
            "info_gain_bits": datasets.Value("float32"),
        }
    )
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["ids_format"] = ids_format
    _save(path, features, rows(), meta)


def arrow_dtype(torch_dtype) -> str:
    """The Arrow float type a memory of ``torch_dtype`` is stored as."""
    return _ARROW_FLOAT[str(torch_dtype).replace("torch.", "")]


def write_capacity_dataset(path: str, report: dict, ids, results) -> None:
    """``capacity``'s dataset output: one row per stage (``results``: ``capacity.Capacity`` with
    ``stage_memories``), the report in the metadata file."""
    from .datasets_io import _import_datasets

    datasets = _import_datasets()
    values, id_dtype, ids_format = _id_column(ids)
    first = results[0].stage_memories[0]
    m, d = first.shape
    dtype = arrow_dtype(first.dtype)

    def rows():
        import torch

        for doc_id, r in zip(values, results):
            for s, (stage, memory) in enumerate(zip(r.stages, r.stage_memories)):
                yield {
                    "id": doc_id,
                    "stage": s,
                    "target": stage.target,
                    "steps": stage.steps,
                    "converged": bool(stage.exact),
                    "prefix": stage.prefix,
                    "kind": stage.kind,
                    "memory": memory.detach().cpu().to(getattr(torch, dtype)).numpy(),
                }

    features = datasets.Features(
        {
            "id": datasets.Value(id_dtype),
            "stage": datasets.Value("int64"),
            "target": datasets.Value("int64"),
            "steps": datasets.Value("int64"),
            "converged": datasets.Value("bool"),
            "prefix": datasets.Value("int64"),
            "kind": datasets.Value("string"),
            "memory": datasets.Array2D((int(m), int(d)), dtype),
        }
    )
    meta = {"format": "gradmem-fast.capacity", "ids_format": ids_format, "report": json.dumps(report)}
    _save(path, features, rows(), meta)


class MemoryDataset:
    """A ``write`` dataset folder opened for reading, with ``fileio.MemoryFile``'s interface."""

    def __init__(self, path: str):
        from .datasets_io import _import_datasets
        from .fileio import FORMAT, FORMAT_VERSION, decode_ids

        datasets = _import_datasets()
        if not is_dataset_folder(path):
            raise UserError(
                f"{path!r} is not a gradmem-fast dataset folder (written by `write --output-format dataset`)"
            )
        try:
            with open(os.path.join(path, MARKER), encoding="utf-8") as fh:
                self.metadata = json.load(fh)
            self._ds = datasets.load_from_disk(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path!r} is not a readable dataset folder ({exc})") from None
        if self.metadata.get("format") != FORMAT:
            raise UserError(f"{path!r} is not a gradmem-fast memory dataset (format {self.metadata.get('format')!r})")
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{path!r} has memory format version {self.metadata.get('format_version')!r}; "
                f"this gradmem-fast reads version {FORMAT_VERSION}"
            )
        self.path = path
        m, d = self._ds.features["memory"].shape
        self.shape = (len(self._ds), m, d)
        raw = self._ds["id"]
        fmt = self.metadata.get("ids_format")
        if fmt == "json":
            self.ids = [json.loads(v) for v in raw]
        elif fmt in ("int64", "string"):
            self.ids = list(raw)
        else:
            self.ids = decode_ids(None, fmt)  # raises for an unknown format

    def rows(self, indices):
        """``[len(indices), m, d]`` memories of the given row indices."""
        import torch

        if not len(indices):
            return None
        import numpy as np

        # the numpy format narrows floats to float32 unless told the stored type
        stored = np.dtype(self._ds.features["memory"].dtype)
        memories = self._ds.select_columns(["memory"]).with_format("numpy", dtype=stored)
        picked = memories[[int(i) for i in indices]]["memory"]
        return torch.from_numpy(picked.copy())

    def stats(self) -> dict:
        """The per-document ``DOC_STATS`` columns as tensors (``exact`` as uint8, as in a memory file)."""
        import torch

        from .fileio import DOC_STATS

        out = {}
        table = self._ds.select_columns(list(DOC_STATS)).with_format("numpy")[:]
        for name in DOC_STATS:
            value = torch.from_numpy(table[name].copy())
            out[name] = value.to(torch.uint8) if name == "exact" else value
        return out

    def config(self) -> dict:
        """The WriteConfig fields the memories were written with."""
        try:
            return json.loads(self.metadata.get("config", "{}"))
        except json.JSONDecodeError:
            return {}


def open_memories(path: str):
    """``fileio.MemoryFile`` of a safetensors memory file, or ``MemoryDataset`` of a dataset folder written with
    ``--output-format dataset`` (the same interface)."""
    from .fileio import MemoryFile

    if is_dataset_folder(path):
        return MemoryDataset(path)
    return MemoryFile(path)
