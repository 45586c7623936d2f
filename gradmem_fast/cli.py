"""Command line: ``gradmem-fast write | read | demo`` (also ``python -m gradmem_fast ...``).

    gradmem-fast write --model NAME_OR_DIR --input docs.jsonl --output memories.safetensors [options]
    gradmem-fast read  --model NAME_OR_DIR --memories memories.safetensors --queries q.jsonl --output a.jsonl
    gradmem-fast demo  [--model NAME_OR_DIR]
    torchrun --nproc-per-node N -m gradmem_fast write ...      (documents sharded over the processes)

Input decisions (also in ``--help``):

- An empty document (empty or whitespace-only text, or text that tokenizes to no token) is rejected with
  its line number; ``--skip-empty`` skips such lines with a warning instead (the other ids are kept).
- A document longer than the model's positions allow (minus the memory and the end-of-text token) is
  rejected with advice to pass ``--max-length N``; with ``--max-length``, longer documents are truncated to
  N tokens with a warning.
- Documents are tokenized without special tokens (the memory takes the place of a BOS token) and, by
  default, end with the tokenizer's end-of-text token, so that the memory also says where the document
  ends and ``read`` stops there (``--no-append-eos``: write the text alone).
- A query may have empty text: the answer is then decoded from the memory alone.

Defaults: a plain pretrained LM was never meta-trained to write in a few steps, so the defaults are the
"cramming" recipe measured with the demo (Adam, step size 0.2, 8 memory vectors, at most 150 steps) with
early exit: each document stops as soon as greedy decoding from its memory reproduces it (``--stop exact``,
checked every step on a CPU, every 10 steps on a GPU) and a waiting document takes its slot (``--stop none``:
every document takes all ``--steps``). Every memory file records, per document, the loss before and
after, the steps used, the teacher-forced accuracy, whether greedy decoding reproduces it exactly, how
many leading tokens it reproduces, and the information gain in bits; ``write`` prints a summary.

Safety: no output is ever the same file as an input (symlinks and hard links included), and an existing
output is replaced only with ``--force``. Problems with the user's input print one ``error:`` line and exit
with status 2, with no traceback and no output file; arguments, devices and documents (with the tokenizer)
are checked before the model's weights load. Outputs are written to a temporary file and renamed only
when complete. A killed ``write`` keeps its finished shards in ``OUTPUT.partial/``; rerunning the same
command resumes there and produces the same file as an uninterrupted run. Memory files carry a signature
of the model's weights and config: ``read`` refuses another model (``--allow-model-mismatch`` overrides).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time

from .cli_common import (
    PROG,
    add_alignment_arguments,
    add_init_arguments,
    alignment_options,
    check_init_arguments,
    check_memory_rank,
    check_weight_decay,
    device_and_dtype,
    note,
    positive_int,
    versions,
    warn,
)
from .errors import UserError
from .models import quiet_transformers

# The shared helpers, under the names this module has always used.
_warn, _note, _versions = warn, note, versions


class _VersionAction(argparse.Action):
    """``--version``: this package's and its main libraries' versions (imported only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        v = _versions()
        print(
            f"{PROG} {v['gradmem_fast']} (torch {v['torch']}, transformers {v['transformers']}, "
            f"safetensors {v['safetensors']})"
        )
        parser.exit(0)


# --- checks shared by the commands ---------------------------------------------------------------------------


_positive_int, _device_and_dtype = positive_int, device_and_dtype


# --- model fingerprints --------------------------------------------------------------------------------------

# Config fields that shape the computation (whichever of them a config has): compared by ``read``.
_CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
    "layer_norm_epsilon",
    "layer_norm_eps",
    "head_dim",
    "hidden_act",
    "sliding_window",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "partial_rotary_factor",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    "activation_function",
)

# Two loads of the same weights (any path, device or dtype down to bfloat16) agree in every signature entry
# to about 2**-9 relative; a different model or a fine-tune differs by far more in some tensor.
SIGNATURE_RTOL = 1e-2


def model_config_summary(config) -> dict:
    """The computation-shaping fields of a model config (JSON-ready), for the memory file."""
    out = {}
    for key in _CONFIG_FIELDS:
        value = getattr(config, key, None)
        if value is not None:
            out[key] = (
                value
                if isinstance(value, (int, float, str, bool))
                else json.loads(json.dumps(value, sort_keys=True, default=str))
            )
    return out


# Period of the +-1 pattern of the signature's projection: a prime, so it lines up with no tensor layout.
_PATTERN_PERIOD = 4099


def weights_signature(model) -> list:
    """Per parameter: ``[name, shape, sum |w|, sqrt(sum w^2), sum_i r_(i mod P) w_i]`` of its weights
    rounded to bfloat16 (flat index i, a fixed random +-1 pattern r of prime period P).

    The projection moves with any per-weight change (a fine-tune), while the rounding to bfloat16 makes
    the numbers nearly independent of the dtype and device the model was loaded with (two loads agree to
    about 2**-9 relative). The file path plays no part. All sums are in float64, so the same weights give
    the same digits whatever the thread count (resume and ranks compare ``signature_digest``).
    """
    import torch

    pattern = torch.randint(0, 2, (_PATTERN_PERIOD,), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    rows = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.detach().reshape(-1).to(torch.bfloat16).float()  # bfloat16 values are exact in fp32
            padded = torch.nn.functional.pad(w, (0, -w.numel() % _PATTERN_PERIOD)).view(-1, _PATTERN_PERIOD)
            projection = (padded.double() @ pattern.to(w.device, torch.float64)).sum()
            stats = (
                torch.stack([w.abs().sum(dtype=torch.float64), (w * w).sum(dtype=torch.float64).sqrt(), projection])
                .cpu()
                .tolist()
            )
            rows.append([name, list(p.shape), *stats])
    return rows


def signature_digest(signature) -> str:
    """A short digest of a weights signature (6 significant digits: equal across ranks and runs)."""
    text = json.dumps([[n, s, *(f"{v:.6g}" for v in vals)] for n, s, *vals in signature])
    return hashlib.sha256(text.encode()).hexdigest()


def signature_mismatch(expected, actual):
    """None when two weights signatures describe the same weights, else a short reason."""
    if [r[:2] for r in expected] != [r[:2] for r in actual]:
        names = {r[0] for r in expected} ^ {r[0] for r in actual}
        return f"the parameters differ ({sorted(names)[:3] or 'shapes'})"
    for (name, _, a_abs, a_norm, a_proj), (_, _, b_abs, b_norm, b_proj) in zip(expected, actual):
        scale = max(a_norm, b_norm, 1e-30)
        if (
            abs(a_abs - b_abs) > SIGNATURE_RTOL * max(a_abs, b_abs, 1e-30)
            or abs(a_norm - b_norm) > SIGNATURE_RTOL * scale
            or abs(a_proj - b_proj) > SIGNATURE_RTOL * scale
        ):
            return f"the weights of {name} differ"
    return None


def _config_mismatch(recorded: dict, config) -> str:
    """None when the recorded config fields match ``config`` (on the fields both have), else the first."""
    now = model_config_summary(config)
    for key in sorted(set(recorded) & set(now)):
        if recorded[key] != now[key]:
            return f"{key} is {recorded[key]!r} in the memory file and {now[key]!r} in --model"
    return None


# --- write ------------------------------------------------------------------------------------------------


def _source(args) -> str:
    """The input as messages name it (a path, or ``--dataset NAME``)."""
    from .datasets_io import source_name

    return source_name(args)


def add_write_arguments(p):
    """Options of ``gradmem-fast write``."""
    from . import datasets_io, demo

    p.add_argument(
        "--model",
        required=True,
        help="Hugging Face model name, a local directory, or smollm2-135m-instruct (the embedded GGUF model)",
    )
    datasets_io.add_source_arguments(p, "document")
    p.add_argument(
        "--output",
        required=True,
        help="memory file to write (safetensors), or a folder with --output-format dataset",
    )
    p.add_argument(
        "--output-format",
        choices=["safetensors", "dataset"],
        default="safetensors",
        help="safetensors (default): one memory file; dataset: a Hugging Face Dataset folder (save_to_disk) "
        "with one row per document (id, text, token_ids, memory and every per-document statistic); "
        "read accepts both",
    )
    p.add_argument("--force", action="store_true", help="replace --output if it exists (never an input file)")
    p.add_argument("--text-field", default="text", help="field holding a document's text (default: text)")
    p.add_argument(
        "--id-field",
        default="id",
        help="field holding a document's id (default: id; missing ids default to the 0-based line number)",
    )
    p.add_argument(
        "--memory-tokens",
        type=int,
        default=demo.DEFAULT_MEMORY_TOKENS,
        help=f"memory vectors per document (m, default {demo.DEFAULT_MEMORY_TOKENS})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=demo.DEFAULT_STEPS,
        help=f"optimisation steps per document (K, default {demo.DEFAULT_STEPS}: enough for a plain "
        "pretrained LM to memorise a short paragraph); with --stop, the most a document gets",
    )
    p.add_argument(
        "--stop",
        default="exact",
        help="when a document is learned and stops (its slot goes to a waiting document): exact (greedy "
        "decoding from the memory reproduces it; default), accuracy=A (teacher-forced accuracy >= A), "
        "loss=L (mean loss <= L), several joined by commas (any one stops), or none (every document takes "
        "--steps steps)",
    )
    p.add_argument(
        "--check-every",
        type=int,
        default=None,
        help="steps between checks of the stop rule (default 1 on a CPU, where a check costs nothing; 10 on a GPU)",
    )
    p.add_argument(
        "--slots",
        type=int,
        default=None,
        help="with --stop: documents in flight at once (default: as many as --batch-tokens holds)",
    )
    p.add_argument(
        "--schedule",
        choices=["constant", "cosine", "linear"],
        default="constant",
        help="step size over each document's --steps steps (default constant)",
    )
    p.add_argument("--warmup", type=int, default=0, help="steps of linear warmup of the step size (default 0)")
    p.add_argument(
        "--final-lr",
        type=float,
        default=0.0,
        help="cosine/linear: the fraction of --lr the decay approaches (default 0)",
    )
    p.add_argument("--lr", type=float, default=demo.DEFAULT_LR, help=f"step size (default {demo.DEFAULT_LR})")
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adam", "adamw"],
        default="adam",
        help="default adam; adamw: Adam with decoupled --weight-decay, as torch.optim.AdamW",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="--optimizer adamw: decoupled weight decay wd; each step scales the memory by 1 - lr * wd "
        "before the Adam step (default 0)",
    )
    p.add_argument(
        "--clip-value",
        type=float,
        default=None,
        help="clamp gradient entries to +-VALUE (default: off for sgd, 10 for adam)",
    )
    p.add_argument("--clip-norm", type=float, default=None, help="per-document gradient norm clip")
    p.add_argument("--init-std", type=float, default=0.02, help="std of the initial memory (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial memory (default 0)")
    add_init_arguments(p, warm=True)
    p.add_argument(
        "--given-tokens",
        type=int,
        default=0,
        help="leading tokens of each document that are read but not predicted (1: the cramming papers' "
        "convention, the memory precedes a given first token; default 0: the memory predicts token 0)",
    )
    add_alignment_arguments(p)
    p.add_argument(
        "--append-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end every document with the tokenizer's end-of-text token, so that reading stops "
        "where the document ends (default: on, when the tokenizer has one)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16, float64",
    )
    p.add_argument(
        "--device", default="auto", help="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="auto: triton kernels on CUDA, the torch reference on CPU",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the write step with torch.compile (triton backend; default: on CUDA only)",
    )
    p.add_argument(
        "--batch-tokens", type=int, default=16384, help="max packed tokens (memory included) per batch (default 16384)"
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate documents to this many tokens (with a warning); without it a document "
        "longer than the model's positions is an error",
    )
    p.add_argument(
        "--skip-empty",
        action="store_true",
        help="skip empty documents with a warning (default: an empty document is an error)",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=256,
        help="documents per checkpoint shard: the unit of resuming and of multi-process sharding (default 256)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    from .runlog import add_argument as add_logdir

    add_logdir(p)


def _warm_memories(args, ids, m):
    """--init warm: [N, m, d] float64 memories of the documents ``ids`` from ``--init-from`` (matched by id,
    then by the id as a string); any id it lacks is an error naming it."""
    if args.init_from is None:
        raise UserError("--init warm needs --init-from OUTPUT (a previous write's memory file or dataset folder)")
    from .dataset_files import open_memories

    previous = open_memories(args.init_from)
    if previous.shape[1] != m:
        raise UserError(
            f"--init-from {args.init_from!r} holds {previous.shape[1]} memory vectors per document, not {m}"
        )
    exact = {doc_id: row for row, doc_id in enumerate(previous.ids)}
    loose: dict = {}
    for row, doc_id in enumerate(previous.ids):
        loose.setdefault(str(doc_id), row)
    rows = [exact.get(i, loose.get(str(i))) for i in ids]
    missing = [i for i, row in zip(ids, rows) if row is None]
    if missing:
        shown = ", ".join(json.dumps(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise UserError(f"--init-from {args.init_from!r} has no memory for document id(s) {shown}")
    return previous.rows(rows).double(), previous.shape[2]


def _write_config(args):
    """The WriteConfig of the write options; bad values become messages naming the flag."""
    from .cli_common import lowrank_options
    from .config import Schedule, WriteConfig

    _positive_int("--memory-tokens", args.memory_tokens)
    _positive_int("--steps", args.steps)
    if not args.lr >= 0 or args.lr == float("inf"):
        raise UserError(f"--lr must be a finite number >= 0, got {args.lr}")
    for flag, value in (("--clip-value", args.clip_value), ("--clip-norm", args.clip_norm)):
        if value is not None and not 0 < value < float("inf"):
            raise UserError(f"{flag} must be a finite number > 0, got {value}")
    if not 0 <= args.init_std < float("inf"):
        raise UserError(f"--init-std must be a finite number >= 0, got {args.init_std}")
    check_init_arguments(args)
    check_weight_decay(args)
    _positive_int("--given-tokens", args.given_tokens, minimum=0)
    lowrank = lowrank_options(args)
    alignment = alignment_options(args)
    stop = _stop_rule(args.stop, args.check_every, args.device)
    if args.slots is not None:
        _positive_int("--slots", args.slots)
        if stop is None:
            raise UserError("--slots needs a stop rule (--stop exact, accuracy=A or loss=L), not --stop none")
    _positive_int("--warmup", args.warmup, minimum=0)
    if not 0 <= args.final_lr <= 1:
        raise UserError(f"--final-lr must be a fraction in [0, 1], got {args.final_lr}")
    schedule = None
    if args.schedule != "constant" or args.warmup:
        schedule = Schedule(args.schedule, warmup=args.warmup, final=args.final_lr)
    try:
        return WriteConfig(
            num_memory_tokens=args.memory_tokens,
            steps=args.steps,
            lr=args.lr,
            optimizer=args.optimizer,
            weight_decay=args.weight_decay,
            clip_value=args.clip_value,
            clip_norm=args.clip_norm,
            init_std=args.init_std,
            seed=args.seed,
            init="normal" if args.init == "warm" else args.init,
            init_rank=args.init_rank,
            **lowrank,
            schedule=schedule,
            stop=stop,
            given_tokens=args.given_tokens,
            **alignment,
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"invalid write options: {exc}") from None


def _stop_rule(text: str, check_every: int | None, device: str):
    """``--stop``: "none", or criteria joined by commas: "exact", "accuracy=A", "loss=L"."""
    from .config import StopRule, default_check_every
    from .models import resolve_device

    if check_every is None:
        check_every = default_check_every(resolve_device(device))
    _positive_int("--check-every", check_every)
    if text.strip() == "none":
        return None
    fields: dict = {"exact": False}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if name == "exact" and not value:
            fields["exact"] = True
        elif name in ("accuracy", "loss") and value:
            try:
                fields[name] = float(value)
            except ValueError:
                raise UserError(f"--stop {name}= needs a number, got {value!r}") from None
        else:
            raise UserError(f"--stop must be exact, accuracy=A, loss=L (comma-joined) or none, got {text!r}")
    try:
        return StopRule(check_every=check_every, **fields)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--stop: {exc}") from None


def _eos_id(tokenizer):
    """The tokenizer's end-of-text id, or None."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if isinstance(eos, int) else None


def _tokenize_documents(args, records, tokenizer, limit, eos=None, command="write"):
    """Token lists of the documents, after the empty/too-long decisions (see the module docstring).

    ``limit``: the most tokens (end-of-text included) a document may have; ``eos``: appended when not None.
    """
    extra = 0 if eos is None else 1
    text_limit = None if limit is None else limit - extra
    texts = [r.text for r in records]
    token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    kept_records, docs, truncated = [], [], 0
    for record, tokens in zip(records, token_lists):
        if not record.text.strip() or not tokens:
            if args.skip_empty:
                _warn(command, f"{_source(args)}:{record.line}: empty document (id {json.dumps(record.id)}) skipped")
                continue
            raise UserError(
                f"{_source(args)}:{record.line}: empty document (id {json.dumps(record.id)}); remove it "
                "or pass --skip-empty"
            )
        if args.max_length is not None and len(tokens) > args.max_length:
            tokens = tokens[: args.max_length]
            truncated += 1
        elif text_limit is not None and len(tokens) > text_limit:
            end = " and the end-of-text token" if extra else ""
            raise UserError(
                f"{_source(args)}:{record.line}: document {json.dumps(record.id)} has {len(tokens)} tokens; "
                f"with {args.memory_tokens} memory vectors{end} the model takes at most {text_limit}: "
                f"pass --max-length {text_limit} to truncate"
            )
        kept_records.append(record)
        docs.append(list(tokens) + ([eos] if extra else []))
    if truncated:
        _warn(command, f"{truncated} document(s) truncated to --max-length {args.max_length} tokens")
    if not docs:
        raise UserError(f"{_source(args)}: no non-empty document to write")
    return kept_records, docs


def _fingerprint(settings: dict, ids, docs) -> str:
    """A digest of everything that determines the memories: a shard from another run never gets reused."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps(ids).encode())
    for tokens in docs:
        h.update(json.dumps(tokens).encode())
    return h.hexdigest()


def cmd_write(args) -> int:
    """``gradmem-fast write``: documents in, one memory per document out (see the module docstring)."""
    from . import datasets_io, distributed, fileio
    from .models import load_model, load_tokenizer, max_positions

    # 1. Everything that needs no model: options, paths, the input file, the device.
    config = _write_config(args)
    _positive_int("--batch-tokens", args.batch_tokens)
    _positive_int("--shard-size", args.shard_size)
    if args.max_length is not None:
        _positive_int("--max-length", args.max_length)
    if args.output_format == "dataset":
        from .dataset_files import check_folder_output
        from .datasets_io import _import_datasets

        _import_datasets()  # missing library: an error now, not after the writing
        check_folder_output(args.output, [("--input", args.input)], args.force)
    else:
        fileio.check_output(args.output, [("--input", args.input)], args.force)
    ckpt = fileio.checkpoint_dir(args.output)
    from .runlog import check_logdir, open_log

    check_logdir(args.logdir, args.log_format)
    if os.path.lexists(ckpt) and not os.path.isdir(ckpt):
        raise UserError(f"{ckpt!r} (where an unfinished write keeps its shards) exists and is not a directory")
    records = datasets_io.read_records(args)
    ctx = distributed.from_environment()
    device = _device_and_dtype(args, ctx.local_rank)

    # 2. The tokenizer and config (seconds): every document is checked before the weights load.
    quiet_transformers()
    tokenizer, model_config = load_tokenizer(args.model)
    check_memory_rank(config, model_config)
    positions = max_positions(model_config)
    eos = _eos_id(tokenizer) if args.append_eos else None
    limit = None if positions is None else positions - config.num_memory_tokens
    if limit is not None and limit < 1 + (eos is not None):
        raise UserError(
            f"--memory-tokens {config.num_memory_tokens} leaves no room for text in the model's {positions} positions"
        )
    if args.max_length is not None and limit is not None and args.max_length > limit - (eos is not None):
        raise UserError(
            f"--max-length {args.max_length} is longer than the model allows with "
            f"{config.num_memory_tokens} memory vectors ({limit - (eos is not None)})"
        )
    records, docs = _tokenize_documents(args, records, tokenizer, limit, eos)
    warm = None
    if args.init == "warm":
        warm, width = _warm_memories(args, [r.id for r in records], config.num_memory_tokens)
        hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
        if hidden is not None and width != hidden:
            raise UserError(f"--init-from {args.init_from!r} holds memories of width {width}; the model's is {hidden}")
    elif args.init_from is not None:
        raise UserError("--init-from is read with --init warm only")

    # 3. The weights.
    import torch

    from .writer import MemoryWriter

    model, tokenizer = load_model(args.model, args.dtype, device, tokenizer=tokenizer)
    try:
        writer = MemoryWriter(
            model, config, backend=args.backend, compile="auto" if args.compile is None else args.compile
        )
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"cannot write with model {args.model!r}: {exc}") from None

    ids = [r.id for r in records]
    signature = weights_signature(model)
    settings = {
        "format": fileio.FORMAT_VERSION,
        "stats": list(fileio.DOC_STATS),
        "model": args.model,
        "dtype": str(model.dtype),
        "device": torch.device(device).type,
        "backend": writer.backend,
        # A compiled step rounds differently from the eager one: shards of one must not resume the other.
        "compiled": writer.backbone is not None,
        "config": dataclasses.asdict(config),
        "batch_tokens": args.batch_tokens,
        "shard_size": args.shard_size,
        "weights": signature_digest(signature),
    }
    if warm is not None:
        # the memory dtype a write uses: the embeddings', fp32 for 16-bit models
        emb_dtype = model.get_input_embeddings().weight.dtype
        warm = warm.to(torch.float32 if emb_dtype in (torch.float16, torch.bfloat16) else emb_dtype)
        settings["init_from"] = hashlib.sha256(warm.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    fingerprint = _fingerprint(settings, ids, docs)
    num_shards = (len(docs) + args.shard_size - 1) // args.shard_size
    bounds = [(s * args.shard_size, min(len(docs), (s + 1) * args.shard_size)) for s in range(num_shards)]

    ctx = distributed.start(ctx, device)
    log = open_log(args.logdir, "write", vars(args), ctx.rank)
    try:
        os.makedirs(ckpt, exist_ok=True)
        if ctx.is_main:
            stale = [
                s
                for s in fileio.list_shards(ckpt)
                if s >= num_shards or not fileio.shard_matches(ckpt, s, fingerprint, bounds[s][1] - bounds[s][0])
            ]
            if stale:
                _note(
                    "write",
                    f"note: discarding {len(stale)} stale shard(s) in {ckpt}: they were written with "
                    "other options, documents or model weights and will be recomputed",
                )
        mine = ctx.my_shards(num_shards)
        todo = [s for s in mine if not fileio.shard_matches(ckpt, s, fingerprint, bounds[s][1] - bounds[s][0])]
        resumed = len(mine) - len(todo)
        if resumed and ctx.is_main:
            _warn("write", f"resuming: {resumed} of {len(mine)} shard(s) already written in {ckpt}")
        _write_shards(args, ctx, writer, docs, bounds, todo, mine, ckpt, fingerprint, warm, log, ids)
        if ctx.world_size > 1 and not args.quiet:
            print(
                f"rank {ctx.rank}/{ctx.world_size}: wrote {len(todo)} shard(s), "
                f"{sum(bounds[s][1] - bounds[s][0] for s in todo)} document(s)",
                file=sys.stderr,
                flush=True,
            )
        distributed.barrier(ctx)
        if ctx.is_main:
            stats = _merge(
                args, model, tokenizer, config, writer, ids, docs, bounds, ckpt, fingerprint, signature, eos, records
            )
            fileio.remove_checkpoint(ckpt)
    finally:
        log.close()
        distributed.stop(ctx)
    if ctx.is_main and not args.quiet:
        print(
            _summary(args.output, ids, stats, (len(docs), config.num_memory_tokens, model.config.hidden_size)),
            file=sys.stderr,
            flush=True,
        )
    return 0


def _summary(output, ids, stats, shape) -> str:
    """The one-line report of a write: how many memories reproduce their document."""
    acc = stats["accuracy"]
    below = [ids[i] for i in range(len(ids)) if acc[i] < 1.0]
    shown = ", ".join(json.dumps(i) for i in below[:5]) + (", ..." if len(below) > 5 else "")
    text = (
        f"wrote {shape[0]} memories {list(shape)} to {output}: teacher-forced accuracy "
        f"{100 * float(acc.double().mean()):.1f}% mean, {len(below)} of {len(ids)} document(s) below 100%"
    )
    text += f" (ids {shown}: they will not decode back exactly)" if below else " (all decode back exactly)"
    text += (
        f"; mean loss {float(stats['loss_before'].double().mean()):.3f} -> "
        f"{float(stats['loss_after'].double().mean()):.3f}"
    )
    steps = stats["steps"].double()
    text += f"; steps per document {int(steps.min())}-{int(steps.max())}, mean {float(steps.mean()):.1f}"
    if "info_gain_bits" in stats:
        text += f"; mean information gain {float(stats['info_gain_bits'].double().mean()):.1f} bits"
    return text


class _StepProgress:
    """The writer's per-step callback for one shard: the progress bar and each document's initial loss.

    ``plan``: the shard's batches (document indices, in the order ``write_many`` writes them). Each step of
    a batch of T document tokens advances the bar by one step and adds T processed tokens to the throughput
    (tokens through a forward and backward pass per second), so neither waits for a whole batch.
    """

    def __init__(self, plan, lengths, steps, bar, meter, shard_log=None):
        self.plan, self.lengths, self.steps, self.bar, self.meter = plan, lengths, steps, bar, meter
        self.batch = -1
        self.loss_before = [float("nan")] * len(lengths)
        self.log = shard_log  # (RunLog, the shard's ids) with --logdir

    def __call__(self, k, losses):
        if k == 0:
            self.batch += 1
            for i, value in zip(self.plan[self.batch], losses.tolist()):
                self.loss_before[i] = value
        if self.log is not None:
            log, ids = self.log
            for i, value in zip(self.plan[self.batch], losses.tolist()):
                log.record("step", id=ids[i], step=k, loss=value)
        if self.bar.disable:
            return
        self.meter["tokens"] += sum(self.lengths[i] for i in self.plan[self.batch])
        rate = self.meter["tokens"] / max(time.perf_counter() - self.meter["start"], 1e-9)
        self.bar.set_postfix_str(
            f"{len(self.plan[self.batch])} docs, step {k + 1}/{self.steps}, "
            f"loss {float(losses.mean()):.3f}, {rate:.3g} tok/s",
            refresh=False,
        )
        self.bar.update(1)


def _write_shards(args, ctx, writer, docs, bounds, todo, mine, ckpt, fingerprint, warm=None, log=None, ids=None):
    """Write this rank's unfinished shards, each atomically with its per-document stats; rank 0 shows a
    progress bar (one per write advancing per optimisation step; with a stop rule, one per shard advancing
    per document done)."""
    from tqdm import tqdm

    from . import fileio

    bar = None
    if writer.config.stop is None:
        steps = writer.config.steps
        plans = {s: list(writer.plan_batches(docs[bounds[s][0] : bounds[s][1]], args.batch_tokens)) for s in mine}
        bar = tqdm(
            total=sum(len(plans[s]) for s in mine) * steps,
            initial=sum(len(plans[s]) for s in mine if s not in todo) * steps,
            unit="step",
            desc="write",
            dynamic_ncols=True,
            disable=args.quiet or not ctx.is_main,
            file=sys.stderr,
        )
        bar.set_postfix_str("starting (the first step compiles and warms up)")
    meter = {"tokens": 0.0, "start": time.perf_counter()}
    try:
        for s in todo:
            lo, hi = bounds[s]
            shard_docs = [torch_long(d) for d in docs[lo:hi]]
            init = None if warm is None else warm[lo:hi]
            shard_log = None if log is None or log.path is None else (log, ids[lo:hi])
            if bar is None:
                memories, stats = _cram_shard(args, ctx, writer, shard_docs, init, shard_log)
            else:
                memories, stats = _fixed_shard(args, writer, shard_docs, plans[s], bar, meter, init, shard_log)
            fileio.save_shard(ckpt, s, memories, fingerprint, stats)
    finally:
        if bar is not None:
            bar.close()


def torch_long(doc):
    import torch

    return torch.as_tensor(doc, dtype=torch.long)


def _cram_shard(args, ctx, writer, shard_docs, init=None, shard_log=None):
    """One shard with a stop rule: continuous batching (``write_many(slots=...)``), stats from the writer."""
    import torch

    bar = not args.quiet and ctx.is_main
    results = list(
        writer.write_many(
            shard_docs,
            batch_tokens=args.batch_tokens,
            window=len(shard_docs),
            memory=init,
            on_document_check=None if shard_log is None else _check_logger(*shard_log),
            slots=args.slots,
            stats=True,
            progress=bar,
        )
    )
    memories = torch.stack([r.memory for r in results])
    tokens = torch.tensor([r.tokens for r in results], dtype=torch.int64)
    stats = {
        "loss_before": torch.tensor([r.initial_loss for r in results], dtype=torch.float32),
        "loss_after": torch.tensor([r.loss for r in results], dtype=torch.float32),
        "accuracy": torch.tensor([r.accuracy for r in results], dtype=torch.float32),
        "steps": torch.tensor([r.steps for r in results], dtype=torch.int64),
        "tokens": tokens,
        "exact": torch.tensor([r.exact for r in results], dtype=torch.uint8),
        "prefix": torch.tensor([r.prefix for r in results], dtype=torch.int64),
        "info_gain_bits": torch.tensor([r.info_gain_bits for r in results], dtype=torch.float32),
    }
    return memories, stats


def _check_logger(log, ids):
    """``--logdir``: a ``check`` record per document per check (``ids``: the shard's document ids)."""

    def record(index, step, loss, accuracy, exact, prefix):
        log.record("check", id=ids[index], step=step, loss=loss, accuracy=accuracy, exact=exact, prefix=prefix)

    return record


def _fixed_shard(args, writer, shard_docs, plan, bar, meter, init=None, shard_log=None):
    """One shard with a fixed step count (``--stop none``): the bar advances per step; stats scored after."""
    import torch

    from .inputs import resolve_write_head
    from .scoring import LN2, no_memory_tail, score_memories

    steps = writer.config.steps
    progress = _StepProgress(plan, [len(d) for d in shard_docs], steps, bar, meter, shard_log)
    # window = the whole shard: the batching depends on the shard only, so a resumed or sharded
    # run computes exactly the batches of an uninterrupted single-process run.
    memories = torch.stack(
        list(
            writer.write_many(
                shard_docs, batch_tokens=args.batch_tokens, window=len(shard_docs), memory=init, on_step=progress
            )
        )
    )
    head_weight, head_bias = resolve_write_head(writer.write_head, writer.model)
    n, given = len(shard_docs), writer.config.given_tokens
    loss_after, correct, prefix, tail = (torch.empty(n, dtype=torch.float64) for _ in range(4))
    for batch in plan:
        docs = [shard_docs[i] for i in batch]
        scores = score_memories(writer.model, memories[batch], docs, head_weight, head_bias, given_tokens=given)
        loss_after[batch], correct[batch] = scores.loss, scores.correct.double()
        prefix[batch], tail[batch] = scores.prefix.double(), scores.tail
    baseline = no_memory_tail(writer.model, head_weight, head_bias, shard_docs, given_tokens=given)
    # the scored tokens: those after the given ones
    tokens = torch.tensor([max(0, len(d) - given) for d in shard_docs], dtype=torch.int64)
    stats = {
        "loss_before": torch.tensor(progress.loss_before, dtype=torch.float32),
        "loss_after": loss_after.float(),
        "accuracy": (correct / tokens.clamp_min(1)).float(),
        "steps": torch.full((n,), steps, dtype=torch.int64),
        "tokens": tokens,
        "exact": (correct.long() == tokens).to(torch.uint8),
        "prefix": prefix.long(),
        "info_gain_bits": ((baseline - tail) / LN2).float(),
    }
    return memories, stats


def _merge(args, model, tokenizer, config, writer, ids, docs, bounds, ckpt, fingerprint, signature, eos, records):
    """Rank 0: stream every shard, in input order, into the output memory file (or dataset folder);
    returns the doc stats."""
    import torch

    from . import fileio
    from .models import describe_tokenizer

    def load(s):
        """Shard ``s`` of this run (it must exist once every rank is done)."""
        shard = fileio.load_shard(ckpt, s, fingerprint, bounds[s][1] - bounds[s][0])
        if shard is None:
            raise UserError(
                f"shard {s} is missing from {ckpt}: with several machines, the output must be on a "
                "file system every rank sees"
            )
        return shard

    # The per-document stats are small: one pass gathers them (and checks that every shard is there).
    stats = {name: [] for name in fileio.DOC_STATS}
    first = None
    for s in range(len(bounds)):
        shard = load(s)
        first = shard["memories"] if first is None else first
        for name in fileio.DOC_STATS:
            stats[name].append(shard[name])
    stats = {name: torch.cat(parts) for name, parts in stats.items()}
    shape = (len(docs), first.shape[1], first.shape[2])

    def chunks():
        """Shards' memories in input order (streamed: the whole file is never in memory)."""
        for s in range(len(bounds)):
            yield first if s == 0 else load(s)["memories"]

    acc = stats["accuracy"]
    metadata = {
        "format": fileio.FORMAT,
        "format_version": fileio.FORMAT_VERSION,
        "model": args.model,
        "model_type": getattr(model.config, "model_type", ""),
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "num_documents": len(docs),
        "num_memory_tokens": config.num_memory_tokens,
        "config": json.dumps(dataclasses.asdict(config)),
        "tokenizer": json.dumps(describe_tokenizer(tokenizer), sort_keys=True),
        "versions": json.dumps(_versions(), sort_keys=True),
        "text_field": args.text_field,
        "id_field": args.id_field,
        "max_length": "" if args.max_length is None else args.max_length,
        "model_dtype": str(model.dtype),
        "init_from": getattr(args, "init_from", None) or "",
        "backend": writer.backend,
        "tokens": sum(len(d) for d in docs),
        "append_eos": "1" if eos is not None else "0",
        "eos_token_id": "" if eos is None else eos,
        "weights_signature": json.dumps(signature),
        "weights_digest": signature_digest(signature),
        "model_config": json.dumps(model_config_summary(model.config), sort_keys=True),
        "mean_accuracy": f"{float(acc.double().mean()):.6f}",
        "documents_below_100": int((acc < 1).sum()),
    }
    if getattr(args, "output_format", "safetensors") == "dataset":
        from .dataset_files import write_memory_dataset

        texts = [r.text for r in records]
        write_memory_dataset(args.output, chunks(), shape, first.dtype, ids, texts, docs, stats, metadata)
    else:
        fileio.write_memory_file(args.output, chunks(), shape, first.dtype, ids, metadata, extra=stats)
    return stats


# --- read -------------------------------------------------------------------------------------------------


def add_read_arguments(p):
    """Options of ``gradmem-fast read``."""
    p.add_argument("--model", required=True, help="the model the memories were written with")
    p.add_argument(
        "--memories",
        required=True,
        help="memory file written by `gradmem-fast write` (or its dataset folder, --output-format dataset)",
    )
    p.add_argument("--queries", required=True, help='JSON lines: {"id": document id, "text": query}')
    p.add_argument("--output", required=True, help="JSON lines: one {id, query, answer} per query")
    p.add_argument("--force", action="store_true", help="replace --output if it exists (never an input file)")
    p.add_argument("--text-field", default="text", help="field holding a query's text (default: text)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per query (default 32)")
    p.add_argument(
        "--stop-at-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop an answer when the model emits its end-of-text token (default: on; memories "
        "written with --append-eos end their document with it)",
    )
    p.add_argument(
        "--verify",
        default=None,
        metavar="DOCS",
        help="the documents the memories were written from (JSON lines, as given to write; "
        "its text and id fields are the ones write used): every "
        "query with empty text is decoded greedily from its memory alone and its answer line "
        'says whether it reproduces its document exactly ("reproduces", "token_accuracy")',
    )
    p.add_argument(
        "--allow-model-mismatch",
        action="store_true",
        help="read even when --model is not the model the memories were written with (a warning)",
    )
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="queries per batch (default 16)")
    p.add_argument("--doc-batch", type=int, default=64, help="memories prefilled together (default 64)")
    p.add_argument("--dtype", default="auto", help="model dtype (see write)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _match_ids(queries, memory_ids, path):
    """Row of each query's document in the memory file (ids compare exactly, then as strings)."""
    exact = {doc_id: row for row, doc_id in enumerate(memory_ids)}
    loose = {}
    for row, doc_id in enumerate(memory_ids):
        loose.setdefault(str(doc_id), row)
    rows, unknown = [], []
    for q in queries:
        row = exact.get(q.id, loose.get(str(q.id)))
        if row is None:
            unknown.append(q)
        rows.append(row)
    if unknown:
        shown = ", ".join(f"line {q.line} id {json.dumps(q.id)}" for q in unknown[:5])
        raise UserError(
            f"{len(unknown)} quer{'y' if len(unknown) == 1 else 'ies'} name documents that are not in {path}: {shown}"
        )
    return rows


def _verify_documents(args, memfile, queries, rows):
    """For ``--verify``: the text of the document behind each empty query (None for the other queries)."""
    from . import fileio

    meta = memfile.metadata
    records = fileio.read_jsonl(
        args.verify, meta.get("text_field") or "text", meta.get("id_field") or "id", what="--verify documents"
    )
    by_id = {}
    for r in records:
        by_id.setdefault(r.id, r.text)
        by_id.setdefault(str(r.id), r.text)
    texts = []
    for q, row in zip(queries, rows):
        if q.text:
            texts.append(None)
            continue
        doc_id = memfile.ids[row]
        text = by_id.get(doc_id, by_id.get(str(doc_id)))
        if text is None:
            raise UserError(
                f"--verify {args.verify}: no document with id {json.dumps(doc_id)} (asked for on "
                f"{args.queries}:{q.line})"
            )
        texts.append(text)
    if all(t is None for t in texts):
        _warn("read", "--verify checks only queries with empty text (decoding from the memory alone); there are none")
    return texts


def _check_model_against_file(args, memfile, model_config, model=None):
    """Refuse (or, with --allow-model-mismatch, warn about) a model other than the one that wrote the file.

    Without ``model`` the config is compared (before the weights load); with it, the weights signature.
    """
    meta = memfile.metadata
    if model is None:
        try:
            recorded = json.loads(meta.get("model_config") or "{}")
        except json.JSONDecodeError:
            recorded = {}
        reason = _config_mismatch(recorded, model_config) if isinstance(recorded, dict) else None
    else:
        try:
            expected = json.loads(meta["weights_signature"]) if meta.get("weights_signature") else None
        except json.JSONDecodeError:
            expected = None
        if expected is None:
            _warn(
                "read",
                f"{args.memories} records no weights signature (written by an older gradmem-fast): "
                "cannot check that --model is the model that wrote it",
            )
            return
        reason = signature_mismatch(expected, weights_signature(model))
    if reason is None:
        return
    message = (
        f"{args.memories} was written with another model ({meta.get('model', '?')!r}): {reason}; read with "
        "the model that wrote it"
    )
    if not args.allow_model_mismatch:
        raise UserError(message + " (or pass --allow-model-mismatch)")
    _warn("read", message.split("; read with")[0] + " (--allow-model-mismatch: reading anyway)")


def cmd_read(args) -> int:
    """``gradmem-fast read``: answer queries from the memories alone, one JSON line per query."""
    from . import fileio
    from .models import load_model, load_tokenizer, max_positions

    # 1. Options, paths and files: no model needed.
    _positive_int("--max-new-tokens", args.max_new_tokens, minimum=0)
    _positive_int("--batch-size", args.batch_size)
    _positive_int("--doc-batch", args.doc_batch)
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 < args.temperature < float("inf"):
        raise UserError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.verify and args.do_sample:
        raise UserError("--verify decodes greedily (is the document reproduced?): leave out --do-sample")
    inputs = [("--memories", args.memories), ("--queries", args.queries), ("--verify", args.verify)]
    fileio.check_output(args.output, inputs, args.force)
    from .dataset_files import open_memories

    memfile = open_memories(args.memories)
    queries = fileio.read_jsonl(args.queries, args.text_field, "id", require_id=True, unique_ids=False, what="queries")
    rows = _match_ids(queries, memfile.ids, args.memories)
    verify_texts = _verify_documents(args, memfile, queries, rows) if args.verify else [None] * len(queries)
    device = _device_and_dtype(args)

    # 2. Tokenizer and config: the model is checked against the file, the texts against the positions.
    quiet_transformers()
    tokenizer, model_config = load_tokenizer(args.model)
    n_docs, m, d = memfile.shape
    width = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
    if width is not None and d != width:
        raise UserError(
            f"{args.memories} holds memories of width {d} written with model "
            f"{memfile.metadata.get('model', '?')!r}; --model {args.model!r} has width {width}: read "
            "with the model that wrote them"
        )
    _check_model_against_file(args, memfile, model_config)
    limit = max_positions(model_config)
    tokens = [tokenizer(q.text, add_special_tokens=False).input_ids if q.text else [] for q in queries]
    for q, t in zip(queries, tokens):
        if limit is not None and m + len(t) >= limit:
            raise UserError(
                f"{args.queries}:{q.line}: query of {len(t)} tokens does not fit the model's {limit} "
                f"positions after {m} memory vectors"
            )
    max_length = memfile.metadata.get("max_length")
    appended = memfile.metadata.get("append_eos") == "1"
    targets = [None if text is None else tokenizer(text, add_special_tokens=False).input_ids for text in verify_texts]
    if max_length:
        targets = [None if t is None else t[: int(max_length)] for t in targets]

    # 3. The weights.
    import torch
    from tqdm import tqdm

    from .reader import MemoryReader

    model, tokenizer = load_model(args.model, args.dtype, device, tokenizer=tokenizer)
    if width is None and d != model.get_input_embeddings().weight.shape[1]:
        raise UserError(
            f"{args.memories} holds memories of width {d}; --model {args.model!r} has width "
            f"{model.get_input_embeddings().weight.shape[1]}: read with the model that wrote them"
        )
    _check_model_against_file(args, memfile, model_config, model)
    eos = set()
    if args.stop_at_eos:
        for source in (
            tokenizer.eos_token_id,
            getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        ):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, (list, tuple)):
                eos.update(int(e) for e in source)
    # A verified document is decoded to its own length, plus its end-of-text token when it was written.
    budgets = [args.max_new_tokens if t is None else len(t) + (1 if appended and eos else 0) for t in targets]
    generator = torch.Generator().manual_seed(args.seed)
    reader = MemoryReader(model, tokenizer)

    by_doc = {}
    for qi, row in enumerate(rows):
        by_doc.setdefault(row, []).append(qi)
    doc_rows = sorted(by_doc)
    answers, generated_ids = [None] * len(queries), [None] * len(queries)
    bar = tqdm(total=len(queries), unit="query", desc="read", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    try:
        for g in range(0, len(doc_rows), args.doc_batch):
            group = doc_rows[g : g + args.doc_batch]
            # One prefill per memory; its cache rows are reused by every query of that document.
            prefix = reader.prefix(memfile.rows(group).to(device))
            order = [(local, qi) for local, row in enumerate(group) for qi in by_doc[row]]
            for b in range(0, len(order), args.batch_size):
                batch = order[b : b + args.batch_size]
                generated = reader.generate(
                    prefix,
                    [local for local, _ in batch],
                    [tokens[qi] for _, qi in batch],
                    max_new_tokens=max(budgets[qi] for _, qi in batch),
                    do_sample=args.do_sample,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    eos_token_id=eos,
                    generator=generator,
                    max_length=limit,
                )
                for (_, qi), gen in zip(batch, generated):
                    # Generation is causal per row: cutting at a row's own budget equals generating less.
                    generated_ids[qi] = gen[: budgets[qi]]
                    answers[qi] = tokenizer.decode(generated_ids[qi], skip_special_tokens=True)
                bar.update(len(batch))
    finally:
        bar.close()
    verified = exact = 0
    with fileio.atomic_output(args.output) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for qi, (q, answer) in enumerate(zip(queries, answers)):
                line = {"id": q.id, "query": q.text, "answer": answer}
                if targets[qi] is not None:
                    target, gen = targets[qi], generated_ids[qi]
                    line["reproduces"] = list(gen) == list(target)
                    line["token_accuracy"] = sum(a == b for a, b in zip(gen, target)) / max(1, len(target))
                    verified, exact = verified + 1, exact + line["reproduces"]
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    if args.verify:
        print(f"verify: {exact} of {verified} memories reproduce their document exactly", file=sys.stderr)
    if not args.quiet:
        print(f"answered {len(queries)} queries from {len(doc_rows)} memories into {args.output}", file=sys.stderr)
    return 0


# --- entry point ------------------------------------------------------------------------------------------


def build_parser():
    """The argument parser of every command."""
    from . import demo

    parser = argparse.ArgumentParser(
        prog=PROG, description="GradMem: write documents into memory vectors, read answers from them."
    )
    parser.add_argument("--version", action=_VersionAction, help="print the versions and exit")
    sub = parser.add_subparsers(dest="command", metavar="{write,read,demo,capacity}")
    add_write_arguments(
        sub.add_parser("write", help="write documents (JSON lines) into a memory file", description=cmd_write.__doc__)
    )
    add_read_arguments(sub.add_parser("read", help="answer queries from a memory file", description=cmd_read.__doc__))
    demo.add_arguments(
        sub.add_parser(
            "demo",
            help="cram a few paragraphs into memory and decode them back",
            description=demo.__doc__.splitlines()[0],
        )
    )
    from . import capacity

    capacity.add_arguments(
        sub.add_parser(
            "capacity",
            help="find how many tokens N memory vectors hold exactly, per text",
            description=capacity.__doc__.splitlines()[0],
        )
    )
    return parser


def main(argv=None) -> int:
    """Run one command; returns the exit status (0 ok, 2 bad input or usage, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in ("write", "read", "demo", "capacity"):
        parser.print_usage(sys.stderr)
        print(f"{PROG}: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports usage errors (and --help) by exiting
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        return 2
    from . import capacity, demo

    handler = {"write": cmd_write, "read": cmd_read, "demo": demo.run_from_args, "capacity": capacity.run}[args.command]
    try:
        return handler(args)
    except UserError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        extra = " (finished shards are kept: rerun the same command to resume)" if args.command == "write" else ""
        print(f"{PROG} {args.command}: interrupted{extra}", file=sys.stderr)
        return 130
