"""The card's own ceilings, measured in the same run: dense matmul TFLOP/s per dtype and copy bandwidth.

    matmul  C = A @ B, A [n, n], B [n, n]:   FLOPs = 2 n^3          (torch.mm, cuBLAS)
    copy    dst.copy_(src), N bytes:         bytes moved = 2 N      (read + write), GB/s = 1e9 bytes/s

MFU of the WRITE benchmarks divides by the matmul figure of the model's dtype (``bf16``/``fp16``; ``fp32``
means IEEE fp32, torch's default for matmuls; ``tf32`` is listed for reference).
"""

import torch

from .common import bench_ms, tflops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


def sizes(dry_run: bool) -> dict:
    if dry_run:
        return {"matmul_n": 128, "copy_bytes": 4 << 20}
    return {"matmul_n": 8192, "copy_bytes": 1 << 30}


def _matmul_case(n, key, device, timing):
    dtype = DTYPES[key]

    def measure():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if key == "tf32" else "highest")
        try:
            ms = bench_ms(lambda: torch.mm(a, b), device, **timing)
        finally:
            torch.set_float32_matmul_precision(old)
        return {"ms": ms, "tflops": tflops(2 * n**3, ms), "flops": 2 * n**3}

    return measure


def _copy_case(nbytes, device, timing):
    def measure():
        src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
        dst = torch.empty_like(src)
        ms = bench_ms(lambda: dst.copy_(src), device, **timing)
        return {"ms": ms, "gbps": 2 * nbytes / (ms * 1e-3) / 1e9, "bytes": 2 * nbytes}

    return measure


def run(rec, device, dry_run: bool, timing: dict) -> None:
    s = sizes(dry_run)
    n = s["matmul_n"]
    for key in DTYPES:
        rec.case(
            "matmul",
            "torch.mm",
            _matmul_case(n, key, device, timing),
            device=device,
            mode=key,
            case=f"n={n}",
            dtype=key,
        )
    rec.case(
        "copy",
        "copy_",
        _copy_case(s["copy_bytes"], device, timing),
        device=device,
        mode="d2d",
        case=f"{s['copy_bytes'] >> 20} MiB",
        dtype="fp32",
    )


def peaks(records) -> dict:
    """{"bf16": TFLOP/s, "fp16": ..., "fp32": ..., "tf32": ..., "copy_gbps": GB/s} from peak records."""
    out = {}
    for r in records:
        if r.get("section") != "peak" or r.get("status") != "ok":
            continue
        if r.get("bench") == "matmul" and r.get("tflops"):
            out[r["mode"]] = r["tflops"]
        elif r.get("bench") == "copy" and r.get("gbps"):
            out["copy_gbps"] = r["gbps"]
    return out


def dtype_key(dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
