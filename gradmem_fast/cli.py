"""Command line: ``gradmem-fast write | read | demo`` (also ``python -m gradmem_fast ...``).

    gradmem-fast write --model NAME_OR_DIR --input docs.jsonl --output memories.safetensors [options]
    gradmem-fast read  --model NAME_OR_DIR --memories memories.safetensors --queries q.jsonl --output a.jsonl
    gradmem-fast demo  [--model NAME_OR_DIR]
    torchrun --nproc-per-node N -m gradmem_fast write ...      (documents sharded over the processes)

Input decisions (also in ``--help``):

- An empty document (empty or whitespace-only text, or text that tokenizes to no token) is rejected with
  its line number; ``--skip-empty`` skips such lines with a warning instead (the other ids are kept).
- A document longer than the model's positions allow (minus the memory) is rejected with advice to pass
  ``--max-length N``; with ``--max-length``, longer documents are truncated to N tokens with a warning.
- Documents are tokenized without special tokens: the memory takes the place of a BOS token.
- A query may have empty text: the answer is then decoded from the memory alone.

Problems with the user's input print one ``error:`` line and exit with status 2, with no traceback and
no output file (outputs are written to a temporary file and renamed only when complete). A killed
``write`` keeps its finished shards in ``OUTPUT.partial/``; rerunning the same command resumes there and
produces the same file as an uninterrupted run.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time

from .errors import UserError

PROG = "gradmem-fast"


def _warn(command, message):
    """Print a warning line on stderr (the command goes on)."""
    print(f"{PROG} {command}: warning: {message}", file=sys.stderr, flush=True)


def _quiet_transformers():
    """Keep the command's own messages readable: no library progress bars or info-level chatter."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _versions() -> dict:
    """Versions of the libraries that shape the numbers, for the memory file's metadata."""
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {"gradmem_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


# --- write ------------------------------------------------------------------------------------------------

def add_write_arguments(p):
    """Options of ``gradmem-fast write``."""
    p.add_argument("--model", required=True, help="Hugging Face model name, a local directory, or "
                   "smollm2-135m-instruct (the embedded GGUF model)")
    p.add_argument("--input", required=True, help="JSON lines, one document per line")
    p.add_argument("--output", required=True, help="memory file to write (safetensors)")
    p.add_argument("--text-field", default="text", help="field holding a document's text (default: text)")
    p.add_argument("--id-field", default="id", help="field holding a document's id (default: id; "
                   "missing ids default to the 0-based line number)")
    p.add_argument("--memory-tokens", type=int, default=8, help="memory vectors per document (m, default 8)")
    p.add_argument("--steps", type=int, default=5, help="gradient steps per write (K, default 5)")
    p.add_argument("--lr", type=float, default=1e-2, help="step size (default 0.01)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--clip-value", type=float, default=None, help="clamp gradient entries to +-VALUE")
    p.add_argument("--clip-norm", type=float, default=None, help="per-document gradient norm clip")
    p.add_argument("--init-std", type=float, default=0.02, help="std of the initial memory (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial memory (default 0)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (bfloat16 on CUDA, float32 on CPU), "
                   "float32, bfloat16, float16, float64")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                   help="auto: triton kernels on CUDA, the torch reference on CPU")
    p.add_argument("--batch-tokens", type=int, default=16384,
                   help="max packed tokens (memory included) per batch (default 16384)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate documents to this many tokens (with a warning); without it a document "
                        "longer than the model's positions is an error")
    p.add_argument("--skip-empty", action="store_true",
                   help="skip empty documents with a warning (default: an empty document is an error)")
    p.add_argument("--shard-size", type=int, default=256,
                   help="documents per checkpoint shard: the unit of resuming and of multi-process "
                        "sharding (default 256)")
    p.add_argument("--force", action="store_true", help="replace --output if it exists (never an input file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _positive_int(name, value, minimum=1):
    """Reject an integer option below ``minimum`` with a message naming the flag."""
    if value is None or value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")


def _write_config(args):
    """The WriteConfig of the write options; bad values become messages naming the flag."""
    from .config import WriteConfig

    _positive_int("--memory-tokens", args.memory_tokens)
    _positive_int("--steps", args.steps)
    if not args.lr >= 0 or args.lr == float("inf"):
        raise UserError(f"--lr must be a finite number >= 0, got {args.lr}")
    for flag, value in (("--clip-value", args.clip_value), ("--clip-norm", args.clip_norm)):
        if value is not None and not 0 < value < float("inf"):
            raise UserError(f"{flag} must be a finite number > 0, got {value}")
    if not 0 <= args.init_std < float("inf"):
        raise UserError(f"--init-std must be a finite number >= 0, got {args.init_std}")
    try:
        return WriteConfig(num_memory_tokens=args.memory_tokens, steps=args.steps, lr=args.lr,
                           optimizer=args.optimizer, clip_value=args.clip_value, clip_norm=args.clip_norm,
                           init_std=args.init_std, seed=args.seed)
    except (TypeError, ValueError) as exc:
        raise UserError(f"invalid write options: {exc}") from None


def _tokenize_documents(args, records, tokenizer, limit, command="write"):
    """Token lists of the documents, after the empty/too-long decisions (see the module docstring)."""
    texts = [r.text for r in records]
    token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    kept_records, docs, truncated = [], [], 0
    for record, tokens in zip(records, token_lists):
        if not record.text.strip() or not tokens:
            if args.skip_empty:
                _warn(command, f"{args.input}:{record.line}: empty document (id {json.dumps(record.id)}) skipped")
                continue
            raise UserError(f"{args.input}:{record.line}: empty document (id {json.dumps(record.id)}); remove it "
                            "or pass --skip-empty")
        if args.max_length is not None and len(tokens) > args.max_length:
            tokens = tokens[: args.max_length]
            truncated += 1
        elif limit is not None and len(tokens) > limit:
            raise UserError(f"{args.input}:{record.line}: document {json.dumps(record.id)} has {len(tokens)} tokens; "
                            f"with {args.memory_tokens} memory vectors the model takes at most {limit}: pass "
                            f"--max-length {limit} to truncate")
        kept_records.append(record)
        docs.append(list(tokens))
    if truncated:
        _warn(command, f"{truncated} document(s) truncated to --max-length {args.max_length} tokens")
    if not docs:
        raise UserError(f"{args.input}: no non-empty document to write")
    return kept_records, docs


def _weights_digest(model) -> str:
    """A cheap digest of the model's weights (per-tensor sums), so that shards written with other weights
    in the same directory are not reused on resume."""
    import torch

    with torch.no_grad():
        stats = [torch.stack([p.double().sum(), p.double().abs().sum()]) for p in model.parameters()]
        values = torch.stack(stats).cpu().flatten().tolist() if stats else []
    # Rounded: the summation order (thread count, device) must not change the digest between ranks.
    return hashlib.sha256(json.dumps([f"{v:.6g}" for v in values]).encode()).hexdigest()


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
    from . import distributed, fileio
    from .models import load_model, max_positions, resolve_device

    config = _write_config(args)
    _positive_int("--batch-tokens", args.batch_tokens)
    _positive_int("--shard-size", args.shard_size)
    if args.max_length is not None:
        _positive_int("--max-length", args.max_length)
    fileio.check_output(args.output, [("--input", args.input)], args.force)
    ckpt = fileio.checkpoint_dir(args.output)
    if os.path.lexists(ckpt) and not os.path.isdir(ckpt):
        raise UserError(f"{ckpt!r} (where an unfinished write keeps its shards) exists and is not a directory")
    records = fileio.read_jsonl(args.input, args.text_field, args.id_field)

    ctx = distributed.from_environment()
    device = resolve_device(args.device, ctx.local_rank)
    _quiet_transformers()
    import torch

    from .writer import MemoryWriter

    model, tokenizer = load_model(args.model, args.dtype, device)
    positions = max_positions(model)
    limit = None if positions is None else positions - config.num_memory_tokens
    if limit is not None and limit < 1:
        raise UserError(f"--memory-tokens {config.num_memory_tokens} leaves no room for text in the model's "
                        f"{positions} positions")
    if args.max_length is not None and limit is not None and args.max_length > limit:
        raise UserError(f"--max-length {args.max_length} is longer than the model allows with "
                        f"{config.num_memory_tokens} memory vectors ({limit})")
    records, docs = _tokenize_documents(args, records, tokenizer, limit)
    try:
        writer = MemoryWriter(model, config, backend=args.backend)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"cannot write with model {args.model!r}: {exc}") from None

    ids = [r.id for r in records]
    settings = {"format": fileio.FORMAT_VERSION, "model": args.model, "dtype": str(model.dtype),
                "device": torch.device(device).type, "backend": writer.backend,
                "config": dataclasses.asdict(config), "batch_tokens": args.batch_tokens,
                "shard_size": args.shard_size, "weights": _weights_digest(model)}
    fingerprint = _fingerprint(settings, ids, docs)
    num_shards = (len(docs) + args.shard_size - 1) // args.shard_size
    bounds = [(s * args.shard_size, min(len(docs), (s + 1) * args.shard_size)) for s in range(num_shards)]

    ctx = distributed.start(ctx, device)
    try:
        os.makedirs(ckpt, exist_ok=True)
        mine = ctx.my_shards(num_shards)
        todo = [s for s in mine if fileio.load_shard(ckpt, s, fingerprint, bounds[s][1] - bounds[s][0]) is None]
        resumed = len(mine) - len(todo)
        if resumed and ctx.is_main:
            _warn("write", f"resuming: {resumed} of {len(mine)} shard(s) already written in {ckpt}")
        _write_shards(args, ctx, writer, docs, bounds, todo, mine, ckpt, fingerprint)
        if ctx.world_size > 1 and not args.quiet:
            print(f"rank {ctx.rank}/{ctx.world_size}: wrote {len(todo)} shard(s), "
                  f"{sum(bounds[s][1] - bounds[s][0] for s in todo)} document(s)", file=sys.stderr, flush=True)
        distributed.barrier(ctx)
        if ctx.is_main:
            _merge(args, model, tokenizer, config, writer, ids, docs, bounds, ckpt, fingerprint)
            fileio.remove_checkpoint(ckpt)
    finally:
        distributed.stop(ctx)
    if ctx.is_main and not args.quiet:
        print(f"wrote {len(docs)} memories [{len(docs)}, {config.num_memory_tokens}, {model.config.hidden_size}] "
              f"to {args.output}", file=sys.stderr)
    return 0


def _write_shards(args, ctx, writer, docs, bounds, todo, mine, ckpt, fingerprint):
    """Write this rank's unfinished shards, each atomically, with a progress bar on rank 0."""
    import torch
    from tqdm import tqdm

    from . import fileio

    my_docs = sum(bounds[s][1] - bounds[s][0] for s in mine)
    done_docs = my_docs - sum(bounds[s][1] - bounds[s][0] for s in todo)
    bar = tqdm(total=my_docs, initial=done_docs, unit="doc", desc="write", dynamic_ncols=True,
               disable=args.quiet or not ctx.is_main, file=sys.stderr)
    start, tokens = time.perf_counter(), 0
    try:
        for s in todo:
            lo, hi = bounds[s]
            shard_docs = [torch.as_tensor(d, dtype=torch.long) for d in docs[lo:hi]]
            # window = the whole shard: the batching depends on the shard only, so a resumed or sharded
            # run computes exactly the batches of an uninterrupted single-process run.
            memories = list(writer.write_many(shard_docs, batch_tokens=args.batch_tokens, window=len(shard_docs)))
            fileio.save_shard(ckpt, s, torch.stack(memories), fingerprint)
            tokens += sum(len(d) for d in docs[lo:hi])
            bar.update(hi - lo)
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):.0f} tok/s")
    finally:
        bar.close()


def _merge(args, model, tokenizer, config, writer, ids, docs, bounds, ckpt, fingerprint):
    """Rank 0: stream every shard, in input order, into the output memory file."""
    from . import fileio
    from .models import describe_tokenizer

    first = fileio.load_shard(ckpt, 0, fingerprint, bounds[0][1] - bounds[0][0])
    if first is None:
        raise UserError(f"shard 0 is missing from {ckpt}: with several machines, the output must be on a "
                        "file system every rank sees")
    shape = (len(docs), first.shape[1], first.shape[2])

    def chunks():
        """Shards in input order (shard 0 already loaded to learn the shape)."""
        yield first
        for s in range(1, len(bounds)):
            shard = fileio.load_shard(ckpt, s, fingerprint, bounds[s][1] - bounds[s][0])
            if shard is None:
                raise UserError(f"shard {s} is missing from {ckpt}: with several machines, the output must be "
                                "on a file system every rank sees")
            yield shard

    metadata = {
        "format": fileio.FORMAT, "format_version": fileio.FORMAT_VERSION, "model": args.model,
        "model_type": getattr(model.config, "model_type", ""), "hidden_size": model.config.hidden_size,
        "vocab_size": model.get_input_embeddings().weight.shape[0], "num_documents": len(docs),
        "num_memory_tokens": config.num_memory_tokens, "config": json.dumps(dataclasses.asdict(config)),
        "tokenizer": json.dumps(describe_tokenizer(tokenizer), sort_keys=True),
        "versions": json.dumps(_versions(), sort_keys=True), "text_field": args.text_field,
        "max_length": "" if args.max_length is None else args.max_length, "model_dtype": str(model.dtype),
        "backend": writer.backend, "tokens": sum(len(d) for d in docs),
    }
    fileio.write_memory_file(args.output, chunks(), shape, first.dtype, ids, metadata)


# --- read -------------------------------------------------------------------------------------------------

def add_read_arguments(p):
    """Options of ``gradmem-fast read``."""
    p.add_argument("--model", required=True, help="the model the memories were written with")
    p.add_argument("--memories", required=True, help="memory file written by `gradmem-fast write`")
    p.add_argument("--queries", required=True, help='JSON lines: {"id": document id, "text": query}')
    p.add_argument("--output", required=True, help="JSON lines: one {id, query, answer} per query")
    p.add_argument("--text-field", default="text", help="field holding a query's text (default: text)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per query (default 32)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="queries per batch (default 16)")
    p.add_argument("--doc-batch", type=int, default=64, help="memories prefilled together (default 64)")
    p.add_argument("--dtype", default="auto", help="model dtype (see write)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--force", action="store_true", help="replace --output if it exists (never an input file)")
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
        raise UserError(f"{len(unknown)} quer{'y' if len(unknown) == 1 else 'ies'} name documents that are not in "
                        f"{path}: {shown}")
    return rows


def cmd_read(args) -> int:
    """``gradmem-fast read``: answer queries from the memories alone, one JSON line per query."""
    from . import fileio
    from .models import load_model, max_positions, resolve_device

    _positive_int("--max-new-tokens", args.max_new_tokens, minimum=0)
    _positive_int("--batch-size", args.batch_size)
    _positive_int("--doc-batch", args.doc_batch)
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 < args.temperature < float("inf"):
        raise UserError(f"--temperature must be a finite number > 0, got {args.temperature}")
    fileio.check_output(args.output, [("--memories", args.memories), ("--queries", args.queries)], args.force)
    memfile = fileio.MemoryFile(args.memories)
    queries = fileio.read_jsonl(args.queries, args.text_field, "id", require_id=True, unique_ids=False,
                                what="queries")
    rows = _match_ids(queries, memfile.ids, args.memories)

    _quiet_transformers()
    import torch
    from tqdm import tqdm

    from .reader import MemoryReader

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, args.dtype, device)
    width = model.get_input_embeddings().weight.shape[1]
    n_docs, m, d = memfile.shape
    if d != width:
        raise UserError(f"{args.memories} holds memories of width {d} written with model "
                        f"{memfile.metadata.get('model', '?')!r}; --model {args.model!r} has width {width}: read "
                        "with the model that wrote them")
    if memfile.metadata.get("model") not in (None, args.model):
        _warn("read", f"the memories were written with model {memfile.metadata['model']!r}, reading with "
                      f"{args.model!r}")
    limit = max_positions(model)
    tokens = [tokenizer(q.text, add_special_tokens=False).input_ids if q.text else [] for q in queries]
    for q, t in zip(queries, tokens):
        if limit is not None and m + len(t) >= limit:
            raise UserError(f"{args.queries}:{q.line}: query of {len(t)} tokens does not fit the model's {limit} "
                            f"positions after {m} memory vectors")
    eos = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, (list, tuple)):
            eos.update(int(e) for e in source)
    generator = torch.Generator().manual_seed(args.seed)
    reader = MemoryReader(model, tokenizer)

    by_doc = {}
    for qi, row in enumerate(rows):
        by_doc.setdefault(row, []).append(qi)
    doc_rows = sorted(by_doc)
    answers = [None] * len(queries)
    bar = tqdm(total=len(queries), unit="query", desc="read", disable=args.quiet, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for g in range(0, len(doc_rows), args.doc_batch):
            group = doc_rows[g:g + args.doc_batch]
            # One prefill per memory; its cache rows are reused by every query of that document.
            prefix = reader.prefix(memfile.rows(group).to(device))
            order = [(local, qi) for local, row in enumerate(group) for qi in by_doc[row]]
            for b in range(0, len(order), args.batch_size):
                batch = order[b:b + args.batch_size]
                generated = reader.generate(prefix, [local for local, _ in batch], [tokens[qi] for _, qi in batch],
                                            max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                            eos_token_id=eos, generator=generator, max_length=limit)
                for (_, qi), gen in zip(batch, generated):
                    answers[qi] = tokenizer.decode(gen, skip_special_tokens=True)
                bar.update(len(batch))
    finally:
        bar.close()
    with fileio.atomic_output(args.output) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for q, answer in zip(queries, answers):
                fh.write(json.dumps({"id": q.id, "query": q.text, "answer": answer}, ensure_ascii=False) + "\n")
    if not args.quiet:
        print(f"answered {len(queries)} queries from {len(doc_rows)} memories into {args.output}", file=sys.stderr)
    return 0


# --- entry point ------------------------------------------------------------------------------------------

def build_parser():
    """The argument parser of every command."""
    from . import demo

    parser = argparse.ArgumentParser(prog=PROG, description="GradMem: write documents into memory vectors, "
                                     "read answers from them.")
    sub = parser.add_subparsers(dest="command", metavar="{write,read,demo}")
    add_write_arguments(sub.add_parser("write", help="write documents (JSON lines) into a memory file",
                                       description=cmd_write.__doc__))
    add_read_arguments(sub.add_parser("read", help="answer queries from a memory file",
                                      description=cmd_read.__doc__))
    demo.add_arguments(sub.add_parser("demo", help="cram a few paragraphs into memory and decode them back",
                                      description=demo.__doc__.splitlines()[0]))
    return parser


def main(argv=None) -> int:
    """Run one command; returns the exit status (0 ok, 2 bad input or usage, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in ("write", "read", "demo"):
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
    from . import demo

    handler = {"write": cmd_write, "read": cmd_read, "demo": demo.run_from_args}[args.command]
    try:
        return handler(args)
    except UserError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        extra = " (finished shards are kept: rerun the same command to resume)" if args.command == "write" else ""
        print(f"{PROG} {args.command}: interrupted{extra}", file=sys.stderr)
        return 130
