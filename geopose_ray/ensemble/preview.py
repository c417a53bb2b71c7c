"""PNG previews of written predictions: RGB | predicted AGL | flow arrows (| true AGL when known).

They read the files exactly as submitted (uint16 cm AGL, px/cm json), so what a preview shows is
what the scorer sees. Matplotlib's object API with an Agg canvas: no pyplot global state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from geopose_ray.atomic import atomic_path
from geopose_ray.data import io
from geopose_ray.submission import prediction_paths

ARROWS = 12  # arrows per side


def _flow(agl: np.ndarray, vflow: io.VFlow) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) flow components in px (x = column right, y = row down), docs/GEOPOSE.md, 'Vector flow'."""
    mag = np.nan_to_num(agl) * vflow.scale  # (H, W) px
    return mag * np.sin(vflow.angle), mag * np.cos(vflow.angle)


def _quiver(ax, agl: np.ndarray, vflow: io.VFlow, color: str, label: str, px_per_arrow: float) -> None:
    """Arrows on a grid, `px_per_arrow` flow px drawn as 1 image px (shared by pred and truth)."""
    h, w = agl.shape
    step = max(1, min(h, w) // ARROWS)
    rows, cols = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    fx, fy = _flow(agl, vflow)
    # angles="xy" in an imshow axis (y grows downward) draws +y down, as the image rows
    ax.quiver(
        cols,
        rows,
        fx[rows, cols],
        fy[rows, cols],
        angles="xy",
        scale_units="xy",
        scale=px_per_arrow,
        color=color,
        label=label,
        width=0.006,
    )


def _arrow_scale(fields: list[tuple[np.ndarray, io.VFlow]], step: int) -> float:
    """Flow px per drawn px so that the longest arrow spans one grid step."""
    longest = max(float(np.nanmax(np.nan_to_num(a))) * abs(v.scale) for a, v in fields)
    return max(longest, 1e-6) / step


def write_preview(
    path: str | Path, rgb: np.ndarray, pred_dir: str | Path, stem: str, truth_dir: str | Path | None = None
) -> Path:
    """One PNG for tile `stem`; the truth panel and arrows appear when `truth_dir` holds the tile."""
    agl_path, vflow_path = prediction_paths(pred_dir, stem)
    agl, vflow = io.read_agl(agl_path), io.read_vflow(vflow_path)
    truth = None
    if truth_dir is not None and all(p.is_file() for p in prediction_paths(truth_dir, stem)):
        t_agl, t_vflow = prediction_paths(truth_dir, stem)
        truth = io.read_agl(t_agl), io.read_vflow(t_vflow)
    panels = 4 if truth else 3
    fig = Figure(figsize=(4 * panels, 4.3), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    vmax = float(np.nanmax([np.nanmax(agl), np.nanmax(truth[0]) if truth else 0.0, 1e-3]))
    axes[0].imshow(rgb)
    axes[0].set_title(stem)
    im = axes[1].imshow(agl, vmin=0, vmax=vmax, cmap="viridis")
    axes[1].set_title("predicted AGL (m)")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[2].imshow(rgb)
    fields = [(agl, vflow), *([truth] if truth else [])]
    k = _arrow_scale(fields, max(1, min(agl.shape) // ARROWS))
    _quiver(axes[2], agl, vflow, "yellow", f"pred {np.degrees(vflow.angle):.0f} deg", k)
    title = f"flow: pred {vflow.scale:.3f} px/m"
    if truth:
        _quiver(axes[2], truth[0], truth[1], "red", f"truth {np.degrees(truth[1].angle):.0f} deg", k)
        title += f", truth {truth[1].scale:.3f}"
        axes[3].imshow(truth[0], vmin=0, vmax=vmax, cmap="viridis")
        axes[3].set_title("true AGL (m)")
    axes[2].set_title(title)
    axes[2].legend(loc="lower right", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def write_previews(
    out_dir: str | Path,
    tiles: list[tuple[str, Path]],
    pred_dir: str | Path,
    truth_dir: str | Path | None = None,
    n: int = 4,
) -> list[Path]:
    """Previews of the first `n` (stem, RGB path) tiles as `out_dir/{stem}.png`."""
    out_dir = Path(out_dir)
    return [
        write_preview(out_dir / f"{stem}.png", io.read_rgb(rgb), pred_dir, stem, truth_dir)
        for stem, rgb in tiles[:n]
    ]
