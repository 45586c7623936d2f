"""Plot held-out exact match of KV-retrieval runs (the ``--curve-out`` JSON files of train_kv_retrieval.py).

    python examples/plot_kv_curves.py OUT.png LABEL=curve.json [LABEL=curve.json ...]

Left panel: exact match against outer steps; right panel: against process CPU seconds (cumulative over a
curriculum when a label lists several files joined by ``+``: ``"2 pairs, curriculum=p1.json+p2.json"``).
"""

import json
import sys
from pathlib import Path


def load(spec: str):
    """(label, [(step, em, cpu_s)], stage boundaries) of ``LABEL=a.json[+b.json...]`` (stages chained)."""
    label, _, files = spec.rpartition("=")
    points, bounds, step0, cpu0 = [], [], 0, 0.0
    for i, name in enumerate(files.split("+")):
        curve = json.loads(Path(name).read_text())["curve"]
        if i:
            bounds.append(step0)
        points += [(step0 + s, em, cpu0 + cpu) for s, em, _, cpu in curve]
        step0, cpu0 = points[-1][0], points[-1][2]
    return label or Path(files).stem, points, bounds


def main(argv=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit(__doc__)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for spec in argv[1:]:
        label, points, bounds = load(spec)
        steps, em, cpu = zip(*points)
        (line,) = ax1.plot(steps, [100 * e for e in em], marker=".", label=label)
        ax2.plot([c / 60 for c in cpu], [100 * e for e in em], marker=".", color=line.get_color(), label=label)
        for b in bounds:
            ax1.axvline(b, color=line.get_color(), linestyle=":", linewidth=1)
    for ax, xlabel in ((ax1, "outer steps"), (ax2, "process CPU minutes (1 torch thread)")):
        ax.axhline(90, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out exact match (%)")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle("GradMemModel on KV retrieval (CPU, 4x128 Llama, m=8, write head; settings per curve)", fontsize=9)
    fig.tight_layout()
    Path(argv[0]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(argv[0], dpi=110)
    print(argv[0])


if __name__ == "__main__":
    main()
