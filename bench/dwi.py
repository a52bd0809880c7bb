"""Benchmark of the dwi pipeline: seconds and peak memory per series, and the tensor fit's overhead.

Rows: the whole pipeline (``python -m pipelines.dwi``, a fresh child process as the local backend
runs it, its own peak RSS) on the Philips 12-direction DWI of ../shared/data, against the
issue's target (<= 60 s on 2 cores), alone and given the session's T1 (the anat pipeline's run on
the Philips MPRAGE of ../shared/data, made first and not timed: the flow runs it anyway), with
the T1 registration's share; and the tensor fit alone as the pipeline calls it
(``pipelines.dwi.tensor.fit_tensor``: dipy's WLS fit plus the prediction, residual and map
clean-up) against dipy's reference call on the same data (``TensorModel(gtab, "WLS").fit(data,
mask)`` and its FA/MD), the best of 3 each, in the same process (target: overhead <= 15 %).

Usage: ``python bench/dwi.py``
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CORELAB_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGET_SECONDS, TARGET_OVERHEAD = 60.0, 0.15

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from pipelines.dwi.run import run_dwi
t1 = dict(zip(("t1w", "t1w_dseg"), sys.argv[3:5]))
r = run_dwi(sys.argv[1], sys.argv[2], "bench", "1", **t1)
# VmHWM, not ru_maxrss: after fork + exec ru_maxrss keeps the parent's peak (the anat run made here first)
hwm = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
print(json.dumps({"seconds": time.perf_counter() - t0, "rss_kib": hwm,
                  "motion": r.qc["motion"]["seconds"], "fa": r.measures["FA_WM"],
                  "taken": r.qc["wm_from_t1w"]}))
"""


def convert(work: Path) -> Path:
    dicom = work / "dicom"
    dicom.mkdir()
    for f in sorted((SHARED / "dcm_qa_philips_dwi" / "In" / "cl" / "DICOM").glob("IM_*.gz")):
        (dicom / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
    from tasks.bids.convert import dcm2niix_binary

    subprocess.run([dcm2niix_binary(), "-z", "y", "-f", "sub-bench_ses-1_dwi", "-o", str(work), str(dicom)],
                   check=True, capture_output=True)
    return work / "sub-bench_ses-1_dwi.nii.gz"


def anat_of_t1(work: Path) -> tuple[Path, Path]:
    """The anat pipeline's desc-preproc_T1w and dseg of the Philips MPRAGE (the tests' same-session T1)."""
    from tests.pipelines.dwi_data import philips_t1_anat

    return philips_t1_anat(work)


def best_of(n: int, call) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    sys.path.insert(0, str(REPO))
    import nibabel as nib
    import numpy as np
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    from pipelines.dwi.gradients import B0_MAX, read_gradients
    from pipelines.dwi.process import brain_mask
    from pipelines.dwi.tensor import fit_tensor

    with tempfile.TemporaryDirectory(prefix="corelab-bench-dwi-") as tmp:
        series = convert(Path(tmp))
        t1 = [str(p) for p in anat_of_t1(Path(tmp) / "t1")]

        def child(*extra: str) -> dict:
            done = subprocess.run([sys.executable, "-c", _CHILD, str(series), str(Path(tmp) / f"out{len(extra)}"),
                                   *extra], capture_output=True, text=True, cwd=REPO, check=True)
            return json.loads(done.stdout.strip().splitlines()[-1])

        run, with_t1 = child(), child(*t1)
        img = nib.load(str(series))
        data = np.asarray(img.dataobj, dtype=np.float32)
        grads = read_gradients(series, data.shape[3], img.affine)
        mask = brain_mask(data[..., grads.b0].mean(axis=-1))
        gtab = gradient_table(grads.bvals, bvecs=grads.bvecs, b0_threshold=B0_MAX)

        def reference():
            fit = TensorModel(gtab, fit_method="WLS").fit(data, mask=mask)
            return fit.fa, fit.md

        ours, bare = best_of(3, lambda: fit_tensor(data, mask, grads)), best_of(3, reference)
    print(f"{'step':<44} {'seconds':>8} {'peak GB':>8} {'target':>22}")
    print(f"{'dwi pipeline, Philips 112x112x32x17':<44} {run['seconds']:8.1f} {run['rss_kib'] / 2**20:8.2f} "
          f"{'<= 60 s':>22}")
    print(f"{'  of which motion correction':<44} {run['motion']:8.1f} {'':>8} {'':>22}")
    print(f"{'dwi pipeline, given the session T1':<44} {with_t1['seconds']:8.1f} "
          f"{with_t1['rss_kib'] / 2**20:8.2f} {'<= 60 s':>22}")
    print(f"{'  of which T1 registration and masks':<44} {with_t1['seconds'] - run['seconds']:8.1f} {'':>8} "
          f"{'(T1 taken)' if with_t1['taken'] else '(T1 REJECTED)':>22}")
    print(f"{'tensor fit as the pipeline calls it':<44} {ours:8.2f} {'':>8} {'':>22}")
    print(f"{'dipy reference call alone':<44} {bare:8.2f} {'':>8} {'':>22}")
    overhead = ours / bare - 1
    print(f"{'overhead of the pipeline tensor fit':<44} {overhead:8.1%} {'':>8} {'<= 15 %':>22}")
    ok = max(run["seconds"], with_t1["seconds"]) <= TARGET_SECONDS and overhead <= TARGET_OVERHEAD
    print("targets met" if ok else "a target is not met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
