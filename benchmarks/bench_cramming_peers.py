"""Cramming beside progressive_cramming (the peer), same model directory, texts and settings, CPU, one thread.

    bash benchmarks/peers/setup_progressive_cramming.sh            # the peer and its own venv (once)
    python -m benchmarks.bench_cramming_peers --work /tmp/peerbench --out benchmarks/results/<date>-cramming-peers

Two comparisons, each side run as its own process through its own entry point:

* **full cramming to exact**: ``--count`` paragraphs of ``data/cramming/paragraphs.jsonl`` (p00, p01, ... in
  file order), each with the tokenizer's end-of-text token appended (as ``gradmem-fast write`` does; the peer
  reads the same text with the token's string appended, and the token ids are checked equal), into
  ``--memory-tokens`` vectors. Ours: ``gradmem-fast write --stop exact --check-every 1 --slots``. The peer:
  ``scripts/run_cramming.py`` (its FullCrammingTrainer), at its default batch size 1 and at other batch
  sizes; its best is its run of least CPU time among those run for real (``cram-peer-batches`` runs
  ``--peer-batches``; ``cram-peer-best`` runs the one ``probe`` predicts: each candidate batch size runs
  ``--probe-steps`` steps (its per-step CPU time), and the whole run's time is predicted from the
  per-paragraph steps of its batch-1 run: a batch steps until its slowest paragraph is exact, converged ones
  frozen but still computed, so a batch costs its slowest paragraph's steps at that batch size's step time).
* **progressive capacity, one vector, first token given**: ``--capacity-count`` texts of
  ``data/cramming/capacity.jsonl`` (every other text from c00: c00, c02, ...), no end-of-text token. Ours:
  ``gradmem-fast capacity --memory-tokens 1 --given-tokens 1 --first 1 --grow 1.5``. The peer: its
  ProgressiveCrammingTrainer (``--progressive_train``) with ``--progressive_prefix_len 1`` (the first token is
  an input, never predicted), growing the target +1 token per stage from 1 (its defaults) and, as a second
  run, its geometric growth with bisection (``--peer-geometric``; batch size 1 only).

Aligned settings (both sides support them): float32, one torch thread, AdamW with weight decay 0,
betas (0.9, 0.999), eps 1e-8, constant step size ``--lr``, initial memory N(0, 0.02^2), at most
``--max-steps`` steps per paragraph (per stage for capacity), stop at exact teacher-forced decoding checked
every step, the peer's loss plain cross-entropy (``--loss_type cross_entropy``: no hidden-state outputs).
What differs is listed in the report (``DIFFERENCES``).

Measured per run: the child process's CPU time (user + system of it and its children, from
``getrusage(RUSAGE_CHILDREN)``; the fair figure on a machine shared with other work) and its wall time, model
load and start-up included on both sides. Before any time is compared, ``report`` decodes both sides'
memories with one rule written here (teacher-forced argmax of the same model in one process, which is what
greedy decoding returns when every token matches) and checks it against each side's own verdict.

Phases (``--phases``, default all, in this order): model, data, cram-ours, cram-peer-1, probe, cram-peer-best,
cram-peer-batches, cap-ours, cap-peer, cap-peer-geo, report. Each run phase leaves
``WORK/runs/<name>/record.json`` and is skipped when that record exists (``--redo`` reruns), so phases can run
as separate processes and ``report`` gathers them. Writes ``results.json`` and ``table.md`` under ``--out``.
"""

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PARAGRAPHS = os.path.join(ROOT, "data", "cramming", "paragraphs.jsonl")
CAPACITY_TEXTS = os.path.join(ROOT, "data", "cramming", "capacity.jsonl")
PEER_DIR = os.path.join(HERE, "peers", "progressive_cramming")
PHASES = (
    "model",
    "data",
    "cram-ours",
    "cram-peer-1",
    "probe",
    "cram-peer-best",
    "cram-peer-batches",
    "cap-ours",
    "cap-peer",
    "cap-peer-geo",
    "report",
)
PEER_PHASES = {"cram-peer-1", "probe", "cram-peer-best", "cram-peer-batches", "cap-peer", "cap-peer-geo"}
DIFFERENCES = [
    "batching: ours keeps --slots paragraphs in flight and gives a finished paragraph's slot to the next "
    "(continuous batching, per-paragraph early exit); the peer steps a fixed batch until all of it is exact "
    "(converged members frozen but still computed) and pads every text to --max_sequence_length",
    "loss scale: ours differentiates the sum of per-paragraph mean losses, the peer the mean over all real "
    "tokens of the batch (the same direction per memory; Adam is invariant to that constant scale up to eps)",
    "gradient clipping: ours --clip-value 1e30 (off, as the peer, which clips nothing; our Adam default is 10); "
    "capacity: our capacity command has no --clip-value and keeps the default 10",
    "capacity search: ours grows the target x1.5 (T' = max(T+1, ceil(1.5 T))) and reads a failed stage's "
    "exact prefix, Adam moments reset per stage; the peer grows +1 token per stage (its default), Adam moments "
    "kept across stages, and, as a second run, doubles then bisects (its geometric growth, batch size 1 only)",
    "the peer logs TensorBoard scalars every step and computes the information gain of every row (its "
    "defaults; no option turns them off); ours prints a progress line",
    "start-up: each side's CPU time includes its imports, model load and tokenization; the peer also writes "
    "its Dataset of rows and tokenizes through datasets.map",
]


# ------------------------------------------------------------------------------------------- helpers
def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def child_env(extra: dict | None = None, device: str = "cpu") -> dict:
    """One thread everywhere, nothing fetched from a hub, and on ``device`` cpu no GPU visible (the peer
    takes cuda whenever it sees one)."""
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("TRITON_INTERPRET", None)
    env.update(extra or {})
    return env


def timed_run(cmd: list[str], log_path: str, env: dict, cwd: str | None = None) -> dict:
    """Run ``cmd`` to completion; its CPU time is the growth of this process's RUSAGE_CHILDREN (the child and
    every descendant it waited for: the peer's tokenizer worker processes count too)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, sys_ = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {
        "cmd": cmd,
        "rc": rc,
        "cpu_seconds": user + sys_,
        "user_seconds": user,
        "sys_seconds": sys_,
        "wall_seconds": wall,
        "log": log_path,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def ours_cmd(python: str, sub: str, args: list[str]) -> list[str]:
    """Our CLI in a child process with one torch thread (as benchmarks/results/*/run.sh call it)."""
    boot = (
        "import sys, torch; torch.set_num_threads(1); from gradmem_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return [python, "-c", boot, sub, *args]


# ------------------------------------------------------------------------------------------- settings
def cram_texts(tokenizer, count: int, path: str = PARAGRAPHS) -> tuple[list[dict], list[list[int]]]:
    """The first ``count`` paragraphs and their token ids: text tokens (no special tokens) + end-of-text."""
    rows = read_jsonl(path)
    if count > len(rows):
        raise SystemExit(f"--count {count}: {path} has only {len(rows)} paragraphs")
    rows = rows[:count]
    eos = tokenizer.eos_token_id
    ids = [tokenizer(r["text"], add_special_tokens=False).input_ids + [eos] for r in rows]
    return rows, ids


def capacity_texts(tokenizer, count: int, path: str = CAPACITY_TEXTS) -> tuple[list[dict], list[list[int]]]:
    """Every other text from the first (c00, c02, ...) and their token ids (no special tokens, no end)."""
    rows = read_jsonl(path)[::2]
    if count > len(rows):
        raise SystemExit(f"--capacity-count {count}: {path} has only {len(rows)} texts at even positions")
    rows = rows[:count]
    return rows, [tokenizer(r["text"], add_special_tokens=False).input_ids for r in rows]


def predict_batch_cost(steps: list[int], step_cpu: float, batch: int) -> float:
    """Predicted CPU seconds of the peer's full cramming at ``batch``: each batch of consecutive paragraphs
    (its dataloader order, last batch kept) runs its slowest paragraph's steps at ``step_cpu`` per step."""
    total = 0
    for lo in range(0, len(steps), batch):
        total += max(steps[lo : lo + batch])
    return total * step_cpu


def choose_best_batch(steps: list[int], probe: dict[int, float]) -> tuple[int, dict[int, float]]:
    """The batch size of least predicted CPU time (ties: the smaller batch) and every prediction."""
    predicted = {b: predict_batch_cost(steps, cpu, b) for b, cpu in sorted(probe.items())}
    best = min(predicted, key=lambda b: (predicted[b], b))
    return best, predicted


def peer_common(a, model_dir: str) -> list[str]:
    return [
        "--model_checkpoint", model_dir,
        "--embedding_init_method", "random_norm_0.02",
        "--learning_rate", str(a.lr),
        "--lr_scheduler_type", "constant",
        "--lr_scheduler_kwargs", "none",
        "--warmup_steps", "0",
        "--optim", "adamw_torch",
        "--weight_decay", "0",
        "--adam_beta1", "0.9",
        "--adam_beta2", "0.999",
        "--dtype", "float32",
        "--attn_implementation", "sdpa",
        "--loss_type", "cross_entropy",
        "--dataloader_drop_last", "False",
        "--random_seed", "42",
        "--report_to", "none",
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------- exactness
def exact_prefix(model, memory, ids: list[int], given: int = 0) -> int:
    """How many target tokens after the ``given`` ones greedy decoding from ``memory`` reproduces: the
    teacher-forced argmax of ``[memory ; E(ids)]`` at position ``m-1+j`` against ``ids[j]`` for j >= given,
    counted up to the first mismatch (with every earlier token right, teacher forcing is greedy decoding)."""
    import torch

    m = memory.shape[0]
    with torch.no_grad():
        x = model.get_input_embeddings()(torch.tensor([ids]))
        h = torch.cat([memory[None].to(x.dtype), x], dim=1)
        logits = model(inputs_embeds=h).logits[0]
    pred = logits[m - 1 : m - 1 + len(ids)].argmax(-1).tolist()
    n = 0
    for j in range(given, len(ids)):
        if pred[j] != ids[j]:
            break
        n += 1
    return n


# ------------------------------------------------------------------------------------------- phases
class Bench:
    def __init__(self, a):
        self.a = a
        self.work = os.path.abspath(a.work)
        self.model_dir = os.path.abspath(a.model_dir or os.path.join(self.work, "model"))
        self.peer_dir = os.path.abspath(a.peer_dir)
        self.peer_python = a.peer_python or os.path.join(self.peer_dir, ".venv", "bin", "python")
        self.runs = os.path.join(self.work, "runs")
        os.makedirs(self.runs, exist_ok=True)
        self._tokenizer = None

    # --- plumbing
    def record_path(self, name: str) -> str:
        return os.path.join(self.runs, name, "record.json")

    def record(self, name: str) -> dict | None:
        p = self.record_path(name)
        if not os.path.exists(p):
            return None
        with open(p, encoding="utf-8") as f:
            return json.load(f)

    def run(self, name: str, cmd: list[str], env_extra: dict | None = None, meta: dict | None = None) -> dict:
        rec = self.record(name)
        if rec is not None and rec["rc"] == 0 and not self.a.redo:
            print(f"== {name}: done before ({rec['cpu_seconds']:.0f} s CPU), kept", flush=True)
            return rec
        d = os.path.join(self.runs, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        rec = timed_run(cmd, os.path.join(d, "log.txt"), child_env(env_extra, self.a.device), cwd=d)
        rec.update(meta or {})
        write_json(self.record_path(name), rec)
        cpu, wall = rec["cpu_seconds"], rec["wall_seconds"]
        print(f"== {name}: rc {rec['rc']}, {cpu:.1f} s CPU, {wall:.1f} s wall", flush=True)
        if rec["rc"] != 0:
            raise SystemExit(f"{name} failed (rc {rec['rc']}); see {rec['log']}")
        return rec

    def tokenizer(self):
        if self._tokenizer is None:
            import transformers

            self._tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def peer_env(self, name: str) -> dict:
        """Each peer run tokenizes into its own cache; its package is on the path also for a python other
        than its venv's (``--peer-python``: the GPU suite uses the machine's own)."""
        path = os.path.join(self.peer_dir, "src")
        if os.environ.get("PYTHONPATH"):
            path += os.pathsep + os.environ["PYTHONPATH"]
        return {"PC_DATA_CACHE": os.path.join(self.runs, name, "cache"), "PYTHONPATH": path}

    def peer_ready(self) -> bool:
        return os.path.isdir(os.path.join(self.peer_dir, "src", "progressive_cramming")) and bool(
            shutil.which(self.peer_python)
        )

    # --- phases
    def phase_model(self):
        """The embedded SmolLM2-135M-Instruct (or --model) saved with save_pretrained, float32."""
        if os.path.exists(os.path.join(self.model_dir, "config.json")):
            print(f"== model: {self.model_dir} exists, kept", flush=True)
            return
        import torch

        from gradmem_fast.models import load_model

        torch.set_num_threads(1)
        model, tokenizer = load_model(self.a.model, "float32", "cpu")
        tmp = self.model_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, self.model_dir)
        print(f"== model: saved {self.a.model} to {self.model_dir}", flush=True)

    def data_paths(self) -> dict:
        d = os.path.join(self.work, "data")
        return {
            "dir": d,
            "cram_ours": os.path.join(d, "cram.jsonl"),
            "cram_peer": os.path.join(d, "cram_peer"),
            "cap_ours": os.path.join(d, "capacity.jsonl"),
            "cap_peer": os.path.join(d, "capacity_peer"),
            "meta": os.path.join(d, "meta.json"),
        }

    def phase_data(self):
        """Texts for both sides: ours as JSON lines, the peer's as a local ``datasets`` folder with a test
        split (what its loader reads: ``load_dataset(name, split="test")``)."""
        p = self.data_paths()
        tok = self.tokenizer()
        rows, ids = cram_texts(tok, self.a.count)
        crows, cids = capacity_texts(tok, self.a.capacity_count)
        os.makedirs(p["cram_peer"], exist_ok=True)
        os.makedirs(p["cap_peer"], exist_ok=True)
        write_jsonl(p["cram_ours"], [{"id": r["id"], "text": r["text"]} for r in rows])
        write_jsonl(os.path.join(p["cram_peer"], "test.jsonl"), [{"text": r["text"] + tok.eos_token} for r in rows])
        write_jsonl(p["cap_ours"], [{"id": r["id"], "text": r["text"]} for r in crows])
        write_jsonl(os.path.join(p["cap_peer"], "test.jsonl"), [{"text": r["text"]} for r in crows])
        # the peer's tokenizer call (special tokens on, eos string in the text) must give our ids
        for r, want in zip(rows, ids):
            got = tok(r["text"] + tok.eos_token).input_ids
            if got != want:
                raise SystemExit(f"paragraph {r['id']}: the peer's tokenization {got} differs from ours {want}")
        for r, want in zip(crows, cids):
            if tok(r["text"]).input_ids != want:
                raise SystemExit(f"capacity text {r['id']}: the peer's tokenization differs from ours")
        meta = {
            "cram_ids": [r["id"] for r in rows],
            "cram_tokens": [len(x) for x in ids],
            "capacity_ids": [r["id"] for r in crows],
            "capacity_tokens": [len(x) for x in cids],
        }
        write_json(p["meta"], meta)
        print(f"== data: {len(rows)} paragraphs ({min(meta['cram_tokens'])}-{max(meta['cram_tokens'])} tokens), "
              f"{len(crows)} capacity texts ({meta['capacity_tokens']} tokens)", flush=True)  # fmt: skip

    def meta(self) -> dict:
        with open(self.data_paths()["meta"], encoding="utf-8") as f:
            return json.load(f)

    def phase_cram_ours(self):
        a, p = self.a, self.data_paths()
        out = os.path.join(self.runs, "cram-ours", "memories")
        args = [
            "write", "--model", self.model_dir, "--input", p["cram_ours"], "--output", out,
            "--output-format", "dataset", "--force",
            "--memory-tokens", str(a.memory_tokens), "--steps", str(a.max_steps), "--stop", "exact",
            "--check-every", "1", "--slots", str(a.slots), "--lr", str(a.lr), "--optimizer", "adamw",
            "--weight-decay", "0", "--clip-value", "1e30", "--init-std", "0.02", "--seed", "0",
            "--dtype", "float32", "--device", a.device,
        ]  # fmt: skip
        self.run("cram-ours", ours_cmd(a.python, args[0], args[1:]), meta={"slots": a.slots, "output": out})

    def peer_cram(self, name: str, batch: int, steps: int, count: int):
        a, p = self.a, self.data_paths()
        meta = self.meta()
        out = os.path.join(self.runs, name, "output")
        cmd = [
            self.peer_python, os.path.join(self.peer_dir, "scripts", "run_cramming.py"),
            *peer_common(a, self.model_dir),
            "--dataset_name", p["cram_peer"], "--limit_dataset_items", str(count),
            # every text is padded to this length: the full set's longest, probes too
            "--max_sequence_length", str(max(meta["cram_tokens"])),
            "--number_of_mem_tokens", str(a.memory_tokens),
            "--max_optimization_steps_per_sample", str(steps),
            "--full_cramming_convergence_threshold", "1.0",
            "--per_device_train_batch_size", str(batch),
            "--output_dir", out,
        ]  # fmt: skip
        return self.run(name, cmd, self.peer_env(name), meta={"batch": batch, "output": out, "count": count})

    def peer_steps(self, name: str) -> list[int]:
        """Per-paragraph steps of a peer full-cramming run (its steps below full convergence)."""
        from datasets import load_from_disk

        ds = load_from_disk(os.path.join(self.record(name)["output"], "compressed_prefixes"))
        return [int(s) for s in ds["convergence_after_steps"]]

    def phase_cram_peer_1(self):
        self.peer_cram("cram-peer-1", 1, self.a.max_steps, self.a.count)

    def phase_probe(self):
        """Per-step CPU time of the peer at each candidate batch size: ``--probe-steps`` steps (no paragraph
        converges that early), minus a 1-step run's time (start-up, model load, the rows it writes)."""
        a = self.a
        probe = {}
        for b in a.probe_batches:
            if b > a.count:
                continue
            short = self.peer_cram(f"probe-b{b}-s1", b, 1, b)
            long = self.peer_cram(f"probe-b{b}-s{a.probe_steps}", b, a.probe_steps, b)
            probe[b] = (long["cpu_seconds"] - short["cpu_seconds"]) / (a.probe_steps - 1)
            print(f"== probe: batch {b}: {probe[b]:.3f} s CPU per step", flush=True)
        write_json(os.path.join(self.runs, "probe.json"), {"step_cpu_seconds": probe, "steps": a.probe_steps})

    def best_batch(self) -> tuple[int, dict]:
        if self.a.peer_best_batch:
            return self.a.peer_best_batch, {"best": self.a.peer_best_batch, "chosen": "--peer-best-batch"}
        with open(os.path.join(self.runs, "probe.json"), encoding="utf-8") as f:
            probe = {int(k): v for k, v in json.load(f)["step_cpu_seconds"].items()}
        steps = self.peer_steps("cram-peer-1")
        best, predicted = choose_best_batch(steps, probe)
        return best, {"step_cpu_seconds": probe, "predicted_cpu_seconds": predicted, "best": best}

    def phase_cram_peer_best(self):
        best, _ = self.best_batch()
        if best == 1:
            print("== cram-peer-best: batch 1 is the best predicted; the batch-1 run stands", flush=True)
            return
        self.peer_cram("cram-peer-best", best, self.a.max_steps, self.a.count)

    def phase_cram_peer_batches(self):
        """The peer at each of ``--peer-batches`` for real (runs cram-peer-b<B>): the measured best is what
        the report compares against, whatever the probe predicted."""
        for b in self.a.peer_batches:
            if b != 1:
                self.peer_cram(f"cram-peer-b{b}", b, self.a.max_steps, self.a.count)

    def phase_cap_ours(self):
        a, p = self.a, self.data_paths()
        out = os.path.join(self.runs, "cap-ours", "capacity")
        args = [
            "capacity", "--model", self.model_dir, "--memory-tokens", "1", "--input", p["cap_ours"],
            "--output", out, "--output-format", "dataset", "--force",
            "--first", "1", "--grow", "1.5", "--max-steps", str(a.capacity_max_steps), "--lr", str(a.lr),
            "--optimizer", "adamw", "--weight-decay", "0", "--check-every", "1", "--given-tokens", "1",
            "--init-std", "0.02", "--seed", "0", "--dtype", "float32", "--device", a.device,
        ]  # fmt: skip
        self.run("cap-ours", ours_cmd(a.python, args[0], args[1:]), meta={"output": out})

    def peer_capacity(self, name: str, geometric: bool):
        a, p = self.a, self.data_paths()
        meta = self.meta()
        out = os.path.join(self.runs, name, "output")
        cmd = [
            self.peer_python, os.path.join(self.peer_dir, "scripts", "run_cramming.py"),
            *peer_common(a, self.model_dir),
            "--progressive_train", "True",
            "--dataset_name", p["cap_peer"], "--limit_dataset_items", str(a.capacity_count),
            "--max_sequence_length", str(max(meta["capacity_tokens"])),
            "--number_of_mem_tokens", "1",
            "--progressive_prefix_len", "1", "--progressive_min_seq_len", "1", "--progressive_step", "1",
            "--max_optimization_steps_per_token", str(a.capacity_max_steps),
            "--max_optimization_steps_per_sample", "1000000",
            "--per_device_train_batch_size", "1",
            "--output_dir", out,
        ]  # fmt: skip
        if geometric:
            cmd += ["--progressive_geometric_growth", "True", "--progressive_geometric_backoff", "bisect"]
        return self.run(name, cmd, self.peer_env(name), meta={"batch": 1, "output": out, "geometric": geometric})

    def phase_cap_peer(self):
        self.peer_capacity("cap-peer", geometric=False)

    def phase_cap_peer_geo(self):
        self.peer_capacity("cap-peer-geo", geometric=True)

    # --- report
    def load_model(self):
        import torch
        import transformers

        torch.set_num_threads(1)
        model = transformers.AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        return model.eval()

    def cram_side(self, model, name: str, ids: list[list[int]]) -> dict | None:
        """One full-cramming run's figures, its memories decoded by ``exact_prefix``."""
        import torch

        rec = self.record(name)
        if rec is None:
            return None
        if name == "cram-ours":
            from datasets import load_from_disk

            ds = load_from_disk(rec["output"])
            memories = [torch.tensor(x, dtype=torch.float32) for x in ds["memory"]]
            claimed = [bool(x) for x in ds["exact"]]
            steps = [int(x) for x in ds["steps"]]
            tokens = [list(map(int, x)) for x in ds["token_ids"]]
        else:
            from datasets import load_from_disk

            ds = load_from_disk(os.path.join(rec["output"], "compressed_prefixes"))
            memories = [torch.tensor(x, dtype=torch.float32) for x in ds["embedding"]]
            claimed = [float(x) >= 1.0 for x in ds["final_convergence"]]
            steps = [int(x) for x in ds["convergence_after_steps"]]
            tokens = [list(map(int, x)) for x in ds["input_ids"]]
        if tokens != ids:
            raise SystemExit(f"{name}: its token ids differ from the benchmark's")
        decoded = [exact_prefix(model, mem, x) for mem, x in zip(memories, ids)]
        exact = [d == len(x) for d, x in zip(decoded, ids)]
        return {
            "cpu_seconds": rec["cpu_seconds"],
            "wall_seconds": rec["wall_seconds"],
            "user_seconds": rec["user_seconds"],
            "sys_seconds": rec["sys_seconds"],
            "batch": rec.get("batch"),
            "slots": rec.get("slots"),
            "steps": steps,
            "exact": exact,
            "exact_claimed": claimed,
            "agree": exact == claimed,
            "decoded_prefix": decoded,
            "cmd": rec["cmd"],
        }

    def capacity_side(self, model, name: str, ids: list[list[int]]) -> dict | None:
        """One capacity run's horizons (tokens after the given first one), each re-decoded by
        ``exact_prefix`` from the memory that side reports for it."""
        import torch
        from datasets import load_from_disk

        rec = self.record(name)
        if rec is None:
            return None
        horizons, checked, steps = [], [], []
        if name == "cap-ours":
            # our dataset output: one row per stage; the JSON report rides in its metadata file
            with open(os.path.join(rec["output"], "gradmem_fast.json"), encoding="utf-8") as f:
                report = json.loads(json.load(f)["report"])
            rows = list(load_from_disk(rec["output"]))
            for t, x in zip(report["texts"], ids):
                horizons.append(int(t["capacity"]))
                steps.append(int(t["steps"]))
                # the memory of the capacity: the earliest stage whose exact prefix reached it
                stages = [r for r in rows if str(r["id"]) == str(t["id"])]
                best = max(stages, key=lambda r: (int(r["prefix"]), -int(r["stage"])))
                mem = torch.tensor(best["memory"], dtype=torch.float32)
                checked.append(exact_prefix(model, mem, x, given=1))
        else:
            ds = load_from_disk(os.path.join(rec["output"], "progressive_prefixes"))
            rows = list(ds)
            for i, x in enumerate(ids):
                mine = [r for r in rows if int(r["sample_id"]) == i]
                conv = [r for r in mine if float(r["final_convergence"]) >= 1.0]
                steps.append(max((int(r["steps_taken"]) for r in mine), default=0))
                if not conv:
                    horizons.append(0)
                    checked.append(0)
                    continue
                best = max(conv, key=lambda r: int(r["stage_seq_len"]))
                horizons.append(int(best["stage_seq_len"]))
                mem = torch.tensor(best["embedding"], dtype=torch.float32)
                checked.append(exact_prefix(model, mem, x, given=1))
        return {
            "cpu_seconds": rec["cpu_seconds"],
            "wall_seconds": rec["wall_seconds"],
            "horizon": horizons,
            "decoded_prefix": checked,
            "agree": all(c >= h for c, h in zip(checked, horizons)),
            "steps": steps,
            "cmd": rec["cmd"],
        }

    def phase_report(self):
        import torch
        import transformers

        a = self.a
        model = self.load_model()
        tok = self.tokenizer()
        _, ids = cram_texts(tok, a.count)
        _, cids = capacity_texts(tok, a.capacity_count)
        meta = self.meta()
        result = {
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "model": "SmolLM2-135M-Instruct (the embedded GGUF, saved with save_pretrained, float32)"
            if a.model == "smollm2-135m-instruct"
            else a.model,
            "device": f"cpu ({os.cpu_count()} cores{', ' + platform.processor() if platform.processor() else ''}), "
            "one thread per side, shared with other work: CPU time is the fair figure",
            "peer": {"name": "progressive_cramming", "commit": _git_head(self.peer_dir), "python": self.peer_python},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "settings": {
                "lr": a.lr,
                "optimizer": "AdamW, weight decay 0, betas (0.9, 0.999), eps 1e-8, constant lr",
                "init": "N(0, 0.02^2)",
                "dtype": "float32",
                "threads": 1,
                "cramming": {
                    "paragraphs": meta["cram_ids"],
                    "tokens": meta["cram_tokens"],
                    "memory_tokens": a.memory_tokens,
                    "max_steps": a.max_steps,
                    "stop": "exact teacher-forced decoding, checked every step",
                    "ours_slots": a.slots,
                },
                "capacity": {
                    "texts": meta["capacity_ids"],
                    "tokens": meta["capacity_tokens"],
                    "memory_tokens": 1,
                    "given_tokens": 1,
                    "max_steps_per_stage": a.capacity_max_steps,
                },
            },
            "differences": DIFFERENCES,
        }
        cram = {}
        peer_runs = ["cram-peer-1", "cram-peer-best"] + sorted(
            (x for x in os.listdir(self.runs) if x.startswith("cram-peer-b") and x != "cram-peer-best"),
            key=lambda x: int(x[len("cram-peer-b") :]),
        )
        for name in ["cram-ours", *peer_runs]:
            side = self.cram_side(model, name, ids)
            if side is not None:
                cram[name] = side
        have_probe = os.path.exists(os.path.join(self.runs, "probe.json")) and self.record("cram-peer-1")
        if a.peer_best_batch or have_probe:
            _, choice = self.best_batch()
            result["peer_batch_choice"] = choice
        # the peer's best: its run of least CPU time among every batch size run for real
        peers = {k: v for k, v in cram.items() if k != "cram-ours"}
        if peers:
            best = min(peers, key=lambda k: peers[k]["cpu_seconds"])
            cram["cram-peer-best"] = dict(peers[best], run=best)
        result["cramming"] = cram
        cap = {}
        for name in ("cap-ours", "cap-peer", "cap-peer-geo"):
            side = self.capacity_side(model, name, cids)
            if side is not None:
                cap[name] = side
        result["capacity"] = cap
        result["ratios"] = ratios(result)
        os.makedirs(a.out, exist_ok=True)
        write_json(os.path.join(a.out, "results.json"), result)
        text = table(result)
        with open(os.path.join(a.out, "table.md"), "w", encoding="utf-8") as f:
            f.write(text)
        print(text)


def _git_head(path: str) -> str | None:
    try:
        return subprocess.check_output(["git", "-C", path, "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def ratios(result: dict) -> dict:
    """Peer CPU (wall) time over ours, per comparison present."""
    r = {}
    cram, cap = result.get("cramming", {}), result.get("capacity", {})
    ours = cram.get("cram-ours")
    for key, name in (("cram_vs_peer_default", "cram-peer-1"), ("cram_vs_peer_best", "cram-peer-best")):
        if ours and name in cram:
            r[key] = {
                "cpu": cram[name]["cpu_seconds"] / ours["cpu_seconds"],
                "wall": cram[name]["wall_seconds"] / ours["wall_seconds"],
                "per_step_cpu": (cram[name]["cpu_seconds"] / max(1, _peer_batched_steps(cram[name])))
                / (ours["cpu_seconds"] / max(1, sum(ours["steps"]))),
            }
    c_ours = cap.get("cap-ours")
    for key, name in (("capacity_vs_peer_linear", "cap-peer"), ("capacity_vs_peer_geometric", "cap-peer-geo")):
        if c_ours and name in cap:
            r[key] = {
                "cpu": cap[name]["cpu_seconds"] / c_ours["cpu_seconds"],
                "wall": cap[name]["wall_seconds"] / c_ours["wall_seconds"],
                "mean_horizon_ours": _mean(c_ours["horizon"]),
                "mean_horizon_peer": _mean(cap[name]["horizon"]),
            }
    return r


def _peer_batched_steps(side: dict) -> int:
    """Paragraph-steps the peer computed: every member of a batch is in every step of that batch."""
    b = side.get("batch") or 1
    steps = side["steps"]
    return sum(max(steps[lo : lo + b]) * len(steps[lo : lo + b]) for lo in range(0, len(steps), b))


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def table(result: dict) -> str:
    """The markdown of one run."""
    cram, cap, r = result.get("cramming", {}), result.get("capacity", {}), result.get("ratios", {})
    s = result["settings"]
    c = s["cramming"]
    lines = [
        f"Full cramming: {len(c['paragraphs'])} paragraphs ({min(c['tokens'])}-{max(c['tokens'])} tokens with "
        f"end-of-text), {c['memory_tokens']} vectors, at most {c['max_steps']} steps, {result['model']}, "
        f"{result['device']}.",
        "",
        "| run | CPU time | wall time | exact (shared rule) | sides agree | steps per paragraph |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "cram-ours": f"gradmem-fast write, {c['ours_slots']} slots, continuous batching",
        "cram-peer-1": "progressive_cramming, batch 1 (its default)",
        "cram-peer-best": "progressive_cramming, batch {b}: its best (least CPU of its runs)",
    }
    for name, side in cram.items():
        label = labels.get(name, "progressive_cramming, batch {b}").format(b=side.get("batch"))
        st = side["steps"]
        lines.append(
            f"| {label} | {side['cpu_seconds']:.0f} s | {side['wall_seconds']:.0f} s | "
            f"{sum(side['exact'])}/{len(side['exact'])} | {'yes' if side['agree'] else 'NO'} | "
            f"{min(st)}-{max(st)}, mean {_mean(st):.0f} |"
        )
    for key, text in (("cram_vs_peer_default", "batch 1"), ("cram_vs_peer_best", "its best batch")):
        if key in r:
            lines.append(
                f"\nPeer at {text} over ours: **{r[key]['cpu']:.2f}x** CPU time, {r[key]['wall']:.2f}x wall, "
                f"{r[key]['per_step_cpu']:.2f}x per paragraph-step."
            )
    if "predicted_cpu_seconds" in result.get("peer_batch_choice", {}):
        ch = result["peer_batch_choice"]
        pred = ch["predicted_cpu_seconds"]
        per = ", ".join(f"{b}: {v:.2f} s/step -> {pred[b]:.0f} s" for b, v in ch["step_cpu_seconds"].items())
        lines.append(f"\nPeer batch size chosen by prediction (CPU per step, predicted run): {per}; best {ch['best']}.")
    if cap:
        k = s["capacity"]
        lines += [
            "",
            f"Progressive capacity: {len(k['texts'])} texts ({', '.join(k['texts'])}; {k['tokens']} tokens), 1 vector, "
            f"first token given, at most {k['max_steps_per_stage']} steps per stage.",
            "",
            "| run | CPU time | wall time | horizon per text (tokens after the given one) | mean | checked |",
            "|---|---|---|---|---|---|",
        ]
        clabels = {
            "cap-ours": "gradmem-fast capacity, x1.5 growth",
            "cap-peer": "progressive_cramming, +1 token per stage (its default), batch 1",
            "cap-peer-geo": "progressive_cramming, geometric growth + bisect, batch 1",
        }
        for name, side in cap.items():
            lines.append(
                f"| {clabels[name]} | {side['cpu_seconds']:.0f} s | {side['wall_seconds']:.0f} s | "
                f"{side['horizon']} | {_mean(side['horizon']):.1f} | {'yes' if side['agree'] else 'NO'} |"
            )
        for key, text in (("capacity_vs_peer_linear", "+1 growth"), ("capacity_vs_peer_geometric", "geometric")):
            if key in r:
                x = r[key]
                lines.append(f"\nPeer ({text}) over ours: **{x['cpu']:.2f}x** CPU time, {x['wall']:.2f}x wall.")
    lines += ["", "Settings that differ:", *[f"- {d}" for d in result["differences"]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=os.path.join(ROOT, "out", "peerbench"), help="runs, data and the model dir")
    p.add_argument("--out", default=None, help="results.json and table.md (default WORK/results)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="what the model phase saves")
    p.add_argument("--model-dir", default=None, help="default WORK/model")
    p.add_argument("--peer-dir", default=PEER_DIR)
    p.add_argument("--peer-python", default=None, help="default PEER_DIR/.venv/bin/python")
    p.add_argument("--python", default=sys.executable, help="python of our side")
    p.add_argument("--device", default="cpu", help="cpu (default; no GPU visible to either side) or cuda")
    p.add_argument("--count", type=int, default=24)
    p.add_argument("--memory-tokens", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--probe-batches", default="1,2,4,8,24")
    p.add_argument("--probe-steps", type=int, default=6)
    p.add_argument("--peer-batches", default="", help="cram-peer-batches: batch sizes to run for real")
    p.add_argument("--peer-best-batch", type=int, default=None, help="the peer's batch for cram-peer-best (no probe)")
    p.add_argument("--capacity-count", type=int, default=4)
    p.add_argument("--capacity-max-steps", type=int, default=300)
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--redo", action="store_true", help="rerun phases that have a record")
    a = p.parse_args(argv)
    a.probe_batches = sorted({int(x) for x in a.probe_batches.split(",") if x.strip()})
    a.peer_batches = sorted({int(x) for x in a.peer_batches.split(",") if x.strip()})
    a.out = a.out or os.path.join(a.work, "results")
    phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    unknown = [x for x in phases if x not in PHASES]
    if unknown:
        p.error(f"--phases: unknown {unknown}; known: {', '.join(PHASES)}")
    if a.probe_steps < 2:
        p.error("--probe-steps must be >= 2")
    bench = Bench(a)
    if any(x in PEER_PHASES for x in phases) and not bench.peer_ready():
        print(f"== the peer is not installed at {bench.peer_dir} (run benchmarks/peers/setup_progressive_cramming.sh);"
              " its phases are skipped", flush=True)  # fmt: skip
        phases = [x for x in phases if x not in PEER_PHASES]
    for name in phases:
        getattr(bench, "phase_" + name.replace("-", "_"))()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
