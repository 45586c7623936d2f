"""The sm_90 compile check really compiles, in the specialisations Triton's launcher produces, and really
fails on shared memory and spills."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def probe(case, arch=90):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "compile_check_probe.py"), case, str(arch)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_small_kernel_compiles_for_sm90_and_sm80():
    for arch in (90, 80):
        rep = probe("fits", arch)
        assert rep["ok"], rep
        assert rep["registers"] > 0  # ptxas really ran on real PTX


def test_shared_memory_over_the_limit_and_spills_fail():
    rep = probe("too_much_shared")
    assert not rep["ok"]
    assert "shared memory" in rep["problems"] and rep["shared"] > 232448
    assert rep["spills"] > 0 and "spills" in rep["problems"]


def test_variants_reproduce_the_launchers_specialisation():
    """What the check hands to ASTSource equals what Triton's own launcher derives from concrete arguments:
    tt.divisibility=16 on 16-byte-aligned pointers and 16-divisible integers, none on an offset view or an odd
    integer, an integer equal to 1 compiled as a constant."""
    rep = probe("specialisation")
    assert rep["check_aligned"] == rep["launch_aligned"]
    assert rep["check_unaligned"] == rep["launch_unaligned"]
    sig, consts, attrs = rep["check_aligned"]
    assert sig["group"] == "constexpr" and [[4], 1] in consts
    assert sum(a == [["tt.divisibility", 16]] for _, a in attrs) == 4
    sig, consts, attrs = rep["check_unaligned"]
    assert sig["group"] == "i32" and sum(a == [["tt.divisibility", 16]] for _, a in attrs) == 1  # out_ptr only
    assert rep["all_hints"] == ["group", "n_cols", "out_ptr", "stride_x", "x_ptr"]


def test_hints_change_the_machine_code():
    """The aligned variant of the probe copy compiles to 16-byte vector loads, the unaligned one to scalar
    16-bit loads (and more registers): the check compiles different kernels per variant."""
    rep = probe("vector_width")
    assert rep["aligned"]["v4_loads"] > 0 and rep["aligned"]["scalar_loads"] == 0
    assert rep["unaligned"]["v4_loads"] == 0 and rep["unaligned"]["scalar_loads"] > 0
    assert rep["aligned"]["ok"] and rep["unaligned"]["ok"]
    assert rep["unaligned"]["registers"] > rep["aligned"]["registers"]


def test_attention_configurations_are_compiled_in_the_specialisation_of_their_table():
    """Each attention configuration is compiled ``aligned`` when the aligned table holds it and ``unaligned``
    when the unaligned one does; the aligned variant hints every tile pointer and stride, the unaligned one
    only the launcher's own buffers; every (kind, dtype, head-dim class) has configurations of both kinds
    unless its table is empty (refused on a GPU)."""
    code = (
        "import json; from gradmem_fast.kernels import attention as A; "
        "print(json.dumps([[s.name, [[v.label, sorted(v.divisible), sorted(v.ones)] for v in s.variants]] "
        "for s in A.compile_specs()]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    specs = json.loads(out.stdout.strip().splitlines()[-1])
    labels_per_class = {}
    tile = {"Q", "K", "V", "stride_qt", "stride_kt", "stride_vt", "stride_qh", "stride_kh", "stride_vh"}
    for name, variants in specs:
        assert variants, name
        cls = name.split("_m")[0]  # attn_<kind>_<dtype>[_ieee]_d<D>
        labels_per_class.setdefault(cls, set()).update(v[0] for v in variants)
        for label, divisible, ones in variants:
            assert label in ("aligned", "unaligned") and not ones, (name, label)
            if name.startswith("attn_") and not name.startswith("attn_bwd_preprocess"):
                if label == "aligned":
                    assert tile <= set(divisible), name
                else:
                    assert not tile & set(divisible), name
    ieee = {c for c in labels_per_class if "_ieee_" in c}
    assert all(labels == {"aligned", "unaligned"} for c, labels in labels_per_class.items() if c not in ieee), {
        c: v for c, v in labels_per_class.items() if v != {"aligned", "unaligned"}
    }
    # the short-document tiles (``_SHORT``) join both tables of short calls: both specialisations, every dtype
    from gradmem_fast.kernels import attention as A

    labels = {name: {v[0] for v in variants} for name, variants in specs}
    dtypes = {2: ("fp16", "bf16"), 4: ("fp32",)}  # fp32: the TF32 tables (IEEE has its own)
    for kind, table in A._SHORT.items():
        for (cls, size), lists in table.items():
            for variant, cfgs in lists.items():
                for (bm, bn, w, s), dt in ((c, dt) for c in cfgs for dt in dtypes[size]):
                    name = f"attn_{kind}_{dt}_d{cls}_m{bm}n{bn}w{w}s{s}{'_dropout' if variant == 'dropout' else ''}"
                    assert labels.get(name) == {"aligned", "unaligned"}, name


def test_launcher_picks_the_table_of_its_specialisation(monkeypatch):
    """On a GPU the attention launcher takes a configuration from the aligned table exactly when Triton will
    compile the aligned specialisation: fused-QKV views and Hugging Face's transposed layout with a head dim
    of 64 are aligned; a head dim of 72 (strides not divisible by 16) or a view at an odd offset are not."""
    import torch

    from gradmem_fast.kernels import attention as A

    picked = []

    class Launch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def tuned(kind, block_d, element_size, dropout, precision, aligned, bucket):
        picked.append(aligned)
        return Launch()

    monkeypatch.setattr(A, "_interpreting", lambda: False)
    monkeypatch.setattr(A, "_tuned", tuned)
    T, H, B, S = 10, 4, 2, 5
    cu = torch.tensor([0, 4, T], dtype=torch.int32)
    varlen = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6, max_seqlen_k=6)
    for D, aligned in ((64, True), (72, False)):
        qkv = torch.randn(T, 3, H, D, dtype=torch.float16)
        A.attention_fwd(qkv[:, 0], qkv[:, 1], qkv[:, 2], **varlen)
        hf = torch.randn(B, H, S, D, dtype=torch.float16).transpose(1, 2)
        A.attention_fwd(hf, hf, hf)
        assert picked == [aligned, aligned], D
        picked.clear()
    x = torch.randn(T * H * 64 + 1, dtype=torch.float16)[1:].view(T, H, 64)
    A.attention_fwd(x, x, x, **varlen)
    assert picked == [False]
    assert A.gpu_configs("fwd", 128, 2, aligned=True) != A.gpu_configs("fwd", 128, 2, aligned=False)


def test_cli_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-m", "gradmem_fast.tools.compile_check"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 2 and "TRITON_INTERPRET" in out.stderr
