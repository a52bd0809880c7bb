"""Defacing on the real T1s of ../shared/data: cost, and what the verification sees.

For each T1 (Philips MPRAGE 1 mm, Siemens XA30 2 mm, chris_t1 0.88 mm, and the skull-stripped
MNI152 that nilearn ships, which has no face) it defaces the image and prints the face share
above noise before, the residual face the second registration finds, and the time, as a ratio
to one bare SimpleITK affine registration of the template (what flirt does in pydeface) in the
same run. Then, on the XA30 T1, wrongly placed face masks: the residual each leaves (the
limit is tasks/bids/deface.py's RESIDUAL_FACE_LIMIT). Run: .venv/bin/python bench/deface.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CORELAB_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))

from bench.qc_calibration import philips_t1  # noqa: E402
from pipelines.anat.template import template_dir  # noqa: E402
from tasks.bids import deface as d  # noqa: E402


def bare_registration(img: nib.Nifti1Image) -> float:
    template, _ = d._template()
    t0 = time.perf_counter()
    d.register_template(d._first_volume(img), template)
    return time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t1s = {"philips": philips_t1(Path(tmp)), "xa30": DATA / "dcm_qa_xa30" / "Ref" / "5_anat-T1w_acq-tfl.nii",
               "chris": DATA / "niivue-images" / "chris_t1.nii.gz",
               "mni152 (no face)": template_dir() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"}
        print(f"{'image':18} {'voxels':>10} {'face':>9} {'above noise before':>19} {'residual':>9} "
              f"{'deface s':>9} {'bare reg s':>10} {'ratio':>6}")
        for name, path in t1s.items():
            img = nib.load(str(path))
            bare = bare_registration(img)
            t0 = time.perf_counter()
            r = d.deface(img)
            took = time.perf_counter() - t0
            rep = r.report
            print(f"{name:18} {int(np.prod(img.shape[:3])):>10} {rep['FaceVoxels']:>9} "
                  f"{rep['FaceShareAboveNoiseBefore']:>19.3f} {rep['ResidualFaceShare']:>9.4f} "
                  f"{took:>9.1f} {bare:>10.1f} {took / bare:>6.2f}")
    img = nib.load(str(t1s["xa30"]))
    face = d.deface(img).face
    axes = nib.orientations.io_orientation(img.affine)
    vox = np.asarray(img.header.get_zooms()[:3])
    print(f"\nwrong masks on xa30 (limit {d.RESIDUAL_FACE_LIMIT})")
    for label, world, mm in [("up 10 mm", 2, 10), ("up 20 mm", 2, 20), ("down 20 mm", 2, -20),
                             ("forward 20 mm", 1, 20), ("back 20 mm", 1, -20), ("nothing removed", None, 0)]:
        if world is None:
            mask = np.zeros_like(face)
        else:
            axis = int(np.flatnonzero(axes[:, 0] == world)[0])
            mask = np.roll(face, int(round(mm * axes[axis, 1] / vox[axis])), axis=axis)
        try:
            rep = d.verify_defaced(img, d._zeroed(img, mask), mask)
            print(f"  {label:16} residual {rep['ResidualFaceShare']:.4f}  accepted")
        except d.DefaceError as exc:
            print(f"  {label:16} refused: {exc}")


if __name__ == "__main__":
    main()
