"""Markdown tables of a results folder, ready to paste into README.md.

    python -m benchmarks.report                      # the latest GPU results under benchmarks/results/
    python -m benchmarks.report --results DIR --out DIR/report.md

"Latest" is the folder whose ``results.json`` has the newest ``meta.timestamp``; dry runs are used only
with ``--include-dry-run`` (or when nothing else exists). Ratios are taken within the one run, so they
compare implementations on the same card: ``x reference`` = reference time / time, ``x best torch`` =
time of the fastest plain-torch loop (SDPA eager or compiled) / time.
"""

import argparse
import json
import os
import re
import sys

DASH = "—"


# ------------------------------------------------------------------------------------------ loading


def results_root() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def latest_results_dir(root=None, include_dry_run=False):
    root = root or results_root()
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            path = os.path.join(root, name, "results.json")
            if not os.path.isfile(path):
                continue
            try:
                with open(path) as f:
                    meta = json.load(f).get("meta", {})
            except (OSError, ValueError):
                continue
            found.append(
                (
                    bool(meta.get("dry_run")),
                    str(meta.get("timestamp", "")),
                    os.path.getmtime(path),
                    os.path.dirname(path),
                )
            )
    real = [f for f in found if not f[0]]
    pool = real if (real and not include_dry_run) else found
    if not pool:
        return None
    return max(pool, key=lambda f: (f[1], f[2]))[3]


def load(results_dir):
    with open(os.path.join(results_dir, "results.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ formatting


def _num(value, fmt="{:.3g}"):
    if value is None:
        return DASH
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _big(value):
    if value is None:
        return DASH
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _ratio(num, den):
    if not num or not den:
        return DASH
    return f"{num / den:.2f}×"


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _ok(records, **match):
    return [r for r in records if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _get(records, **match):
    rows = _ok(records, **match)
    return rows[0] if rows else None


def _status_cell(records, **match):
    """The value cell for a missing ok record: why it is missing."""
    rows = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    if not rows:
        return DASH
    return rows[0].get("status", DASH)


# ------------------------------------------------------------------------------------------ sections


def write_table(records):
    rows = []
    for model in dict.fromkeys(r.get("case") for r in records if r.get("section") == "write"):
        recs = [r for r in records if r.get("section") == "write" and r.get("case") == model]
        ref = _get(recs, impl="reference")
        torch_ms = [r["ms"] for r in _ok(recs) if r["impl"] in ("torch_sdpa", "torch_sdpa_compiled")]
        best_torch = min(torch_ms) if torch_ms else None
        for impl in dict.fromkeys(r["impl"] for r in recs if r["impl"] != "model"):
            r = _get(recs, impl=impl)
            if r is None:
                rows.append([model, impl] + [_status_cell(recs, impl=impl)] + [DASH] * 5)
                continue
            mem = r.get("peak_mem_mb")
            rows.append(
                [
                    model,
                    impl,
                    _num(r.get("docs_per_s"), "{:.1f}"),
                    _big(r.get("tokens_per_s")),
                    _num(r.get("mfu"), "{:.1%}"),
                    DASH if mem is None else f"{mem / 1024:.2f} GiB",
                    _ratio(ref and ref["ms"], r["ms"]),
                    _ratio(best_torch, r["ms"]),
                ]
            )
    if not rows:
        return ""
    return "#### End-to-end WRITE\n\n" + _table(
        ["model", "implementation", "docs/s", "tokens/s", "MFU", "peak memory", "× reference", "× best torch"], rows
    )


def attention_table(records, mode="fwd+bwd"):
    recs = [r for r in records if r.get("section") == "attention" and r.get("mode") == mode]
    dbwd = mode == "dbwd"  # no FLOP formula for the double backward: milliseconds
    impls = [
        i
        for i in (
            "gradmem_fast",
            "sdpa_flash",
            "sdpa_cudnn",
            "sdpa_efficient",
            "sdpa_math",
            "eager",
            "flash_attn",
            "jvp_flash_attention",
        )
        if any(r["impl"] == i for r in recs)
    ]
    if not recs:
        return ""
    rows = []
    for case, d, dtype in dict.fromkeys((r.get("case"), r.get("head_dim"), r.get("dtype")) for r in recs):
        match = [r for r in recs if (r.get("case"), r.get("head_dim"), r.get("dtype")) == (case, d, dtype)]
        cells = []
        for impl in impls:
            r = _get(match, impl=impl)
            value = _num(r.get("ms"), "{:.3g}") if (r and dbwd) else _num(r.get("tflops"), "{:.1f}") if r else None
            cells.append(value if r else _status_cell(match, impl=impl))
        ours = _get(match, impl="gradmem_fast")
        # The fused SDPA backends have no double backward: there the torch baselines are math and eager.
        base = ("sdpa_math", "eager") if dbwd else tuple(i for i in impls if i.startswith("sdpa_") and i != "sdpa_math")
        base_ms = [r["ms"] for r in _ok(match) if r["impl"] in base]
        rows.append([case, d, dtype] + cells + [_ratio(min(base_ms) if base_ms else None, ours and ours["ms"])])
    what = "double backward (ms)" if dbwd else f"{mode} (TFLOP/s)"
    ratio = "× best torch" if dbwd else "× best SDPA"
    return f"#### Attention {what}\n\n" + _table(["case", "D", "dtype"] + impls + [ratio], rows)


def ce_table(records):
    recs = [r for r in records if r.get("section") == "cross_entropy"]
    if not recs:
        return ""
    rows = []
    for case, mode in dict.fromkeys((r.get("case"), r.get("mode")) for r in recs):
        match = [r for r in recs if (r.get("case"), r.get("mode")) == (case, mode)]
        ours, tor, comp, liger, cce = (
            _get(match, impl=i) for i in ("gradmem_fast", "torch", "torch_compiled", "liger", "cce")
        )
        mem = lambda r: r.get("peak_mem_mb") if r else None  # noqa: E731
        peer_ms = [r["ms"] for r in (liger, cce) if r]
        rows.append(
            [
                case,
                mode,
                _num(ours and ours["ms"]) if ours else _status_cell(match, impl="gradmem_fast"),
                _num(tor and tor["ms"]),
                _num(comp and comp["ms"]),
                _num(liger["ms"]) if liger else _status_cell(match, impl="liger"),
                _num(cce["ms"]) if cce else _status_cell(match, impl="cce"),
                _ratio(tor and tor["ms"], ours and ours["ms"]),
                _ratio(min(peer_ms) if peer_ms else None, ours and ours["ms"]),
                _ratio(mem(ours), mem(tor)).replace("×", "") if mem(ours) and mem(tor) else DASH,
            ]
        )
    header = ["case", "mode", "gradmem_fast", "torch", "torch compiled", "liger", "cce"]
    header += ["speed × torch", "speed × best peer", "memory / torch"]
    return "#### Linear cross-entropy (ms)\n\n" + _table(header, rows)


def update_table(records):
    recs = [r for r in records if r.get("section") == "update"]
    if not recs:
        return ""
    rows = []
    for case, mode in dict.fromkeys((r.get("case"), r.get("mode")) for r in recs):
        match = [r for r in recs if (r.get("case"), r.get("mode")) == (case, mode)]
        ours, tor, comp = (_get(match, impl=i) for i in ("gradmem_fast", "torch", "torch_compiled"))
        rows.append(
            [
                case,
                mode,
                _num(ours["gbps"], "{:.4g}") if ours else _status_cell(match, impl="gradmem_fast"),
                _num(tor and tor["gbps"], "{:.4g}"),
                _num(comp and comp["gbps"], "{:.4g}"),
                _ratio(tor and tor["ms"], ours and ours["ms"]),
            ]
        )
    return "#### Memory update (GB/s)\n\n" + _table(
        ["case", "optimizer", "gradmem_fast", "torch", "torch compiled", "× torch"], rows
    )


def second_order_table(records):
    recs = [r for r in records if r.get("section") == "second_order" and r.get("impl") != "model"]
    if not recs:
        return ""
    rows = []
    for r in recs:
        if r.get("status") != "ok":
            rows.append([r.get("case"), r["impl"], r.get("status"), DASH, DASH, DASH])
            continue
        mem = r.get("peak_mem_mb")
        rows.append(
            [
                r.get("case"),
                r["impl"],
                _num(r.get("ms"), "{:.1f}"),
                DASH if mem is None else f"{mem / 1024:.2f} GiB",
                _num(r.get("speedup_vs_reference"), "{:.2f}×"),
                _num(r.get("memory_vs_reference"), "{:.2f}"),
            ]
        )
    return "#### Second-order meta step\n\n" + _table(
        ["model", "implementation", "ms", "peak memory", "× reference", "memory / reference"], rows
    )


def validation_lines(results_dir):
    lines = []
    path = os.path.join(results_dir, "pytest.txt")
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            tail = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
        summary = next(
            (ln for ln in reversed(tail) if re.search(r"\b(passed|failed|error|skipped)\b", ln)),
            tail[-1] if tail else "no output",
        )
        lines.append(f"- tests on CUDA: {summary.strip('= ')}")
    for tool in ("memcheck", "racecheck", "none"):
        path = os.path.join(results_dir, f"sanitizer-{tool}.txt")
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                text = f.read()
            found = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: .*", text)
            cases = re.findall(r"^CASE \S+: (\w+)", text, flags=re.M)
            tally = ", ".join(f"{cases.count(k)} {k}" for k in ("OK", "SKIP", "FAIL") if k in cases) or "no cases"
            if tool == "none":
                lines.append(f"- kernel cases without compute-sanitizer (not available): {tally}")
            else:
                lines.append(
                    f"- compute-sanitizer {tool}: {found[-1] if found else 'no summary (see file)'}; cases {tally}"
                )
    path = os.path.join(results_dir, "suite_status.tsv")
    if os.path.isfile(path):
        with open(path) as f:
            stages = [line.rstrip("\n").split("\t") for line in f if line.strip()]
        lines.append(
            "- suite stages (exit code, seconds): "
            + ", ".join(f"{st[0]} {st[1]} ({st[2]} s)" for st in stages if len(st) >= 3)
        )
    return lines


def summary(records, sections=None) -> str:
    """Plain-text summary: counts per section and the distinct skip/error reasons."""
    lines = ["", "== summary"]
    for section in dict.fromkeys(r.get("section") for r in records):
        rows = [r for r in records if r.get("section") == section]
        counts = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "error")}
        extra = ""
        if sections and section in sections:
            extra = f" [{sections[section].get('status')}, {sections[section].get('elapsed_s')} s]"
        lines.append(f"{section}: {counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} errors{extra}")
        reasons = {}
        for r in rows:
            if r.get("status") != "ok":
                reasons.setdefault(f"{r['status']}: {str(r.get('reason'))[:160]}", []).append(r.get("impl"))
        for reason, impls in list(reasons.items())[:8]:
            lines.append(f"    {len(impls)}x {reason} ({', '.join(sorted(set(map(str, impls))))})")
    for r in records:
        if r.get("section") == "write" and r.get("status") == "ok" and r.get("speedup_vs_reference"):
            lines.append(f"write {r.get('case')} {r['impl']}: {r['speedup_vs_reference']:.2f}x reference")
    return "\n".join(lines)


def render(results_dir) -> str:
    doc = load(results_dir)
    meta, records = doc.get("meta", {}), doc.get("records", [])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rel = os.path.relpath(os.path.abspath(results_dir), repo)
    if rel.startswith(".."):
        rel = os.path.abspath(results_dir)
    peaks = {r.get("mode"): r for r in _ok(records, section="peak", bench="matmul")}
    copy = _get(records, section="peak", bench="copy")
    head = [
        f"### Benchmarks: {meta.get('gpu', '?')}, {meta.get('date', '?')}"
        + (" (DRY RUN: tiny sizes, not a measurement)" if meta.get("dry_run") else ""),
        "",
        f"Commit `{str(meta.get('commit', '?'))[:12]}`{' (dirty tree)' if meta.get('commit_dirty') else ''}, "
        f"torch {meta.get('torch')}, triton {meta.get('triton')}, transformers {meta.get('transformers')}. "
        f"Generated by `python -m benchmarks.report` from `{rel}/`.",
    ]
    peers = meta.get("peers") or {}
    if peers:
        have = [f"{k} {v}" for k, v in peers.items() if v != "not installed"]
        missing = [k for k, v in peers.items() if v == "not installed"]
        head += [
            "",
            "Peers: "
            + (", ".join(have) or "none installed")
            + (f" (not installed: {', '.join(missing)})" if have and missing else "")
            + ".",
        ]
    if peaks or copy:
        parts = [f"{k} matmul {peaks[k]['tflops']:.4g} TFLOP/s" for k in ("bf16", "fp16", "tf32", "fp32") if k in peaks]
        if copy:
            parts.append(f"device copy {copy['gbps']:.4g} GB/s")
        head += ["", "Measured peak (same run): " + ", ".join(parts) + "."]
    blocks = ["\n".join(head)]
    for block in (
        write_table(records),
        attention_table(records, "fwd+bwd"),
        attention_table(records, "fwd"),
        attention_table(records, "dbwd"),
        ce_table(records),
        update_table(records),
        second_order_table(records),
    ):
        if block:
            blocks.append(block)
    validation = validation_lines(results_dir)
    if validation:
        blocks.append("#### Validation\n\n" + "\n".join(validation))
    missing = not_measured(records)
    if missing:
        blocks.append("#### Not measured in this run\n\n" + "\n".join(missing))
    return "\n\n".join(blocks) + "\n"


def not_measured(records, limit=12):
    """One line per distinct reason a case was skipped or failed: section, implementations, count."""
    reasons = {}
    for r in records:
        if r.get("status") in ("skipped", "error"):
            reason = str(r.get("reason", "")).splitlines()[0][:200]
            key = (r.get("section"), r["status"], reason)
            reasons.setdefault(key, set()).add(str(r.get("impl")))
    lines = []
    for (section, status, reason), impls in sorted(reasons.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))[:limit]:
        lines.append(f"- {section} / {', '.join(sorted(impls))}: {status}: {reason}")
    if len(reasons) > limit:
        lines.append(f"- ... and {len(reasons) - limit} more (see results.json)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    p.add_argument("--results", default=None, help="results folder (default: the latest)")
    p.add_argument("--out", default=None, help="also write the markdown here (default: RESULTS/report.md)")
    p.add_argument("--include-dry-run", action="store_true")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    results_dir = args.results or latest_results_dir(include_dry_run=args.include_dry_run)
    if not results_dir or not os.path.isfile(os.path.join(results_dir, "results.json")):
        print("no results folder with a results.json found", file=sys.stderr)
        return 1
    text = render(results_dir)
    out = args.out or os.path.join(results_dir, "report.md")
    with open(out, "w") as f:
        f.write(text)
    print(text)
    print(f"(written to {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
