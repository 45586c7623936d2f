"""End-to-end KV training: the published GradMemGPT beside our GradMemModel in the example's loop (issue 26, item 3).

Why not the published training script itself. ``run_gradmemgpt_on_kv_retrieval.py`` (published repository,
commit 9aa98cb) builds its backbone configuration from the Hugging Face Hub: line 261
``config = AutoConfig.from_pretrained('meta-llama/Llama-3.2-1B')`` (``--base_model llama``; lines 250/255 do the
same for gpt2 / pythia), its tokenizer with ``AutoTokenizer.from_pretrained(args.tokenizer_path)`` (line 247),
and reads its data with ``datasets.load_from_disk(args.data_path)`` (line 319), a folder that
``scripts/download_kv_retrieval.sh`` fills with ``datasets.load_dataset('yurakuratov/<name>')`` (line 11). This
machine reaches PyPI only (no Hub), so the script stops at line 247/261. As issue 26 allows, the published
*model class* is timed inside our example's training loop instead.

What is compared. ``examples/train_kv_retrieval.py``'s task (same generator, seeds, held-out set), recipe
(4x128 Llama, m=8, K=2, inner lr 0.04, second order, write head, inner loss weight 0.5, AdamW lr 1e-3 with the
example's parameter groups, warm-up, grad-norm clip 1.0, batch 16) and loop, run once with the published
``GradMemGPT`` and once with ``GradMemModel`` (backend ``torch``), from identical weights: the peer is built
(seeded) and saved with ``save_pretrained``; ours is ``GradMemModel.from_pretrained`` of that checkpoint. Both
see the same batches in the same order. Each side runs in its own process with one torch thread (the two run
at the same time, so both see the same machine load); the clock is the process CPU time
(``time.process_time``) of the outer steps only. Held-out exact match is measured with the example's
``evaluate`` (greedy decoding from memory alone); for the peer, its current weights are loaded into a
GradMemModel shell first (the forward of the two is checked equal, bench_meta_peer.py) and evaluation time
is not counted on either side.

    bash benchmarks/peers/setup_gradmem.sh
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m benchmarks.bench_kv_train_peer \
        --steps 500 --out benchmarks/results/2026-12-07-meta-peer/kv_train
"""

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_meta_peer import DEFAULT_PEER_DIR, _peer_commit, import_peer

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("peer", "ours")


def load_example():
    """examples/train_kv_retrieval.py as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location("train_kv_retrieval", ROOT / "examples" / "train_kv_retrieval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_pair(ex, args, vocab: int, peer_module, seed: int):
    """(peer GradMemGPT, our GradMemModel, checkpoint dir) on identical float32 weights for the example's recipe.

    The peer's configuration gets the example's backbone (``llama_config``) and memory options with the
    published field names; the checkpoint stays on disk (the caller removes it) so the evaluation shell of the
    peer side can be made from it."""
    from gradmem_fast import GradMemModel

    base = ex.llama_config(vocab, args.layers, args.hidden, args.heads, args.max_positions)
    cfg = peer_module.GradMemGPTConfig(
        base_config=base,
        attn_implementation="eager",
        n_mem_tokens=args.memory,
        K=args.inner_steps,
        lr=args.inner_lr,
        grad_mode="second",
        use_write_head=args.write_head,
        add_inner_loss_to_outer=args.inner_loss_weight > 0,
        inner_loss_weight=args.inner_loss_weight if args.inner_loss_weight > 0 else None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peer = peer_module.GradMemGPT(cfg)
    ckpt = tempfile.mkdtemp(prefix="kv_train_peer_")
    peer.save_pretrained(ckpt)
    ours = GradMemModel.from_pretrained(ckpt, backend="torch")
    return peer.float().train(), ours.float().train(), ckpt


def make_optimizer(ex, model, args):
    """The example's AdamW (decay on matrices except the initial memory ``mem``) and its warm-up schedule."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and n != "mem"]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() < 2 or n == "mem")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: ex.lr_factor(s, args))


def outer_loss(side: str, model, batch: dict) -> torch.Tensor:
    """The outer loss of one batch of the example (``model_batch``): the published forward takes the two token
    tensors as a dict and finds padding from the backbone's pad id (0 = the tokenizer's pad); ours the batch."""
    if side == "peer":
        ids = {"context_input_ids": batch["context_input_ids"], "query_input_ids": batch["query_input_ids"]}
        return model(ids, labels=batch["labels"])["loss"]
    return model(**batch).loss


def train_side(side: str, args, out_json: Path) -> dict:
    """Train one side for ``args.steps`` outer steps; evaluate every ``args.eval_every``; write ``out_json``."""
    torch.set_num_threads(1)
    ex = load_example()
    peer_module = import_peer(args.peer_dir)
    if peer_module is None:
        raise SystemExit(f"no clone of the published code at {args.peer_dir}; run benchmarks/peers/setup_gradmem.sh")
    task = ex.TaskConfig(args.pairs, args.key_len, args.value_len, args.alphabet, args.filler)
    tok = ex.CharTokenizer(task.alphabet)
    eval_samples = ex.SampleStream(task, seed=10_000 + args.seed).batch(args.eval_size)
    train = ex.SampleStream(task, seed=args.seed, exclude={s.context for s in eval_samples})
    peer, ours, ckpt = build_pair(ex, args, len(tok), peer_module, args.seed)
    from gradmem_fast import GradMemModel

    shell = GradMemModel.from_pretrained(ckpt, backend="torch").float() if side == "peer" else None
    shutil.rmtree(ckpt)
    model = peer if side == "peer" else ours
    del peer, ours  # one model per process
    torch.manual_seed(args.seed)
    opt, sched = make_optimizer(ex, model, args)

    def held_out() -> float:
        if shell is not None:
            shell.load_state_dict(model.state_dict(), strict=True)
            return ex.evaluate(shell, eval_samples, tok, "cpu")
        return ex.evaluate(model, eval_samples, tok, "cpu")

    curve, losses, cpu = [], [], 0.0
    curve.append((0, held_out(), 0.0))
    for step in range(1, args.steps + 1):
        batch = ex.model_batch(train.batch(args.batch), tok, "cpu")
        t0 = time.process_time()
        loss = outer_loss(side, model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        cpu += time.process_time() - t0
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{side}: outer loss {losses[-1]} at step {step}")
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, held_out(), cpu))
            print(f"{side} step {step:4d} | loss {losses[-1]:.4f} | eval EM {curve[-1][1]:6.1%} | cpu {cpu:6.1f}s")
            sys.stdout.flush()
    doc = {
        "side": side,
        "steps": args.steps,
        "train_cpu_s": cpu,
        "steps_per_cpu_s": args.steps / cpu,
        "columns": ["step", "exact_match", "train_cpu_s"],
        "curve": curve,
        "losses": losses,
    }
    tmp = out_json.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out_json)
    return doc


def first_losses(args) -> dict:
    """Outer loss of the first batch on both sides from identical weights (the equality the runs start from)."""
    ex = load_example()
    peer_module = import_peer(args.peer_dir)
    task = ex.TaskConfig(args.pairs, args.key_len, args.value_len, args.alphabet, args.filler)
    tok = ex.CharTokenizer(task.alphabet)
    eval_samples = ex.SampleStream(task, seed=10_000 + args.seed).batch(args.eval_size)
    train = ex.SampleStream(task, seed=args.seed, exclude={s.context for s in eval_samples})
    peer, ours, ckpt = build_pair(ex, args, len(tok), peer_module, args.seed)
    shutil.rmtree(ckpt)
    batch = ex.model_batch(train.batch(args.batch), tok, "cpu")
    return {side: outer_loss(side, m, batch).item() for side, m in (("peer", peer), ("ours", ours))}


def plot(docs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for side, label in (("peer", "published GradMemGPT"), ("ours", "GradMemModel (torch backend)")):
        c = docs[side]["curve"]
        ax.plot(
            [r[2] for r in c],
            [r[1] for r in c],
            marker="o",
            ms=3,
            label=f"{label}: {docs[side]['steps_per_cpu_s']:.2f} steps/CPU s",
        )
    ax.set_xlabel("training CPU seconds (one thread; evaluation excluded)")
    ax.set_ylabel("held-out exact match")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=SIDES, default=None, help="internal: train one side in this process")
    p.add_argument("--out", default="benchmarks/results/2026-12-07-meta-peer/kv_train")
    p.add_argument("--peer-dir", default=os.environ.get("GRADMEM_PEER_DIR", DEFAULT_PEER_DIR))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--sequential", action="store_true", help="run the sides one after the other")
    # the example's task and recipe (its defaults)
    for name, typ, default in (
        ("pairs", int, 1), ("key-len", int, 2), ("value-len", int, 2), ("alphabet", str, "abcdef"),
        ("filler", int, 1), ("layers", int, 4), ("hidden", int, 128), ("heads", int, 4),
        ("max-positions", int, 2048), ("memory", int, 8), ("inner-steps", int, 2), ("inner-lr", float, 0.04),
        ("inner-loss-weight", float, 0.5), ("batch", int, 16), ("lr", float, 1e-3), ("weight-decay", float, 0.01),
        ("warmup", int, 50), ("grad-clip", float, 1.0), ("seed", int, 0),
    ):  # fmt: skip
        p.add_argument(f"--{name}", type=typ, default=default)
    p.add_argument("--write-head", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    args.lr_schedule = "constant"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.side:
        train_side(args.side, args, out / f"{args.side}.json")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    first = first_losses(args)
    print(f"first outer loss: peer {first['peer']:.8f} ours {first['ours']:.8f}")
    if abs(first["peer"] - first["ours"]) > 1e-5 * max(1.0, abs(first["peer"])):
        raise AssertionError(f"first outer losses differ: {first}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "benchmarks.bench_kv_train_peer", *(argv if argv is not None else sys.argv[1:])]
    procs = []
    for side in SIDES:
        procs.append(subprocess.Popen([*cmd, "--side", side], env=env, cwd=ROOT))
        if args.sequential:
            procs[-1].wait()
    if any(p.wait() for p in procs):
        raise SystemExit("a side failed")
    docs = {s: json.loads((out / f"{s}.json").read_text()) for s in SIDES}
    summary = {
        "settings": {k: v for k, v in vars(args).items() if k != "side"},
        "peer_commit": _peer_commit(args.peer_dir),
        "torch": torch.__version__,
        "first_outer_loss": first,
        "steps_per_cpu_s": {s: docs[s]["steps_per_cpu_s"] for s in SIDES},
        "ours_over_peer_speed": docs["ours"]["steps_per_cpu_s"] / docs["peer"]["steps_per_cpu_s"],
        "final_exact_match": {s: docs[s]["curve"][-1][1] for s in SIDES},
        "sides": docs,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    for s in SIDES:
        (out / f"{s}.json").unlink()
    plot(
        docs,
        out / "kv_train_peer.png",
        f"KV retrieval, {args.pairs} pair(s), recipe of examples/train_kv_retrieval.py, {args.steps} outer steps, CPU",
    )
    print(json.dumps({k: summary[k] for k in ("steps_per_cpu_s", "ours_over_peer_speed", "final_exact_match")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
