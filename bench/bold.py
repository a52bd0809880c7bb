"""Benchmark of the bold QC pipeline: seconds and peak memory per series on 2 cores.

Rows: the whole pipeline (``python -m pipelines.bold``'s ``run_bold`` in a fresh child process, as
the local backend runs it, its own peak RSS) on the BOLD series of ../shared/data as corelab
converts them (GE EPI 64x64x15x10; Siemens XA60 64x64x10x3 and XA61 100x100x10x7 multiband
phantoms), against the issue's target (<= 30 s per series); and a trial-length series made from
the GE series (its first volume, 200 copies each moved by up to 0.3 mm / 0.3 degrees with noise)
to show how the time grows with volumes. The bare reference, in the same run: one SimpleITK rigid
registration of a volume pair as the pipeline configures it, times the volumes to realign on one
core, so ``pipeline / reference`` is what the rest of the pipeline costs around realignment.

Usage: ``python bench/bold.py``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CORELAB_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGET_SECONDS = 30.0

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from pipelines.bold.run import run_bold
r = run_bold(sys.argv[1], sys.argv[2], "bench", "1", "rest")
print(json.dumps({"seconds": time.perf_counter() - t0, "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "volumes": r.qc["volumes"], "fd": r.qc["fd_mean"], "tsnr": r.qc["tsnr"]}))
"""


def run_child(series: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(series), str(out)], capture_output=True, text=True,
                          cwd=REPO, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def long_series(ge: Path, work: Path, volumes: int = 200) -> Path:
    import nibabel as nib
    import numpy as np
    import SimpleITK as sitk

    from pipelines.bold import realign as R

    img = nib.as_closest_canonical(nib.load(str(ge)))
    base = np.asanyarray(img.dataobj, dtype=np.float32)[..., 0]
    zooms = img.header.get_zooms()[:3]
    ref = R.volume_image(base, zooms)
    c = R.center_of(ref)
    rng = np.random.default_rng(0)
    sd = float(np.median(base[base > np.percentile(base, 75)])) / 50
    vols = []
    for _ in range(volumes):
        t = np.r_[rng.uniform(-0.3, 0.3, 3), np.radians(rng.uniform(-0.3, 0.3, 3))]
        v = sitk.GetArrayFromImage(sitk.Resample(ref, ref, R.euler(t, c), sitk.sitkBSpline, 0.0,
                                                 sitk.sitkFloat32)).transpose(2, 1, 0)
        vols.append(np.abs(v + rng.normal(0, sd, v.shape)))
    out = work / "sub-bench_ses-1_task-rest_bold.nii.gz"
    nib.save(nib.Nifti1Image(np.stack(vols, -1).astype(np.float32), img.affine), str(out))
    out.with_name("sub-bench_ses-1_task-rest_bold.json").write_text(
        ge.with_name(ge.name.replace(".nii.gz", ".json")).read_text())
    return out


def reference_seconds(series: Path) -> float:
    """One rigid registration of volume 0 to the middle volume, as the pipeline runs it, times the
    volumes the pipeline realigns, on one core (the pipeline runs two side by side)."""
    import nibabel as nib
    import numpy as np
    import SimpleITK as sitk

    from pipelines.bold import realign as R
    from pipelines.bold.process import brain_mask

    img = nib.as_closest_canonical(nib.load(str(series)))
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    zooms = img.header.get_zooms()[:3]
    mask = brain_mask(data.mean(-1), zooms, series)
    from scipy import ndimage

    m = sitk.Cast(R.volume_image(ndimage.binary_dilation(mask, iterations=R.MARGIN).astype(np.float32), zooms) > 0.5,
                  sitk.sitkUInt8)
    fixed, moving = R.volume_image(data[..., data.shape[3] // 2], zooms), R.volume_image(data[..., 0], zooms)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    t = time.perf_counter()
    R.register(fixed, moving, m)
    return (time.perf_counter() - t) * (data.shape[3] - 1)


def main() -> int:
    sys.path.insert(0, str(REPO))
    from tests.pipelines.bold_data import convert

    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="corelab-bench-bold-") as tmp:
        work = Path(tmp)
        series = {name: convert(name, work / name) for name in ("ge", "xa60", "xa61")}
        series["ge x200 (synthetic)"] = long_series(series["ge"], work)
        for name, path in series.items():
            run = run_child(path, work / "out" / name.split()[0])
            ref = reference_seconds(path)
            rows.append((name, run, ref))
            if "synthetic" not in name:
                ok &= run["seconds"] <= TARGET_SECONDS
    print(f"{'series':<22} {'volumes':>7} {'seconds':>8} {'peak GB':>8} {'realign ref':>11} {'ratio':>6} "
          f"{'FD mm':>7} {'tSNR':>6} {'target':>9}")
    for name, run, ref in rows:
        target = "" if "synthetic" in name else "<= 30 s"
        print(f"{name:<22} {run['volumes']:>7} {run['seconds']:8.1f} {run['rss_kib'] / 2**20:8.2f} {ref:11.1f} "
              f"{run['seconds'] / ref:6.2f} {run['fd']:7.3f} {run['tsnr']:6.1f} {target:>9}")
    print("targets met" if ok else "a target is not met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
