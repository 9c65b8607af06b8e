"""Heatmap of a routing-health report: token share per expert, layers x experts (and, against a base
model, the change in share), so collapsed layers and dead experts show at a glance."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moetrim.checkpoint.atomic import atomic_file
from moetrim.checkpoint.reports import png_metadata


def _matrix(report: dict, key: str):
    """Layers x experts array of one share list per layer; NaN where a layer has fewer experts."""
    width = max(l["experts"] for l in report["layers"])
    grid = np.full((len(report["layers"]), width), np.nan)
    for row, layer in enumerate(report["layers"]):
        grid[row, : layer["experts"]] = layer[key]
    return grid


def plot_routing(report: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Write the report of `routing_health` as a PNG (atomically): one panel of token shares, and with a
    base model a second of model minus base share."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = report["layers"]
    with_base = "base_token_share" in layers[0]
    share = _matrix(report, "token_share")
    panels = [(share, "token share", "viridis", 0.0, max(float(np.nanmax(share)), 1e-9))]
    if with_base:
        delta = share - _matrix(report, "base_token_share")
        reach = max(float(np.nanmax(np.abs(delta))), 0.01)  # a flat panel when nothing moved
        panels.append((delta, "token share - base share", "RdBu_r", -reach, reach))
    fig = Figure(figsize=(max(6.0, 0.28 * share.shape[1] + 2.5), 1.0 + 0.45 * len(layers) * len(panels) + 0.6 * len(panels)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (grid, label, cmap, lo, hi) in zip(axes, panels):
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, vmin=lo, vmax=hi)
        ax.set_yticks(range(len(layers)), [str(l["layer"]) for l in layers])
        ax.set_ylabel("layer")
        ax.set_xlabel("expert")
        ax.set_title(label)
        fig.colorbar(im, ax=ax, label=label)
    summary = report["summary"]
    fig.suptitle(f"{title + ': ' if title else ''}routing over {report['tokens']:,} tokens "
                 f"(entropy {summary['entropy']:.2f}, Gini {summary['gini']:.2f}, {summary['dead']} dead)")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata=png_metadata("routing"))  # marked: --overwrite replaces only ours
    return Path(path)
