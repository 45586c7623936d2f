"""Files of the command line: JSON-lines input, safetensors memory files, atomic writes, resumable shards.

Memory file (``gradmem-fast write`` output, read by ``gradmem-fast read``): a safetensors file with

- ``memories``: ``[num_docs, m, d]``, one memory per document, in input order;
- ``ids``: the documents' ids; int64 ``[num_docs]`` when every id is an integer, otherwise the UTF-8 bytes
  of a JSON list (uint8), as told by the metadata key ``ids_format`` (``int64`` or ``json``);
- per-document evidence of how well each memory holds its document (``DOC_STATS``): ``loss_before`` and
  ``loss_after`` (mean reconstruction loss with the initial and the final memory), ``accuracy`` (teacher-
  forced: the fraction of the document's tokens that are the model's argmax given the memory and the true
  preceding tokens; 1.0 means greedy decoding from the memory alone reproduces the document), ``steps``
  (optimisation steps used), ``tokens`` (the document's length, end-of-text token included), ``exact``
  (1 when greedy decoding reproduces the whole document), ``prefix`` (leading tokens it reproduces) and
  ``info_gain_bits`` (loss of tokens 1..n-1 without a memory minus with it, in bits; ``gradmem_fast.scoring``);
  files written before the last three existed lack them;
- string metadata: ``format``, ``format_version``, ``model``, ``hidden_size``, ``config`` (JSON of the
  WriteConfig), ``tokenizer``, ``versions`` (JSON), ``weights_signature`` and ``model_config`` (what
  ``gradmem-fast read`` checks the model against), ``append_eos`` and the other options that shaped the
  memories.

Memory files are only ever *read* with safetensors (no pickle: a memory file may come from anyone). The
final file is streamed shard by shard (the whole ``[num_docs, m, d]`` tensor is never held in memory)
to a temporary file that is renamed over the output only when complete, so an interrupted run never
leaves a partial output.
"""

import contextlib
import dataclasses
import json
import os
import struct

from .errors import UserError

FORMAT = "gradmem-fast.memories"
FORMAT_VERSION = "1"
# Per-document tensors of a memory file (optional: files of older versions lack them).
DOC_STATS = ("loss_before", "loss_after", "accuracy", "steps", "tokens", "exact", "prefix", "info_gain_bits")

# safetensors' names of the dtypes we write.
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "uint8": "U8"}


@dataclasses.dataclass
class Record:
    """One JSON line: its 1-based line number (for messages), its id and its text."""

    line: int
    id: object
    text: str


def _valid_id(value) -> bool:
    """Ids are integers or strings (JSON has no other exact, hashable kind)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def read_jsonl(
    path: str,
    text_field: str = "text",
    id_field: str = "id",
    require_id: bool = False,
    unique_ids: bool = True,
    what: str = "input",
):
    """Read a JSON-lines file into ``Record`` objects (blank lines are skipped).

    Each line must be a JSON object with a string ``text_field``; ``id_field`` is optional (default: the
    0-based line number) unless ``require_id``. Any problem raises ``UserError`` naming the line.
    """
    if not os.path.exists(path):
        raise UserError(f"{what} file {path!r} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{what} file {path!r} is a directory")
    records, seen = [], {}
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot open {what} file {path!r}: {exc.strerror or exc}") from None
    with handle:
        lineno = 0
        while True:
            try:
                raw = handle.readline()
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno + 1}: not valid UTF-8 text") from None
            if not raw:
                break
            lineno += 1
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if text_field not in obj:
                raise UserError(
                    f"{path}:{lineno}: no {text_field!r} field"
                    + ("" if what == "queries" else " (--text-field picks another field)")
                )
            text = obj[text_field]
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: field {text_field!r} must be a string, got {type(text).__name__}")
            if id_field in obj:
                doc_id = obj[id_field]
                if not _valid_id(doc_id):
                    raise UserError(
                        f"{path}:{lineno}: field {id_field!r} must be an integer or a string, got {json.dumps(doc_id)}"
                    )
            elif require_id:
                raise UserError(f"{path}:{lineno}: no {id_field!r} field (the id of the document to read from)")
            else:
                doc_id = lineno - 1
            if unique_ids:
                if doc_id in seen:
                    raise UserError(f"{path}:{lineno}: id {json.dumps(doc_id)} was already used on line {seen[doc_id]}")
                seen[doc_id] = lineno
            records.append(Record(lineno, doc_id, text))
    if not records:
        raise UserError(f"{what} file {path!r} has no lines")
    return records


def check_output(path: str, inputs, force: bool, flag: str = "--output"):
    """Refuse an output path that would destroy data, before any work is done.

    ``inputs``: (flag, path) pairs of the command's input files. An output that is the same file as an
    input (the same inode: symlinks and hard links included) is always refused, ``--force`` or not; an
    existing output (or a dangling symlink there) is refused unless ``force``. Raises ``UserError``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"output directory {directory!r} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a directory")
    for in_flag, in_path in inputs:
        if in_path and os.path.exists(path) and os.path.exists(in_path) and os.path.samefile(path, in_path):
            raise UserError(
                f"{flag} {path!r} is the same file as {in_flag} {in_path!r}: writing it would destroy "
                "the input; choose another output path"
            )
    if os.path.lexists(path) and not force:
        raise UserError(f"{flag} {path!r} already exists; pass --force to replace it")


@contextlib.contextmanager
def atomic_output(path: str):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it.

    The rename is atomic on POSIX file systems, so readers see either no file or the complete one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"output directory {directory!r} does not exist")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync(path):
    """Flush a written file to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_ids(ids):
    """(tensor, format) for a list of ids: int64 when all are integers in range, JSON bytes otherwise."""
    import torch

    if all(isinstance(i, int) and not isinstance(i, bool) and -(2**63) <= i < 2**63 for i in ids):
        return torch.tensor(ids, dtype=torch.int64), "int64"
    data = json.dumps(list(ids), ensure_ascii=False).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone(), "json"


def decode_ids(tensor, fmt):
    """Inverse of ``encode_ids``."""
    if fmt == "int64":
        return [int(v) for v in tensor.tolist()]
    if fmt == "json":
        return json.loads(bytes(tensor.tolist()).decode("utf-8"))
    raise UserError(f"unknown ids_format {fmt!r} in memory file")


def _tensor_bytes(tensor) -> bytes:
    """Raw little-endian bytes of a tensor (viewed as bytes, so bfloat16 works too)."""
    import torch

    t = tensor.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def write_memory_file(path: str, memory_chunks, shape, dtype, ids, metadata: dict, extra: dict = None):
    """Stream a memory file to ``path`` atomically.

    ``memory_chunks``: an iterable of ``[n_i, m, d]`` tensors (in order, summing to ``shape[0]`` rows) of
    ``dtype``; ``ids``: one per row; ``extra``: small tensors stored after them (name -> tensor, e.g. the
    ``DOC_STATS``). The safetensors layout is written directly (8-byte header length, JSON header, raw
    data) so the full memory tensor never has to be in memory.
    """
    import torch

    extra = {name: t.detach().cpu().contiguous() for name, t in (extra or {}).items()}
    ids_tensor, ids_format = encode_ids(ids)
    dtype_name = str(dtype).replace("torch.", "")
    if dtype_name not in _ST_DTYPES:
        raise ValueError(f"unsupported memory dtype {dtype}")
    mem_bytes = int(torch.Size(shape).numel()) * torch.tensor([], dtype=dtype).element_size()
    ids_bytes = ids_tensor.numel() * ids_tensor.element_size()
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["ids_format"] = ids_format
    header = {
        "__metadata__": meta,
        "memories": {"dtype": _ST_DTYPES[dtype_name], "shape": list(shape), "data_offsets": [0, mem_bytes]},
        "ids": {
            "dtype": _ST_DTYPES[str(ids_tensor.dtype).replace("torch.", "")],
            "shape": list(ids_tensor.shape),
            "data_offsets": [mem_bytes, mem_bytes + ids_bytes],
        },
    }
    offset = mem_bytes + ids_bytes
    for name, t in extra.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[str(t.dtype).replace("torch.", "")],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes with trailing spaces
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            written = 0
            for chunk in memory_chunks:
                if chunk.dtype != dtype or tuple(chunk.shape[1:]) != tuple(shape[1:]):
                    raise ValueError(f"memory chunk {tuple(chunk.shape)} {chunk.dtype} does not fit {shape} {dtype}")
                data = _tensor_bytes(chunk)
                fh.write(data)
                written += len(data)
            if written != mem_bytes:
                raise ValueError(f"memory chunks hold {written} bytes, expected {mem_bytes}")
            fh.write(_tensor_bytes(ids_tensor))
            for t in extra.values():
                fh.write(_tensor_bytes(t))
        _fsync(tmp)


class MemoryFile:
    """A memory file opened for reading with safetensors (rows are loaded on demand)."""

    def __init__(self, path: str):
        """Open ``path``; raise ``UserError`` if it is not a readable gradmem-fast memory file."""
        from safetensors import SafetensorError, safe_open

        if not os.path.exists(path):
            raise UserError(f"memory file {path!r} does not exist")
        if os.path.isdir(path):
            raise UserError(f"memory file {path!r} is a directory")
        try:
            self._handle = safe_open(path, framework="pt", device="cpu")
            keys = set(self._handle.keys())
            self.metadata = dict(self._handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path!r} is not a readable safetensors memory file ({exc})") from None
        if self.metadata.get("format") != FORMAT or not {"memories", "ids"} <= keys:
            raise UserError(f"{path!r} is not a gradmem-fast memory file (written by `gradmem-fast write`)")
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{path!r} has memory file format version {self.metadata.get('format_version')!r}; "
                f"this gradmem-fast reads version {FORMAT_VERSION}"
            )
        self.path = path
        self._memories = self._handle.get_slice("memories")
        self.shape = tuple(self._memories.get_shape())
        if len(self.shape) != 3:
            raise UserError(f"{path!r}: memories must be [num_docs, m, d], got shape {self.shape}")
        self.ids = decode_ids(self._handle.get_tensor("ids"), self.metadata.get("ids_format"))
        if len(self.ids) != self.shape[0]:
            raise UserError(f"{path!r}: {len(self.ids)} ids for {self.shape[0]} memories")

    def rows(self, indices):
        """``[len(indices), m, d]`` memories of the given row indices."""
        import torch

        return torch.stack([self._memories[int(i)] for i in indices]) if len(indices) else None

    def stats(self) -> dict:
        """The per-document ``DOC_STATS`` tensors the file holds (name -> [num_docs] tensor; {} if none)."""
        keys = set(self._handle.keys())
        found = {name: self._handle.get_tensor(name) for name in DOC_STATS if name in keys}
        return {name: t for name, t in found.items() if t.shape == (self.shape[0],)}

    def config(self) -> dict:
        """The WriteConfig fields the memories were written with."""
        try:
            return json.loads(self.metadata.get("config", "{}"))
        except json.JSONDecodeError:
            return {}


# --- resumable shards --------------------------------------------------------------------------------------


def checkpoint_dir(output: str) -> str:
    """Where shards of an unfinished run of ``output`` are kept (removed once the output is complete)."""
    return output + ".partial"


def shard_path(directory: str, index: int) -> str:
    """File of shard ``index`` in ``directory``."""
    return os.path.join(directory, f"shard-{index:06d}.safetensors")


def save_shard(directory: str, index: int, memories, fingerprint: str, stats: dict = None):
    """Write one shard atomically, tagged with the run's fingerprint; ``stats``: per-document tensors."""
    from safetensors.torch import save_file

    path = shard_path(directory, index)
    tensors = {"memories": memories.detach().cpu().contiguous()}
    tensors.update({name: t.detach().cpu().contiguous() for name, t in (stats or {}).items()})
    with atomic_output(path) as tmp:
        save_file(
            tensors, tmp, metadata={"fingerprint": fingerprint, "index": str(index), "rows": str(memories.shape[0])}
        )
        _fsync(tmp)


def shard_matches(directory: str, index: int, fingerprint: str, rows: int) -> bool:
    """Whether shard ``index`` exists and was written by *this* run (its header only is read)."""
    from safetensors import SafetensorError, safe_open

    path = shard_path(directory, index)
    if not os.path.isfile(path):
        return False
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return False
    return meta.get("fingerprint") == fingerprint and meta.get("rows") == str(rows)


def list_shards(directory: str):
    """Indices of the shard files in ``directory`` (none if it does not exist)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        stem = (
            name[len("shard-") : -len(".safetensors")]
            if name.startswith("shard-") and name.endswith(".safetensors")
            else ""
        )
        if stem.isdigit():
            found.append(int(stem))
    return sorted(found)


def load_shard(directory: str, index: int, fingerprint: str, rows: int):
    """The tensors (``memories`` and the per-document stats) of a finished shard of *this* run, or None
    (missing, unreadable, or another run's)."""
    from safetensors import SafetensorError, safe_open

    if not shard_matches(directory, index, fingerprint, rows):
        return None
    try:
        with safe_open(shard_path(directory, index), framework="pt", device="cpu") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError):
        return None
    memories = tensors.get("memories")
    return tensors if memories is not None and memories.shape[0] == rows else None


def remove_checkpoint(directory: str):
    """Delete the shard directory of a finished run (only files this module writes)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(("shard-", ".shard-")) and ".safetensors" in name:
            os.remove(os.path.join(directory, name))
    with contextlib.suppress(OSError):
        os.rmdir(directory)
