"""The reviewer's figure: the bias-corrected T1 with the tissue labels over it.

Three rows (axial, coronal, sagittal), four slices each through the brain
mask, GM/WM/CSF coloured and the brain mask outlined, so a reviewer sees at a
glance a mask that cuts brain or takes in scalp and a segmentation that swaps
tissues.

No face: only the voxels within :data:`FIGURE_MARGIN_MM` of the brain mask are
drawn (the rest is black) and each panel is cropped to them. A head T1 shows the
face in its sagittal and low axial slices, and a figure leaves the restricted
stores with the QC pages (HIPAA Safe Harbor counts "full face photographic
images and any comparable images"); the nearest skin, the forehead's, lies 13-21 mm
from the brain mask in the T1s here (the head check's scalp margin), while 4 mm
still shows whether the mask cuts brain or takes in scalp.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in containers or CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from scipy import ndimage  # noqa: E402

#: Voxels farther than this (mm) from the brain mask are not drawn.
FIGURE_MARGIN_MM = 4.0
#: Colours for dseg labels 1 GM, 2 WM, 3 CSF.
_COLOURS = ListedColormap(["#f5a623", "#4a90e2", "#7ed321"])


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _slices(mask: np.ndarray, axis: int, count: int) -> list[int]:
    extent = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    if extent.size == 0:
        return [mask.shape[axis] // 2] * count
    return [int(v) for v in np.linspace(extent[0], extent[-1], count + 2)[1:-1].round()]


def _take(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    # Transpose so that the second voxel axis runs up the figure (RAS input).
    return np.take(vol, index, axis=axis).T


def near_brain(mask: np.ndarray, zooms: tuple[float, ...], margin_mm: float = FIGURE_MARGIN_MM) -> np.ndarray:
    """The voxels within ``margin_mm`` of the brain mask (all of them if the mask is empty)."""
    if not mask.any():
        return np.ones(mask.shape, bool)
    return ndimage.distance_transform_edt(~mask, sampling=zooms[:3]) <= margin_mm


def overlay_png(
    path: Path, t1: np.ndarray, dseg: np.ndarray, mask: np.ndarray, title: str,
    zooms: tuple[float, ...], count: int = 4,
) -> None:
    """Write the overlay figure of ``t1`` (RAS voxel order) with ``dseg`` and ``mask``.

    Only the voxels :func:`near_brain` are drawn, each panel cropped to them: nothing farther
    from the brain than :data:`FIGURE_MARGIN_MM` (the face, the ears) changes the figure.
    """
    inside = t1[mask] if mask.any() else t1.ravel()
    vmin, vmax = np.percentile(inside, [1, 99.5])
    shown = near_brain(mask, zooms)
    t1 = np.where(shown, t1, vmin)
    box = _bbox(shown)
    fig, axes = plt.subplots(3, count, figsize=(2.6 * count, 7.8), facecolor="black")
    for row, axis in enumerate((2, 1, 0)):
        crop = tuple(b for a, b in enumerate(box) if a != axis)[::-1]  # (rows, columns) of the panel
        for col, index in enumerate(_slices(mask, axis, count)):
            ax = axes[row, col]
            ax.imshow(_take(t1, axis, index)[crop], cmap="gray", vmin=vmin, vmax=vmax,
                      origin="lower", interpolation="nearest")
            labels = np.ma.masked_equal(_take(dseg, axis, index)[crop], 0)
            ax.imshow(labels, cmap=_COLOURS, vmin=1, vmax=3, alpha=0.35, origin="lower",
                      interpolation="nearest")
            outline = _take(mask.astype(np.uint8), axis, index)[crop]
            if outline.any():
                ax.contour(outline, levels=[0.5], colors="red", linewidths=0.6, origin="lower")
            ax.set_axis_off()
    fig.suptitle(f"{title}   GM orange, WM blue, CSF green, brain mask red", color="white",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, facecolor="black", metadata={"Software": None})
    plt.close(fig)
