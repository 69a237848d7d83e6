"""Plot of a conflict map: layer x head heatmaps of OC, FS and score with the skipped heads marked, and a per-layer
summary. Uses matplotlib's object API with the Agg canvas, so it never touches the user's pyplot backend."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .._core.io import atomic_write


if TYPE_CHECKING:
    from .map import ConflictMap


def plot_map(cmap: ConflictMap, path: Path, skip: Mapping[int, list[int]]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = cmap.counts
    L, H = counts.num_layers, counts.num_heads
    marks = [(h, layer) for layer, heads in skip.items() for h in heads]
    panels = [
        ("OC = 1 - cos(G_s, G_u)", cmap.oc, "coolwarm", (0, 2)),
        ("FS (utility sensitivity)", cmap.fs, "viridis", None),
        (f"score ({cmap.combine}, {cmap.normalization})", cmap.score, "magma", None),
    ]
    height = max(4.0, 0.18 * L + 2)
    fig = Figure(figsize=(4.2 * 4, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    for ax, (title, values, colormap, limits) in zip(axes[:3], panels):
        image = ax.imshow(
            values.float().numpy(),
            aspect="auto",
            cmap=colormap,
            interpolation="nearest",
            vmin=None if limits is None else limits[0],
            vmax=None if limits is None else limits[1],
        )
        if marks:
            xs, ys = zip(*marks)
            size = max(12.0, min(60.0, 900.0 / max(L, H)))
            ax.scatter(xs, ys, marker="x", s=size, c="white", linewidths=2.4)  # a halo: visible on any colour
            ax.scatter(xs, ys, marker="x", s=size, c="black", linewidths=1.0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(0, H, max(1, H // 8)))
        ax.set_yticks(range(0, L, max(1, L // 15)))
        fig.colorbar(image, ax=ax, shrink=0.8)
    summary = axes[3]
    layers = list(range(L))
    summary.plot(cmap.oc.mean(1).numpy(), layers, label="mean OC", color="tab:red")
    fs_share = (cmap.fs.sum(1) / cmap.fs.sum().clamp_min(1e-30)).numpy()
    summary.plot(fs_share * L, layers, label="FS share x layers", color="tab:green")
    skipped = [len(skip.get(layer, [])) for layer in layers]
    twin = summary.twiny()
    twin.barh(layers, skipped, color="tab:gray", alpha=0.35, label="skipped heads")
    twin.set_xlabel("skipped heads")
    twin.xaxis.get_major_locator().set_params(integer=True)
    summary.set_ylim(L - 0.5, -0.5)  # layer 0 on top, like the heatmaps
    summary.set_yticks(range(0, L, max(1, L // 15)))
    summary.set_ylabel("layer")
    summary.set_title(f"per layer ({sum(skipped)} of {L * H} heads skipped)", fontsize=10)
    summary.legend(loc="lower right", fontsize=8)
    model = cmap.metadata.get("model", {}).get("name_or_path") or counts.model_type
    fig.suptitle(f"CAST conflict map: {model} (kv_scoring={cmap.kv_scoring})", fontsize=11)
    fmt = path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110))
    return path
