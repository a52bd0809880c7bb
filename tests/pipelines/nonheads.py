"""Objects that are not a T1-weighted head, made from the real data of ../shared/data.

Each keeps what the brain-plausibility limits look at (a head's size, its intensities, its
noise) and breaks what a head has: its anatomy, its contrast order, its orientation, or its
shape. They stand for the real cases a core lab receives: a fruit or another object scanned
under the head protocol (the held-out GE T1 of a fruit), a QC phantom, a T2 filed as the T1,
an image whose orientation was lost.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def _data(img: nib.Nifti1Image) -> np.ndarray:
    return np.asanyarray(img.dataobj, dtype=np.float32)


def head_of(data: np.ndarray) -> np.ndarray:
    """The head: above 10 % of the 98th percentile, closed, filled, largest component."""
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(data > 0.1 * np.percentile(data, 98), iterations=2))
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        mask = labels == 1 + int(np.argmax(sizes))
    return mask


def fruit(img: nib.Nifti1Image, seed: int = 0) -> nib.Nifti1Image:
    """A citrus fruit as large as the head, in the head's own intensities and noise.

    A sphere of 80 % of the head's equivalent radius, centred on the head: a bright 6 mm rind
    (the head's 95th percentile), twelve dark membranes and a dark core (20th percentile)
    between flesh segments (60th percentile), plus Gaussian noise of the head's background SD.
    """
    data = _data(img)
    head = head_of(data)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    radius = 0.8 * (3 * head.sum() * zooms.prod() / (4 * np.pi)) ** (1 / 3)
    offset = (np.indices(data.shape).T - np.asarray(ndimage.center_of_mass(head))).T * zooms[:, None, None, None]
    r = np.sqrt((offset**2).sum(axis=0))
    angle = np.arctan2(offset[1], offset[0])
    bright, flesh, dark = (np.percentile(data[head], q) for q in (95, 60, 20))
    out = np.zeros_like(data)
    inside = r < radius
    out[inside] = flesh
    out[inside & (r > radius - 6)] = bright
    out[inside & (r <= radius - 6) & (np.abs(np.sin(6 * angle)) < 0.08)] = dark
    out[inside & (r < 0.12 * radius)] = dark
    noise = float(data[~head].std()) if (~head).any() else 0.02 * float(bright)
    out += np.random.default_rng(seed).normal(0.0, noise, data.shape).astype(np.float32)
    return nib.Nifti1Image(np.abs(out), img.affine)


def shuffled(img: nib.Nifti1Image, blocks: int = 4, seed: int = 0) -> nib.Nifti1Image:
    """The head's bounding box cut into ``blocks``³ blocks, put back in a random order."""
    data = _data(img).copy()
    idx = np.argwhere(head_of(data))
    lo = idx.min(axis=0)
    step = (idx.max(axis=0) + 1 - lo) // blocks
    cells = [tuple(slice(lo[a] + c[a] * step[a], lo[a] + (c[a] + 1) * step[a]) for a in range(3))
             for c in np.ndindex(blocks, blocks, blocks)]
    pieces = [data[c].copy() for c in cells]
    for cell, k in zip(cells, np.random.default_rng(seed).permutation(len(cells))):
        data[cell] = pieces[k]
    return nib.Nifti1Image(data, img.affine)


def inverted(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The head's contrast reversed (CSF brightest, WM darkest: a T2-like image filed as the T1)."""
    data = _data(img).copy()
    head = head_of(data)
    top = float(np.percentile(data[head], 99))
    data[head] = np.clip(top - data[head], 0.0, None) + 0.05 * top
    return nib.Nifti1Image(data, img.affine)


def upside_down(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The voxels flipped head to foot with the affine kept: an orientation lost on the way."""
    return nib.Nifti1Image(_data(img)[:, :, ::-1].copy(), img.affine)


def bottle_phantom(epi: Path, length_mm: float = 170.0, spacing_mm: float = 1.5) -> nib.Nifti1Image:
    """A bottle phantom: the middle slice of a real phantom EPI's first volume, extruded along z.

    The real phantoms of ../shared/data are slabs of 10-25 slices (too thin for a T1); their
    cross-section made into a cylinder 17 cm long is an object a site scans for QC.
    """
    src = nib.as_closest_canonical(nib.load(str(epi)))
    volume = np.asanyarray(src.dataobj, dtype=np.float32)
    volume = volume[..., 0] if volume.ndim == 4 else volume
    zooms = src.header.get_zooms()[:2]
    section = ndimage.zoom(volume[:, :, volume.shape[2] // 2], (zooms[0] / spacing_mm, zooms[1] / spacing_mm), order=1)
    pad = 15
    out = np.zeros(section.shape + (int(length_mm / spacing_mm) + 2 * pad,), np.float32)
    out[:, :, pad:-pad] = section[:, :, None]
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = -np.asarray(out.shape) * spacing_mm / 2
    return nib.Nifti1Image(out, affine)


#: Name -> transformation of a real T1 (the phantom is made from a phantom EPI instead).
NON_HEADS = {"fruit": fruit, "shuffled": shuffled, "inverted": inverted, "upside_down": upside_down}
