"""PNG plots: latency CDFs per run, throughput and goodput against offered rate for sweeps."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdfs(runs: dict[str, list], out: Path) -> Path:
    """``runs``: label -> list of metrics.Record. One panel each for TTFT, TPOT and E2E."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (name, fn) in zip(axes, [("TTFT", lambda r: r.ttft), ("TPOT", lambda r: r.tpot),
                                      ("End-to-end latency", lambda r: r.e2e)], strict=True):
        for label, records in runs.items():
            xs = sorted(v * 1000 for r in records if r.ok and r.chunk_times and (v := fn(r)) is not None)
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
        ax.set_title(f"{name} CDF")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def sweep(points: dict[str, list[tuple[float, dict]]], out_dir: Path) -> list[Path]:
    """``points``: label -> [(offered rate, summary)]. Writes throughput and goodput vs offered rate."""
    plt = _plt()
    paths = []
    for key, ylabel, fname in [
        (lambda s: s["throughput"]["output_tokens_per_s"], "output tokens/s", "throughput_vs_rate.png"),
        (lambda s: s["goodput"]["requests_per_s"], "goodput (requests/s meeting the SLO)", "goodput_vs_rate.png"),
    ]:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for label, pts in points.items():
            pts = sorted(pts, key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [key(p[1]) for p in pts], marker="o", label=label)
        if "goodput" in fname:
            rates = sorted({p[0] for pts in points.values() for p in pts})
            ax.plot(rates, rates, linestyle=":", color="grey", label="offered rate")
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" (")[0].capitalize() + " vs offered rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
