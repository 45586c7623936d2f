"""Cramming benchmark: early exit with continuous batching against a fixed step count, same documents.

    python -m benchmarks.bench_cramming --count 24 --slots 8 --out benchmarks/results/<date>-cramming

Both runs write the same paragraphs (``data/cramming/paragraphs.jsonl``, the tokenizer's end-of-text token
appended, as ``gradmem-fast write`` does) into ``--memory-tokens`` vectors of a frozen LM with Adam:

* fixed:      every paragraph takes ``--steps`` steps, ``--slots`` paragraphs per batch (the recipe of
              ``gradmem-fast write`` before stop rules existed);
* early exit: ``StopRule(exact=True, check_every)``: a paragraph stops when greedy decoding from its memory
              reproduces it, and the next waiting paragraph takes its slot (``write_many(slots=...)``).

Reported: wall time and process CPU time of each write (on a shared machine, CPU time with one thread is
the fairer measure: it does not count the time other processes hold the cores), the exact-decode rate of
each (teacher-forced argmax on every token,
which is greedy decoding's result; ``gradmem_fast.scoring``), per-paragraph steps, and the speedup. Writes
``results.json`` and ``table.md`` under ``--out``.
"""

import argparse
import dataclasses
import json
import os
import platform
import time

import torch

from gradmem_fast import MemoryWriter
from gradmem_fast.config import SCHEDULES, Schedule, StopRule, WriteConfig, default_check_every
from gradmem_fast.models import EMBEDDED_MODEL, load_model, quiet_transformers
from gradmem_fast.reader import teacher_forced

HERE = os.path.dirname(os.path.abspath(__file__))
PARAGRAPHS = os.path.join(os.path.dirname(HERE), "data", "cramming", "paragraphs.jsonl")


def load_paragraphs(path: str, count: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if count > len(rows):
        raise SystemExit(f"--count {count}: {path} has only {len(rows)} paragraphs")
    return rows[:count]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--paragraphs", default=PARAGRAPHS)
    p.add_argument("--count", type=int, default=24)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--memory-tokens", type=int, default=8)
    p.add_argument("--init-std", type=float, default=0.02, help="std of the initial memory (as the CLI)")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant", help="lr schedule per paragraph")
    p.add_argument("--warmup", type=int, default=0, help="schedule warmup steps")
    p.add_argument("--final-lr", type=float, default=0.0, help="schedule's final factor (fraction of --lr)")
    p.add_argument("--check-every", type=int, default=None, help="default: 1 on a CPU, 10 on a GPU (as the CLI)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip-fixed", action="store_true", help="only the early-exit run (a quick look)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_every is None:
        args.check_every = default_check_every(args.device)
    quiet_transformers()
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    rows = load_paragraphs(args.paragraphs, args.count)
    eos = tokenizer.eos_token_id
    docs = [torch.tensor(tokenizer(r["text"], add_special_tokens=False).input_ids + [eos]) for r in rows]
    schedule = None
    if args.schedule != "constant" or args.warmup:
        schedule = Schedule(args.schedule, warmup=args.warmup, final=args.final_lr)
    base = dict(
        num_memory_tokens=args.memory_tokens,
        steps=args.steps,
        lr=args.lr,
        optimizer="adam",
        init_std=args.init_std,
        schedule=schedule,
    )
    print(
        f"{len(docs)} paragraphs of {min(map(len, docs))}-{max(map(len, docs))} tokens, {args.slots} slots, "
        f"Adam lr {args.lr}, at most {args.steps} steps, m={args.memory_tokens}, {args.device} {args.dtype}",
        flush=True,
    )

    early_config = WriteConfig(**base, stop=StopRule(exact=True, check_every=args.check_every))
    writer = MemoryWriter(model, early_config)
    t0, c0 = time.perf_counter(), time.process_time()
    early = list(writer.write_many(docs, slots=args.slots, stats=True, progress=True))
    early_s, early_cpu = time.perf_counter() - t0, time.process_time() - c0
    early_exact = [d.exact for d in early]
    print(
        f"early exit: {early_s:.1f} s ({early_cpu:.1f} s CPU), {sum(early_exact)}/{len(docs)} exact, "
        f"steps {[d.steps for d in early]}",
        flush=True,
    )

    result = {
        "model": args.model if args.model != EMBEDDED_MODEL else "SmolLM2-135M-Instruct (embedded GGUF)",
        "device": args.device if args.device != "cpu" else f"cpu ({os.cpu_count()} cores{_processor()})",
        "dtype": args.dtype,
        "paragraphs": len(docs),
        "tokens": [len(d) for d in docs],
        "slots": args.slots,
        "max_steps": args.steps,
        "lr": args.lr,
        "init_std": args.init_std,
        "schedule": None if schedule is None else dataclasses.asdict(schedule),
        "memory_tokens": args.memory_tokens,
        "check_every": args.check_every,
        "backend": writer.backend,
        "early_exit": {
            "seconds": early_s,
            "cpu_seconds": early_cpu,
            "exact": early_exact,
            "steps": [d.steps for d in early],
            "loss": [d.loss for d in early],
            "info_gain_bits": [d.info_gain_bits for d in early],
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if not args.skip_fixed:
        fixed_writer = MemoryWriter(model, WriteConfig(**base))
        memories = []
        t0, c0 = time.perf_counter(), time.process_time()
        for lo in range(0, len(docs), args.slots):
            group = docs[lo : lo + args.slots]
            S = max(len(d) for d in group)
            ids = torch.zeros(len(group), S, dtype=torch.long)
            mask = torch.zeros(len(group), S, dtype=torch.long)
            for b, d in enumerate(group):
                ids[b, : len(d)], mask[b, : len(d)] = d, 1
            memories.append(fixed_writer.write(ids, mask, progress=True).memory.detach())
            print(f"fixed: {lo + len(group)}/{len(docs)} paragraphs, {time.perf_counter() - t0:.0f} s", flush=True)
        fixed_s, fixed_cpu = time.perf_counter() - t0, time.process_time() - c0
        memory = torch.cat(memories)
        _, correct = teacher_forced(model, memory, docs)
        fixed_exact = [int(c) == len(d) for c, d in zip(correct, docs)]
        result["fixed"] = {"seconds": fixed_s, "cpu_seconds": fixed_cpu, "exact": fixed_exact, "steps": args.steps}
        result["speedup"] = fixed_s / early_s
        result["speedup_cpu"] = fixed_cpu / early_cpu
        result["step_ratio"] = args.steps * len(docs) / sum(d.steps for d in early)
        print(
            f"fixed: {fixed_s:.1f} s ({fixed_cpu:.1f} s CPU), {sum(fixed_exact)}/{len(docs)} exact; early exit is "
            f"{fixed_s / early_s:.2f}x faster in wall time, {fixed_cpu / early_cpu:.2f}x in CPU time",
            flush=True,
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
            f.write(table(result))
        print(table(result))
    return 0


def _processor() -> str:
    name = platform.processor()
    return f", {name}" if name else ""


def table(result: dict) -> str:
    """The README table of one run."""
    early = result["early_exit"]
    steps = early["steps"]
    lines = [
        f"| write ({result['paragraphs']} paragraphs, {result['slots']} slots, {result['device']}, "
        f"{result['threads']} thread(s)) | wall time | CPU time | exact decode | steps per paragraph |",
        "|---|---|---|---|---|",
    ]
    if "fixed" in result:
        fixed = result["fixed"]
        lines.append(
            f"| fixed {fixed['steps']} steps | {fixed['seconds']:.0f} s | {fixed['cpu_seconds']:.0f} s | "
            f"{sum(fixed['exact'])}/{len(fixed['exact'])} | {fixed['steps']} |"
        )
    lines.append(
        f"| stop when exact (check every {result['check_every']}), continuous batching | {early['seconds']:.0f} s | "
        f"{early['cpu_seconds']:.0f} s | {sum(early['exact'])}/{len(early['exact'])} | "
        f"{min(steps)}-{max(steps)}, mean {sum(steps) / len(steps):.0f} |"
    )
    if "speedup" in result:
        lines.append(
            f"\nSpeedup of early exit over the fixed step count: **{result['speedup']:.2f}x** in wall time, "
            f"{result['speedup_cpu']:.2f}x in CPU time; {result['step_ratio']:.2f}x fewer paragraph-steps."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
