"""PNG plots (matplotlib, Agg): latency CDFs per run; throughput and goodput against offered rate for sweeps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pdserve.bench.metrics import Record


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values_ms: list[float], label: str) -> None:
    xs = sorted(values_ms)
    ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=f"{label} (n={len(xs)})")


def latency_cdfs(runs: dict[str, list[Record]], out: Path, title: str = "", slo_ttft_s: float | None = None,
                 slo_tpot_s: float | None = None) -> Path:
    """``runs``: legend label -> records. One panel each for TTFT, TPOT and end-to-end latency, with the
    SLOs drawn where given."""
    plt = _plt()
    panels: list[tuple[str, Callable[[Record], float | None], float | None]] = [
        ("Time to first token", lambda r: r.ttft, slo_ttft_s),
        ("Time per output token", lambda r: r.tpot, slo_tpot_s),
        ("End-to-end latency", lambda r: r.e2e, None),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (name, fn, slo) in zip(axes, panels, strict=True):
        for label, records in runs.items():
            xs = [v * 1000 for r in records if r.ok and (v := fn(r)) is not None]
            if xs:
                _cdf(ax, xs, label)
        if slo is not None:
            ax.axvline(slo * 1000, color="red", linestyle="--", linewidth=1, label=f"SLO {slo * 1000:g} ms")
        ax.set_title(f"{name} CDF")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of successful requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _sweep_fig(plt, points: dict[str, list[tuple[float, dict]]], panels, title: str, out: Path) -> Path:
    """``panels``: [(y label, summary -> y, draw the offered-rate diagonal)]; a y label with "%" is 0..100."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.4))
    rates = sorted({r for pts in points.values() for r, _ in pts})
    for ax, (ylabel, key, diagonal) in zip(axes, panels, strict=True):
        percent = "%" in ylabel
        for label, pts in points.items():
            pts = sorted(pts, key=lambda p: p[0])
            ax.plot([r for r, _ in pts], [key(s) for _, s in pts], marker="o", label=label)
        if diagonal:
            ax.plot(rates, rates, linestyle=":", color="grey", label="offered rate (ideal)")
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 105 if percent else None)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left" if percent else "upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def sweep(points: dict[str, list[tuple[float, dict]]], out_dir: Path, prefix: str = "") -> list[Path]:
    """``points``: legend label -> [(offered rate, metrics.summarize(...))]. Writes
    ``{prefix}-throughput_vs_rate.png`` and ``{prefix}-goodput_vs_rate.png``."""
    plt = _plt()
    prefix = f"{prefix}-" if prefix else ""
    any_summary = next(s for pts in points.values() for _, s in pts)
    g = any_summary["goodput"]
    slo = f"TTFT <= {g['slo_ttft_s'] * 1e3:g} ms and TPOT <= {g['slo_tpot_s'] * 1e3:g} ms"
    throughput = _sweep_fig(plt, points, [
        ("completed requests/s", lambda s: s["throughput"]["requests_per_s"], True),
        ("output tokens/s", lambda s: s["throughput"]["output_tokens_per_s"], False),
    ], "Throughput vs offered rate", out_dir / f"{prefix}throughput_vs_rate.png")
    goodput = _sweep_fig(plt, points, [
        ("goodput (requests/s meeting the SLO)", lambda s: s["goodput"]["requests_per_s"], True),
        ("SLO attainment (% of requests)", lambda s: 100 * s["goodput"]["share"], False),
    ], f"Goodput vs offered rate (SLO: {slo})", out_dir / f"{prefix}goodput_vs_rate.png")
    return [throughput, goodput]
