"""Mutation check: plant known one-line bugs in the kernels and ops and make sure the tests catch each one.

    python scripts/mutants.py              # every mutant: killed/total table, exit 1 if one survives
    python scripts/mutants.py --check      # only verify that every mutant's original snippet is still there
    python scripts/mutants.py --only NAME  # some mutants (repeatable); --list prints them

The working tree (tracked and untracked-not-ignored files, as they are now) is copied into a scratch
folder; nothing in the checkout is touched. First the union of the mutants' test selections runs on the
unmutated copy (it must pass, or "killed" would mean nothing); then, for each mutant, its snippet is
replaced in the copy, only the tests named for it run (``pytest -x``), and the file is restored. A mutant is
*killed* when its tests fail, *survives* when they pass. A snippet that is missing, or found more than once
in the files named, is an error: the table of mutants must follow the code (kernels are being refactored).

Each mutant is one realistic bug: an off-by-one at a tile boundary, a wrong constant, a dropped scale.
When one survives, the fix is a test, never a different mutant.
"""

import argparse
import dataclasses
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    files: str  # a path or glob relative to the repository root; the snippet must occur once among them
    original: str
    replacement: str
    tests: tuple  # pytest arguments: paths, node ids, -k expressions
    why: str


def _k(path, expr):
    return (path, "-k", expr)


MUTANTS = [
    Mutant(
        "attn_full_hi_one_key_too_far",
        "kernels/attention*.py",
        "full_hi = tl.minimum(k_len, m0 + diag + 1)",
        "full_hi = tl.minimum(k_len, m0 + diag + 2)",
        _k("tests/test_kernel_tiles.py", "varlen-edges-fwd or varlen-edges-dq"),
        "the last key of a causal block is treated as visible to every row of the block",
    ),
    # Classes that survived a mutation tool (issue 28, benchmarks/results/mutation/): block ranges one key or
    # one query block off, which only a residue of Lk - Lq or of the window modulo the tile shows.
    Mutant(
        "attn_window_lo_one_key_late",
        "kernels/attention_common.py",
        "lo = tl.maximum(m0 + diag - window + 1, 0) // BLOCK_N * BLOCK_N",
        "lo = tl.maximum(m0 + diag - window + 2, 0) // BLOCK_N * BLOCK_N",
        _k("tests/test_attention_boundaries.py", "16x32-window"),
        "a query block's first key block skipped when its window edge is the block's last key",
    ),
    Mutant(
        "attn_query_range_lo_one_late",
        "kernels/attention_common.py",
        "lo = tl.maximum(n0 - diag, 0) // BLOCK_M * BLOCK_M",
        "lo = tl.maximum(n0 - diag + 1, 0) // BLOCK_M * BLOCK_M",
        _k("tests/test_attention_boundaries.py", "16x16-causal"),
        "key-side kernels skip the query block whose last row is the first to see the key block",
    ),
    Mutant(
        "attn_query_range_window_hi_short",
        "kernels/attention_common.py",
        "hi = tl.minimum(q_len, tl.minimum(n0 + BLOCK_N, k_len) - 1 - diag + window)",
        "hi = tl.minimum(q_len, tl.minimum(n0 + BLOCK_N, k_len) - 2 - diag + window)",
        _k("tests/test_attention_boundaries.py", "16x32-window"),
        "key-side kernels stop one query early at the window's far edge",
    ),
    Mutant(
        "attn_unmasked_blocks_rounded_up",
        "kernels/attention_common.py",
        "c = lo + tl.maximum(full_hi - lo, 0) // BLOCK * BLOCK",
        "c = lo + tl.cdiv(tl.maximum(full_hi - lo, 0), BLOCK) * BLOCK",
        _k("tests/test_attention_boundaries.py", "16x16-causal"),
        "a partly visible block at the diagonal runs without the causal mask",
    ),
    Mutant(
        "attn_fp64_rescale_wrong_slot",
        "kernels/attention_common.py",
        "rescale = tl.load(Params + 2)",
        "rescale = tl.load(Params + 3)",
        _k("tests/test_attention_boundaries.py", "fp64_dropout"),
        "fp64 calls read the dropout rescale from the neighbouring scalar (log2 e)",
    ),
    Mutant(
        "update_sgd_backward_clamp_passes_gradient",
        "gradmem_fast/ops/update.py",
        "dh = torch.where(inside, dh, torch.zeros_like(dh))",
        "dh = torch.where(inside | True, dh, torch.zeros_like(dh))",
        _k("tests/test_option_matrix.py", "update_op_matrix and sgd-0.005 and second and triton32"),
        "the Triton SGD update's analytic backward lets the gradient through clamped entries (only with the "
        "triton backend x second order x clip_value together)",
    ),
    Mutant(
        "attn_causal_diagonal",
        "kernels/attention*.py",
        "valid = valid & (cols <= rows + diag)",
        "valid = valid & (cols < rows + diag)",
        _k("tests/test_attention.py", "test_padded and len7"),
        "a query no longer sees its own key",
    ),
    Mutant(
        "attn_gqa_head_mapping",
        "kernels/attention_fwd.py",
        "hk = h // group",
        "hk = h % (num_heads // group)",
        _k("tests/test_attention.py", "key_padding_left_right"),
        "query heads interleaved over KV heads instead of grouped (forward)",
    ),
    Mutant(
        "attn_lse_natural_log",
        "kernels/attention_fwd.py",
        "(m_i + tl.math.log2(l_safe)) * ln2",
        "(m_i + tl.math.log2(l_safe))",
        _k("tests/test_attention.py", "test_padded and len7"),
        "the saved log-sum-exp stays in base 2 (the backward recomputes wrong probabilities)",
    ),
    Mutant(
        "attn_dropout_rescale",
        "kernels/attention.py",
        "rescale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0",
        "rescale = 1.0",
        _k("tests/test_attention.py", "dropout_same_mask"),
        "kept probabilities are not scaled by 1/(1-p)",
    ),
    Mutant(
        "attn_varlen_key_offsets",
        "kernels/attention*.py",
        "k_start = tl.load(CuK + b)",
        "k_start = tl.load(CuQ + b)",
        _k("tests/test_attention.py", "varlen_ragged"),
        "keys of a packed sequence located with the query offsets",
    ),
    Mutant(
        "loss_alignment_reference",
        "gradmem_fast/reference.py",
        "hidden[:, m - 1 : m + S - 1]",
        "hidden[:, m : m + S]",
        _k("tests/test_reference.py", "sgd_matches_eager_all_families and gpt2"),
        "position m+j (not m-1+j) predicts token j",
    ),
    Mutant(
        "loss_alignment_packed",
        "gradmem_fast/packing.py",
        "loss_rows = cu[:-1][tok_doc] + m - 1 + j",
        "loss_rows = cu[:-1][tok_doc] + m + j",
        _k("tests/test_engine.py", "torch_ops_match_reference_fp64 and gpt2"),
        "the engine's loss rows shifted by one",
    ),
    Mutant(
        "update_clip_eps_1e-5",
        "kernels/update.py",
        "clip_norm / (n + 1e-6)",
        "clip_norm / (n + 1e-5)",
        _k("tests/test_write_delta.py", "norm_clip_change_at_small_norms"),
        "norm-clip epsilon 1e-5 instead of 1e-6 (kernel)",
    ),
    Mutant(
        "update_clip_eps_0",
        "kernels/update.py",
        "clip_norm / (n + 1e-6)",
        "clip_norm / (n + 0.0)",
        _k("tests/test_write_delta.py", "norm_clip_change_at_small_norms"),
        "norm-clip epsilon dropped (kernel)",
    ),
    Mutant(
        "update_clip_eps_torch",
        "gradmem_fast/ops/update.py",
        "NORM_EPS = 1e-6",
        "NORM_EPS = 1e-5",
        _k("tests/test_write_delta.py", "norm_clip_change_at_small_norms"),
        "norm-clip epsilon 1e-5 instead of 1e-6 (torch backend, the reference)",
    ),
    Mutant(
        "adam_ignores_clip_norm_kernel",
        "kernels/update.py",
        "HAS_CLIP_NORM=clip_norm is not None,",
        "HAS_CLIP_NORM=clip_norm is not None and not adam,",
        _k("tests/test_write_delta.py", "adam_norm_clip_change"),
        "the fused Adam update skips the norm clip",
    ),
    Mutant(
        "adam_ignores_clip_norm_op",
        "gradmem_fast/ops/update.py",
        "clip_norm=clip_norm,",
        "clip_norm=None,",
        _k("tests/test_write_delta.py", "adam_norm_clip_change"),
        "the op does not pass clip_norm to the Adam kernel",
    ),
    Mutant(
        "adam_ignores_clip_norm_torch",
        "gradmem_fast/ops/update.py",
        "g = clip_torch(grad.detach().to(dt), clip_value, clip_norm)",
        "g = clip_torch(grad.detach().to(dt), clip_value, None)",
        _k("tests/test_write_delta.py", "adam_norm_clip_change or (torch and adam_clip_norm)"),
        "the torch Adam (the reference's) skips the norm clip",
    ),
    Mutant(
        "adam_ignores_clip_norm_engine",
        "gradmem_fast/engine.py",
        "clip_norm=config.clip_norm,",
        "clip_norm=None if config.optimizer == 'adam' else config.clip_norm,",
        _k("tests/test_write_delta.py", "triton-adam_clip_norm"),
        "the engine drops clip_norm for Adam",
    ),
    Mutant(
        "adam_bias_correction_kernel",
        "kernels/update.py",
        "inv_bc1 = (1.0 / (1.0 - tl.exp(t * log_beta1))).to(tl.float32)",
        "inv_bc1 = (t * 0.0 + 1.0).to(tl.float32)",
        _k("tests/test_write_delta.py", "adam_norm_clip_change and triton"),
        "Adam's first moment not bias-corrected (kernel)",
    ),
    Mutant(
        "adam_bias_correction_torch",
        "gradmem_fast/ops/update.py",
        "m_hat = exp_avg / _bias_correction(b1, step, dt, memory.device)",
        "m_hat = exp_avg",
        _k("tests/test_write_delta.py", "adam_norm_clip_change and torch"),
        "Adam's first moment not bias-corrected (torch backend)",
    ),
    Mutant(
        "adam_betas_ignored_engine",
        "gradmem_fast/engine.py",
        "betas=config.adam_betas,",
        "betas=(0.9, 0.999),",
        _k("tests/test_write_delta.py", "triton-adam_clip_norm"),
        "the engine runs Adam with the default betas whatever the config says",
    ),
    Mutant(
        "autotune_keeps_atomic_accumulators",
        "kernels/attention.py",
        "reset_to_zero=_ATOMIC_OUTPUTS.get(kind)",
        "reset_to_zero=None",
        ("tests/test_attention_bwd_atomic.py::test_autotuning_call_zeroes_the_atomic_accumulators",),
        "on a GPU the tuning call returns dQ / grad q summed over every timed run",
    ),
    Mutant(
        "given_tokens_still_predicted_engine",
        "gradmem_fast/packing.py",
        "t[:given_tokens] = IGNORE_INDEX",
        "t[:0] = IGNORE_INDEX",
        _k("tests/test_given_tokens.py", "engine_write_equals_the_reference and torch"),
        "the engine's loss still predicts the given tokens",
    ),
    Mutant(
        "given_tokens_prefix_not_offset",
        "gradmem_fast/scoring.py",
        "prefix = torch.minimum(self.first_wrong - start, self.tokens)",
        "prefix = torch.minimum(self.first_wrong, self.tokens)",
        _k("tests/test_given_tokens.py", "scores_count_from_the_first_predicted_token"),
        "with given tokens, the exact prefix counts the given ones too",
    ),
    Mutant(
        "ce_softcap_dh_without_tanh_derivative",
        "kernels/cross_entropy.py",
        "        p = p * (1.0 - th * th)\n",
        "        p = p\n",
        _k("tests/test_cross_entropy_logit_transform.py", "kernels_directly_softcap"),
        "the soft-capped logits' gradient misses the tanh derivative in the Triton dH / dW / db prologue",
    ),
    Mutant(
        "ce_logit_scale_not_in_backward",
        "gradmem_fast/ops/cross_entropy.py",
        "            g = g * transform[0]\n",
        "            g = g\n",
        _k("tests/test_cross_entropy_logit_transform.py", "first_order and float64 and scale and sum-torch"),
        "the backward forgets the chain factor s of z = s (W h + b): gradients off by 1/s",
    ),
    Mutant(
        "ce_logit_scale_twice_in_backward",
        "gradmem_fast/ops/cross_entropy.py",
        "            g = g * transform[0]\n",
        "            g = g * transform[0] * transform[0]\n",
        _k("tests/test_cross_entropy_logit_transform.py", "frozen_head and third-triton"),
        "the scale is applied twice in the backward (once in the GEMM, once more in g_i)",
    ),
    Mutant(
        "ce_second_order_softcap_curvature_sign",
        "gradmem_fast/ops/cross_entropy.py",
        "curv = a * q * th * dphi * (-2.0 / softcap)",
        "curv = a * q * th * dphi * (2.0 / softcap)",
        _k("tests/test_cross_entropy_logit_transform.py", "second_order and softcap-sum-torch"),
        "the double backward's tanh curvature term has the wrong sign",
    ),
    Mutant(
        "ce_torch_stats_without_softcap",
        "gradmem_fast/ops/cross_entropy.py",
        "    zf, _ = _softcapped(z, lse.dtype, softcap)\n",
        "    zf, _ = _softcapped(z, lse.dtype, None)\n",
        _k("tests/test_cross_entropy_logit_transform.py", "first_order and float64 and softcap-none-torch"),
        "the torch backend's loss and lse ignore the soft-capping (the gradient keeps it)",
    ),
    Mutant(
        "engine_ignores_logit_postprocessing",
        "gradmem_fast/engine.py",
        "    logit_scale, softcap = head_logit_transform(model, head_weight)\n",
        "    logit_scale, softcap = 1.0, None\n",
        _k("tests/test_logit_postprocessing_models.py", "first_order and gemma2"),
        "the packed engine's loss uses the head's raw output for a soft-capping model (Gemma 2)",
    ),
    Mutant(
        "adamw_decay_without_lr_kernel",
        "kernels/update.py",
        "mem = mem * (1.0 - lr_v * weight_decay)",
        "mem = mem * (1.0 - weight_decay)",
        _k("tests/test_update_adamw.py", "kernel_equals_the_written_out_loop and dtype0"),
        "the fused AdamW decays by wd instead of lr * wd",
    ),
    Mutant(
        "adamw_decay_after_step_torch",
        "gradmem_fast/ops/update.py",
        "    new = start - lr_v * (m_hat / (v_hat.sqrt() + ADAM_EPS))\n",
        "    new = (start - lr_v * (m_hat / (v_hat.sqrt() + ADAM_EPS))) * (1.0 - lr_v * weight_decay)\n",
        _k("tests/test_update_adamw.py", "per_document and torch"),
        "the torch AdamW decays the stepped memory (a second time) instead of only the memory before the step",
    ),
    Mutant(
        "adamw_decay_dropped_engine",
        "gradmem_fast/engine.py",
        "                weight_decay=config.weight_decay,\n",
        "",
        _k("tests/test_update_adamw.py", "whole_write and engine"),
        "the engine writes AdamW as plain Adam",
    ),
    Mutant(
        "adamw_decay_dropped_cramming",
        "gradmem_fast/cramming.py",
        "                        weight_decay=self.config.weight_decay,\n",
        "",
        _k("tests/test_update_adamw.py", "whole_write and cramming"),
        "the cramming slot loop writes AdamW as plain Adam",
    ),
    Mutant(
        "attn_softcap_slope_dropped_dkdv",
        "kernels/attention_bwd.py",
        "dsT = (pT * (dpT - delta[None, :]) * cap_slope(sT, SOFTCAP)).to(q.dtype)",
        "dsT = (pT * (dpT - delta[None, :])).to(q.dtype)",
        _k("tests/test_attention_softcap_sinks.py", "fp64_three_orders and padded-softcap"),
        "the backward forgets the cap's tanh derivative on the way to dk (and the atomic dq)",
    ),
    Mutant(
        "attn_softcap_slope_dropped_dq",
        "kernels/attention_bwd.py",
        "ds = ds * cap_slope(s, SOFTCAP)",
        "ds = ds",
        _k("tests/test_attention_softcap_sinks.py", "fp64_three_orders and padded-softcap"),
        "the split dQ kernel forgets the cap's tanh derivative",
    ),
    Mutant(
        "attn_softcap_curvature_sign",
        "kernels/attention_dbwd.py",
        "gT = gT * slopeT - curvT",
        "gT = gT * slopeT + curvT",
        _k("tests/test_attention_softcap_sinks.py", "fp64_three_orders and padded-softcap"),
        "the double backward's second derivative of tanh enters grad k with the wrong sign",
    ),
    Mutant(
        "attn_softcap_curvature_dropped_dq",
        "kernels/attention_dbwd.py",
        "g = g * slope - ds * bb * (s * (2.0 / (SOFTCAP * SOFTCAP * 1.4426950408889634)))",
        "g = g * slope",
        _k("tests/test_attention_softcap_sinks.py", "fp64_three_orders and padded-softcap"),
        "the grad-q pass of the double backward drops the dS B s'' term",
    ),
    Mutant(
        "attn_softcap_slope_in_b_dropped",
        "kernels/attention_dbwd.py",
        "                bb = bb * slope\n",
        "                bb = bb\n",
        _k("tests/test_attention_softcap_sinks.py", "fp64_three_orders and padded-softcap"),
        "the double backward's row pass takes B in raw-score units (beta, psi, grad dO off)",
    ),
    Mutant(
        "attn_sink_missing_from_lse",
        "gradmem_fast/ops/attention.py",
        "new_lse = shift + torch.log(torch.exp(lse - shift) + torch.exp(sink - shift))",
        "new_lse = shift + torch.log(torch.exp(lse - shift) + 0 * torch.exp(sink - shift))",
        _k("tests/test_attention_softcap_sinks.py", "fp64_three_orders and padded-sinks"),
        "the sink column is left out of the normaliser on the Triton backend",
    ),
    Mutant(
        "attn_sink_head_order",
        "gradmem_fast/ops/attention.py",
        "    sink = sinks.to(lse.dtype)\n",
        "    sink = sinks.flip(0).to(lse.dtype)\n",
        _k("tests/test_attention_softcap_sinks.py", "fp64_three_orders and padded-sinks"),
        "each query head gets another head's sink logit on the Triton backend",
    ),
    Mutant(
        "attn_softcap_ignored_torch_backend",
        "gradmem_fast/ops/attention.py",
        "        s = softcap * torch.tanh(s / softcap)  # capped before any mask, as Gemma 2's eager attention does\n",
        "        s = s\n",
        _k("tests/test_attention_softcap_sinks.py", "torch_backend"),
        "the torch backend ignores softcap",
    ),
]


def _scratch_copy(dest: str, rev=None) -> None:
    """Copy tracked and untracked-not-ignored files (their working-tree content) into ``dest``, or with
    ``rev`` the tree of that commit."""
    if rev:
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
        return
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    for rel in sorted(set(p for p in out.stdout.decode().split("\0") if p)):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src) or os.path.islink(src):
            continue  # deleted in the working tree, or a link
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(src, target)


def locate(root: str, mutant: Mutant) -> str:
    """The one file under ``root`` holding the mutant's snippet exactly once; ValueError otherwise."""
    hits = []
    for path in sorted(glob.glob(os.path.join(root, mutant.files))):
        with open(path) as f:
            count = f.read().count(mutant.original)
        hits += [os.path.relpath(path, root)] * count
    if len(hits) != 1:
        where = f"found {len(hits)} times ({', '.join(hits)})" if hits else "not found"
        raise ValueError(f"mutant {mutant.name}: snippet {mutant.original!r} {where} in {mutant.files}")
    return hits[0]


def _pytest(root: str, args, timeout: float):
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *args]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = "timeout", (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
    return rc, out, time.monotonic() - start


def _check_imports(root: str) -> None:
    """The scratch copy's package must be the one imported (not the checkout's editable install)."""
    code = (
        "import gradmem_fast, gradmem_fast.kernels as k, os; "
        "print(os.path.dirname(os.path.dirname(gradmem_fast.__file__))); "
        "print(os.path.dirname(os.path.dirname(k.__file__)))"
    )
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    dirs = out.stdout.split()
    if out.returncode != 0 or any(os.path.realpath(d) != os.path.realpath(root) for d in dirs) or len(dirs) != 2:
        raise SystemExit(f"mutants: the scratch copy does not import its own package:\n{out.stdout}{out.stderr}")


def _select(names):
    if not names:
        return list(MUTANTS)
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"mutants: unknown mutant(s) {unknown}; --list shows them")
    return [known[n] for n in names]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only check that every snippet is found once")
    p.add_argument("--list", action="store_true", help="print the mutants and their tests")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this mutant")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selections")
    p.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--rev", default=None, help="mutate this commit's tree instead of the working tree")
    p.add_argument(
        "--tests",
        default=None,
        metavar="'ARGS'",
        help="pytest arguments (one quoted string) replacing every mutant's own selection (a control: "
        "does this suite kill them?)",
    )
    args = p.parse_args(argv)
    mutants = _select(args.only)
    if args.tests:
        mutants = [dataclasses.replace(m, tests=tuple(shlex.split(args.tests))) for m in mutants]
    if args.list:
        for m in mutants:
            print(f"{m.name:34s} {m.files:26s} {' '.join(m.tests)}\n{'':34s} {m.why}")
        return 0

    scratch = tempfile.mkdtemp(prefix="gradmem-mutants-")
    try:
        _scratch_copy(scratch, args.rev)
        problems, where = [], {}
        for m in mutants:
            try:
                where[m.name] = locate(scratch, m)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            print("mutants: the table no longer matches the code:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 2
        if args.check:
            print(f"mutants: all {len(mutants)} snippets found once each")
            return 0
        _check_imports(scratch)

        if not args.no_baseline:
            # Each distinct selection once, unmutated.
            selections = []
            for m in mutants:
                if m.tests not in selections:
                    selections.append(m.tests)
            for sel in selections:
                rc, out, secs = _pytest(scratch, sel, args.timeout)
                print(
                    f"baseline {' '.join(sel)}: {'pass' if rc == 0 else f'FAIL (rc {rc})'} in {secs:.0f}s", flush=True
                )
                if rc != 0:
                    print(out[-4000:], file=sys.stderr)
                    print("mutants: the unmutated tree fails a selection; fix that first", file=sys.stderr)
                    return 2

        rows = []
        for m in mutants:
            path = os.path.join(scratch, where[m.name])
            with open(path) as f:
                text = f.read()
            line = text[: text.index(m.original)].count("\n") + 1
            with open(path, "w") as f:
                f.write(text.replace(m.original, m.replacement, 1))
            try:
                rc, out, secs = _pytest(scratch, m.tests, args.timeout)
            finally:
                with open(path, "w") as f:
                    f.write(text)
            if rc == 0:
                verdict = "SURVIVED"
            elif rc in (1, "timeout"):
                verdict = "killed" if rc == 1 else "killed (timeout)"
            else:  # 2-5: interrupted, internal error, usage error, nothing collected
                verdict = f"ERROR (pytest rc {rc})"
            failed = next((ln for ln in out.splitlines() if ln.startswith("FAILED")), "")
            rows.append((m.name, f"{where[m.name]}:{line}", verdict, secs, failed[7:110]))
            print(f"{m.name}: {verdict} in {secs:.0f}s {failed[7:110]}", flush=True)
            if verdict.startswith("ERROR"):
                print(out[-3000:], file=sys.stderr)

        killed = sum(r[2].startswith("killed") for r in rows)
        print("\n| mutant | where | result | s | first failing test |\n|---|---|---|---|---|")
        for name, loc, verdict, secs, failed in rows:
            print(f"| {name} | {loc} | {verdict} | {secs:.0f} | {failed} |")
        print(f"\nmutants killed: {killed}/{len(rows)}")
        return 0 if killed == len(rows) else 1
    finally:
        if args.keep:
            print(f"scratch copy kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
