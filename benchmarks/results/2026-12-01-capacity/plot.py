"""Plot of a ``gradmem-fast capacity`` report: tokens per vector against text length, one point per text.

python benchmarks/results/2026-12-01-capacity/plot.py results.json capacity.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(report_path: str, png_path: str) -> None:
    report = json.load(open(report_path))
    texts = report["texts"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    whole = [t for t in texts if t["complete"]]
    cut = [t for t in texts if not t["complete"]]
    ax.scatter([t["tokens"] for t in cut], [t["tokens_per_vector"] for t in cut], label="prefix decoded exactly")
    if whole:
        ax.scatter(
            [t["tokens"] for t in whole],
            [t["tokens_per_vector"] for t in whole],
            marker="^",
            label="whole text decoded (a lower bound)",
        )
    top = max(t["tokens"] for t in texts)
    given = report["settings"].get("given_tokens", 0)  # given tokens are not decoded
    ax.plot(
        [given, top], [0, (top - given) / report["memory_tokens"]], color="grey", lw=0.8, ls="--", label="whole text"
    )
    for t in texts:
        ax.annotate(
            str(t["id"]), (t["tokens"], t["tokens_per_vector"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    s = report["summary"]
    ax.axhline(s["median_tokens_per_vector"], color="C2", lw=0.8, label=f"median {s['median_tokens_per_vector']:.1f}")
    st = report["settings"]
    ax.set_xlabel("text length (tokens)")
    ax.set_ylabel(f"tokens decoded exactly per vector (N={report['memory_tokens']})")
    first = f", first {given} token(s) given" if given else ""
    ax.set_title(
        f"{report['model']}, {report['dtype']}, <= {st['max_steps_per_stage']} Adam steps/stage, lr {st['lr']}{first}",
        fontsize=9,
    )
    # The diagonal (whole text) runs far above the measured points: show the points, clip the line.
    ax.set_ylim(0, 1.3 * max(t["tokens_per_vector"] for t in texts) + 2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
