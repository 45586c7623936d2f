"""PNG plots (matplotlib, Agg backend) of a results folder: ``python -m benchmarks.plots DIR``.

One file per section that has records: peak.png, attention.png, cross_entropy.png, update.png,
write.png, second_order.png. A section without a successful measurement still gets a PNG that says so.
Each plot is drawn in its own try/except: a broken plot never loses the others.
"""

import json
import os
import sys
import traceback

IMPL_ORDER = (
    "gradmem_fast",
    "gradmem_ops",
    "reference",
    "torch",
    "torch_sdpa",
    "torch_sdpa_compiled",
    "torch_compiled",
    "sdpa_flash",
    "sdpa_cudnn",
    "sdpa_efficient",
    "sdpa_math",
    "eager",
    "torch.mm",
    "copy_",
)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ordered(names):
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: (IMPL_ORDER.index(n) if n in IMPL_ORDER else len(IMPL_ORDER), n))


def grouped_bars(ax, records, group_key, value_key, title, ylabel, log=False):
    """Bars of ``value_key`` per implementation, grouped by ``group_key(record)``; returns bars drawn."""
    rows = [r for r in records if r.get("status") == "ok" and r.get(value_key) is not None]
    groups = list(dict.fromkeys(group_key(r) for r in rows))
    impls = _ordered(r["impl"] for r in rows)
    ax.set_title(title, fontsize=9)
    if not rows:
        ax.text(0.5, 0.5, "no successful measurement", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return 0
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for g, group in enumerate(groups):
            vals = [r[value_key] for r in rows if r["impl"] == impl and group_key(r) == group]
            if vals:
                xs.append(g - 0.4 + width * (i + 0.5))
                ys.append(vals[0])
        ax.bar(xs, ys, width=width, label=impl)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=6)
    ax.grid(axis="y", alpha=0.3)
    return len(rows)


def _figure(n_panels, width_per=6.0, height=4.0):
    plt = _plt()
    cols = min(n_panels, 2)
    rows = (n_panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width_per * cols, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n_panels:]:
        ax.axis("off")
    return fig, flat[:n_panels]


def _save(fig, path, title):
    plt = _plt()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _subtitle(meta):
    return f"{meta.get('gpu', '?')} | {meta.get('date', '?')} | commit {str(meta.get('commit', '?'))[:10]}" + (
        " | DRY RUN" if meta.get("dry_run") else ""
    )


def _case_label(r):
    return str(r.get("case", ""))


def plot_peak(records, meta, path):
    fig, (ax1, ax2) = _figure(2)
    grouped_bars(
        ax1,
        [r for r in records if r.get("bench") == "matmul"],
        lambda r: r.get("mode"),
        "tflops",
        "dense matmul",
        "TFLOP/s",
    )
    grouped_bars(
        ax2,
        [r for r in records if r.get("bench") == "copy"],
        _case_label,
        "gbps",
        "device-to-device copy",
        "GB/s (read + write)",
    )
    return _save(fig, path, "Measured peak: " + _subtitle(meta))


def plot_attention(records, meta, path):
    modes = list(dict.fromkeys(r.get("mode") for r in records)) or ["fwd"]
    fig, axes = _figure(len(modes), width_per=8.0)
    for ax, mode in zip(axes, modes):
        rows = [r for r in records if r.get("mode") == mode]
        key = "tflops" if any(r.get("tflops") for r in rows) else "ms"
        grouped_bars(
            ax,
            rows,
            lambda r: f"{r.get('case')} D={r.get('head_dim')}",
            key,
            f"attention {mode}",
            "TFLOP/s" if key == "tflops" else "ms (lower is better)",
            log=key == "ms",
        )
    return _save(fig, path, "Prefix attention: " + _subtitle(meta))


def plot_cross_entropy(records, meta, path):
    fig, (ax1, ax2) = _figure(2, width_per=7.0)
    label = lambda r: f"{r.get('case')}\n{r.get('mode')}"  # noqa: E731
    grouped_bars(ax1, records, label, "ms", "time", "ms (lower is better)", log=True)
    if any(r.get("peak_mem_mb") is not None for r in records):
        grouped_bars(ax2, records, label, "peak_mem_mb", "peak memory", "MiB", log=True)
    else:
        grouped_bars(ax2, records, label, "tflops", "throughput", "TFLOP/s")
    return _save(fig, path, "Linear cross-entropy: " + _subtitle(meta))


def plot_update(records, meta, path):
    fig, (ax,) = _figure(1, width_per=10.0)
    grouped_bars(ax, records, lambda r: f"{r.get('case')} {r.get('mode')}", "gbps", "memory update", "GB/s")
    return _save(fig, path, "Memory update: " + _subtitle(meta))


def plot_write(records, meta, path):
    models = list(dict.fromkeys(r.get("case") for r in records)) or ["-"]
    fig, axes = _figure(len(models), width_per=6.0)
    for ax, model in zip(axes, models):
        rows = {
            r["impl"]: r
            for r in records
            if r.get("case") == model and r.get("status") == "ok" and r.get("tokens_per_s")
        }
        names = _ordered(rows)
        ax.set_title(f"WRITE {model}", fontsize=9)
        if not names:
            ax.text(0.5, 0.5, "no successful measurement", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        values = [rows[n]["tokens_per_s"] for n in names]
        ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
        ax.set_ylim(0, max(values) * 1.2)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("context tokens / s", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        for i, name in enumerate(names):
            r = rows[name]
            note = f"x{r['speedup_vs_reference']:.2f}" if r.get("speedup_vs_reference") else ""
            if r.get("mfu") is not None:
                note += f"\nMFU {r['mfu']:.2f}"
            if note:
                ax.annotate(note, (i, values[i]), ha="center", va="bottom", fontsize=6)
    return _save(fig, path, "End-to-end WRITE: " + _subtitle(meta))


def plot_second_order(records, meta, path):
    fig, (ax1, ax2) = _figure(2)
    grouped_bars(ax1, records, _case_label, "ms", "meta step time", "ms (lower is better)")
    if any(r.get("peak_mem_mb") is not None for r in records):
        grouped_bars(ax2, records, _case_label, "peak_mem_mb", "peak memory", "MiB")
    else:
        grouped_bars(ax2, records, _case_label, "docs_per_s", "throughput", "documents / s")
    return _save(fig, path, "Second-order meta step: " + _subtitle(meta))


PLOTTERS = {
    "peak": plot_peak,
    "attention": plot_attention,
    "cross_entropy": plot_cross_entropy,
    "update": plot_update,
    "write": plot_write,
    "second_order": plot_second_order,
}


def make_plots(out_dir: str) -> list:
    """Draw every section's PNG from ``out_dir/results.json``; returns the paths written."""
    with open(os.path.join(out_dir, "results.json")) as f:
        doc = json.load(f)
    records, meta = doc.get("records", []), doc.get("meta", {})
    written = []
    for section, plotter in PLOTTERS.items():
        rows = [r for r in records if r.get("section") == section]
        if not rows:
            continue
        try:
            written.append(plotter(rows, meta, os.path.join(out_dir, f"{section}.png")))
        except Exception:  # noqa: BLE001 - one broken plot must not lose the others
            print(f"plot {section} failed:\n{traceback.format_exc(limit=4)}", file=sys.stderr)
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.plots RESULTS_DIR", file=sys.stderr)
        return 2
    for path in make_plots(argv[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
