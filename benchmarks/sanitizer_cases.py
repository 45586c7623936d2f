"""One small case per Triton kernel, for ``compute-sanitizer`` (memcheck, racecheck) on a GPU.

    compute-sanitizer --tool memcheck python benchmarks/sanitizer_cases.py
    python benchmarks/sanitizer_cases.py --device cpu      # the same cases in the Triton interpreter
    python benchmarks/sanitizer_cases.py --list | --case NAME ... | --json PATH

Shapes are small and deliberately odd (prime lengths, a length-1 document, head dim 80, GQA, padding,
a vocabulary that no block divides) so that the masked tails of every kernel are exercised. Each case
runs its op forward and backward once on the ``triton`` backend and synchronises; a missing op (another
issue not landed yet) prints SKIP. Output: one ``CASE <name>: OK|SKIP|FAIL ...`` line per case; the exit
status is 1 if any case failed.
"""

import argparse
import json
import os
import sys
import time
import traceback


def _device_from_argv(argv):
    if "--device" in argv:
        i = argv.index("--device")
        if i + 1 < len(argv):
            return argv[i + 1]
    return None


def _setup(device_name):
    # The interpreter must be chosen before Triton is imported anywhere.
    if device_name == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    here = os.path.dirname(os.path.abspath(__file__))
    # Run as a script, this folder is sys.path[0]; its modules must not shadow top-level packages
    # (transformers probes a package named "kernels", for one).
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    root = os.path.dirname(here)
    if root not in sys.path:
        sys.path.insert(0, root)


class Skip(Exception):
    pass


def _need(name):
    import gradmem_fast

    try:
        return getattr(gradmem_fast, name)
    except (ImportError, AttributeError) as exc:
        raise Skip(f"gradmem_fast.{name} not available: {exc}") from None


def _half(device):
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def case_attention_padded(device):
    import torch

    attn = _need("prefix_attention")
    dt = _half(device)
    q = torch.randn(2, 67, 4, 64, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(2, 67 + 5, 2, 64, device=device, dtype=dt, requires_grad=True)  # prefix of 5, GQA 2:1
    v = torch.randn_like(k, requires_grad=True)
    kpm = torch.ones(2, 72, dtype=torch.bool, device=device)
    kpm[1, 60:] = False
    out = attn(q, k, v, key_padding_mask=kpm, causal=True, backend="triton")
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))


def case_attention_varlen(device):
    import torch

    attn = _need("prefix_attention")
    dt = _half(device)
    lengths = [1, 37, 80, 13]
    cu = torch.tensor([0, 1, 38, 118, 131], dtype=torch.int32, device=device)
    total = sum(lengths)
    q = torch.randn(total, 4, 80, device=device, dtype=dt, requires_grad=True)  # head dim 80: padded block
    k = torch.randn(total, 1, 80, device=device, dtype=dt, requires_grad=True)  # MQA
    v = torch.randn_like(k, requires_grad=True)
    out, lse = attn(
        q,
        k,
        v,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=80,
        max_seqlen_k=80,
        causal=True,
        return_lse=True,
        backend="triton",
    )
    torch.autograd.grad((out, lse), (q, k, v), (torch.randn_like(out), torch.randn_like(lse)))


def case_attention_dropout_window(device):
    import torch

    attn = _need("prefix_attention")
    dt = _half(device)
    q = torch.randn(1, 53, 2, 32, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(1, 53, 2, 32, device=device, dtype=dt, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    out = attn(q, k, v, causal=True, window=17, dropout_p=0.1, seed=1234, backend="triton")
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))


def case_linear_cross_entropy(device):
    import torch

    lce = _need("linear_cross_entropy")
    dt = _half(device)
    h = torch.randn(37, 64, device=device, dtype=dt, requires_grad=True)
    w = (torch.randn(1009, 64, device=device, dtype=dt) / 8).requires_grad_(True)
    t = torch.randint(0, 1009, (37,), device=device)
    t[::7] = -100
    loss = lce(h, w, t, reduction="mean", backend="triton", chunk_size=16)
    torch.autograd.grad(loss, (h, w))
    cu = torch.tensor([0, 1, 20, 37], dtype=torch.int32, device=device)
    per_doc = lce(h, w.detach(), t, reduction="sample_mean", cu_seqlens=cu, backend="triton")
    torch.autograd.grad(per_doc, h, torch.randn_like(per_doc))


def case_memory_update(device):
    import torch

    update = _need("memory_update")
    m = torch.randn(5, 3, 67, device=device)
    g = torch.randn_like(m)
    update(m, g, lr=0.1, clip_value=0.5, clip_norm=1.0, backend="triton")
    res = update(m.to(torch.bfloat16), g.to(torch.bfloat16), lr=0.1, optimizer="adam", step=1, backend="triton")
    update(
        m.to(torch.bfloat16), g.to(torch.bfloat16), lr=0.1, optimizer="adam", state=res.state, step=2, backend="triton"
    )


def _tiny_llama(device, attn="eager"):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(device).eval()


def case_hf_attention(device):
    import torch

    register = _need("register_attention")
    register()
    model = _tiny_llama(device, attn="gradmem_fast")
    ids = torch.randint(0, 101, (3, 29), device=device)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()


def case_write_engine(device):
    import torch

    from gradmem_fast import MemoryWriter, WriteConfig

    model = _tiny_llama(device)
    ids = torch.randint(0, 101, (3, 31), device=device)
    mask = torch.ones_like(ids)
    mask[0, 1:] = 0  # a one-token document
    mask[2, 17:] = 0
    writer = MemoryWriter(model, WriteConfig(num_memory_tokens=4, steps=2, clip_norm=1.0), backend="triton")
    writer.write(ids, mask)


CASES = {
    "attention_padded": case_attention_padded,
    "attention_varlen": case_attention_varlen,
    "attention_dropout_window": case_attention_dropout_window,
    "linear_cross_entropy": case_linear_cross_entropy,
    "memory_update": case_memory_update,
    "hf_attention": case_hf_attention,
    "write_engine": case_write_engine,
}


def run_cases(names, device):
    import torch

    results = []
    for name in names:
        start = time.monotonic()
        try:
            torch.manual_seed(0)
            CASES[name](device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            status, reason = "OK", ""
        except Skip as exc:
            status, reason = "SKIP", str(exc)
        except (NotImplementedError, ImportError) as exc:
            status, reason = "SKIP", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - reported, the other cases still run
            status, reason = "FAIL", f"{type(exc).__name__}: {exc}"
            traceback.print_exc(limit=6)
        seconds = time.monotonic() - start
        line = f"CASE {name}: {status}" + (f" ({reason.splitlines()[0][:300]})" if reason else "")
        print(f"{line} [{seconds:.1f} s]", flush=True)
        results.append({"case": name, "status": status, "reason": reason, "seconds": round(seconds, 2)})
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python benchmarks/sanitizer_cases.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (interpreter)")
    p.add_argument("--case", action="append", default=None, choices=sorted(CASES), help="run only these")
    p.add_argument("--list", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1" and "triton" in sys.modules:
        print("the cpu device needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
        return 2
    results = run_cases(args.case or list(CASES), device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "cases": results}, f, indent=1)
    return 1 if any(r["status"] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    _name = _device_from_argv(sys.argv[1:])
    if _name is None:
        import torch

        _name = "cuda" if torch.cuda.is_available() else "cpu"
    _setup(_name)
    sys.exit(main())
