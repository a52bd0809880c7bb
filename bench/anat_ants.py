"""The anat pipeline's hand-written segmentation against ANTs Atropos (antspyx): agreement, volumes, time, memory.

What is measured, per real T1 of ../shared/data (the ones tests/pipelines/test_anat_pipeline.py
uses: Philips 1 mm MPRAGE converted from its gzipped DICOM with dcm2niix as the tests do, Siemens
XA30 2 mm Ref NIfTI, chris_t1 0.88 mm):

- ``pipeline``: :func:`pipelines.anat.process.compute` (N4, registration, template priors, curvature-flow
  denoising, EM + MRF), wall seconds of ``compute`` and the child process's peak RSS;
- ``pipe-seg``: stage 4 alone as ``compute`` calls it (``_segment_in_box``: denoise + EM + MRF) on the
  pipeline's bias-corrected image, brain mask and warped priors: the part Atropos would replace;
- ``atropos-km``: ``ants.atropos`` on the same bias-corrected image in the same brain mask,
  ``Kmeans[3]`` initialisation, MRF ``[0.1,1x1x1]``, convergence ``[5,0]`` (antsAtroposN4.sh defaults);
- ``atropos-pri``: the same with the pipeline's warped GM/WM/CSF priors (normalised as the pipeline's
  EM normalises them) as ``PriorProbabilityImages``, prior weight 0.25 (antsCorticalThickness' value);
- ``n4+atr-km``: ``ants.n4_bias_field_correction`` (its defaults, shrink 4) of the input T1 inside the
  pipeline's head mask, then ``atropos-km`` in the pipeline's brain mask; seconds include both.

Every method runs in a fresh child process (its own peak RSS, VmHWM, which includes the interpreter,
the libraries and the inputs) on ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS threads (and the pipeline's
``threads`` parameter), at each count of ``--threads``. Volumes (ml) are sums of the probabilities
in the brain mask, as the pipeline's measures are; Dice compares hard labels (argmax of the
probabilities in the mask) with the pipeline's ``dseg``; "thr-diff" counts the voxels whose hard
label changes with the thread count (0: thread-independent). Then the simulated scanner change of
the tests (``simulated_scanner_change``: smooth 1.5-fold bias field, gain 1.7, 2 % Rician noise) is
applied to each input, everything is rerun at the first thread count (each ANTs method on the
changed pipeline's own bias-corrected image, mask and priors), and the change of GM/WM/CSF volume
(%) and the GM/WM Dice between the original and the changed labels are printed per method.

Usage: ``PYTHONPATH=<folder holding antspyx> python bench/anat_ants.py [--t1 philips,xa30,chris]
[--threads 2,1] [--no-scanner]``. antspyx is not a dependency of corelab: without it this prints
a message and exits 0.

Measured 2026-12-07 (antspyx 0.6.3, 2 cores; the pipeline is anat 0.1.2). Decision: anat keeps its
own EM + MRF.

=======  ==============  =========================  ================  ==================
T1       pipe-seg s (GB)  atropos-pri s (GB)          GM/WM Dice (pri)  scanner change,
                                                                         worst |dGM|/|dWM| %
                                                                         pipeline vs pri
=======  ==============  =========================  ================  ==================
philips  5.9 (0.64)      45.6 (1.69)                 0.94 / 0.94       0.21 vs 0.78
xa30     0.5 (0.22)      4.9 (0.49)                  0.93 / 0.87       0.19 vs 0.78
chris    10.6 (0.74)     55.6 (1.61)                 0.94 / 0.94       0.92 vs 0.42
=======  ==============  =========================  ================  ==================

- Atropos with the pipeline's priors agrees with it (Dice above) but is 4-10 times slower and would
  take the whole compute past 60 s on the 1 mm T1s (68 and 73 s); its labels change with the
  thread count (62-3528 voxels) and between two runs at 2 threads; the pipeline's are identical.
- K-means Atropos (and ANTs N4 with its defaults before it) gives implausible volumes on the 2 mm
  XA30 (GM/TIV 0.34, CSF 37 % of TIV) and fails the tests' 2 % scanner-change limit by up to 12 %.
- The pipeline's GM/WM ratio is high on the 1 mm T1s (1.72 and 1.84; Atropos with priors 1.46 and
  1.52); its prior weight (1, Atropos's 0.25) is the first thing to look at.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CORELAB_SHARED_DATA", REPO.parent / "shared" / "data"))
TISSUES = ("GM", "WM", "CSF")
METHODS = ("pipeline", "pipe-seg", "atropos-km", "atropos-pri", "n4+atr-km")
ANTS_METHODS = METHODS[2:]

# The pipeline's compute, timed alone; then (after the peak RSS is read) the pipeline's own
# stages 1-3 again to get the warped priors and the head mask that compute does not return.
_PIPELINE = """
import json, sys, time
def peak_kib():
    # VmHWM, not ru_maxrss: after a (v)fork + exec, ru_maxrss still holds the parent's peak.
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
from pathlib import Path
import numpy as np, nibabel as nib, SimpleITK as sitk
from pipelines.anat.io import load_t1, nifti_like, from_sitk, to_sitk
from pipelines.anat.parameters import AnatParameters
from pipelines.anat.process import compute, sitk_threads, warp_to_subject
from pipelines.anat.bias import n4_correct
from pipelines.anat.register import register
from pipelines.anat.segment import _normalise_priors
from pipelines.anat.template import load_template
src, out, threads, export = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
img = load_t1(src)
params = AnatParameters().with_threads(threads)
load_template()
t0 = time.perf_counter()
maps = compute(img, params)
seconds = time.perf_counter() - t0
rss = peak_kib()
rec = {"seconds": seconds, "rss_kib": rss}
if export:
    template = load_template()
    with sitk_threads(1):
        bias = n4_correct(to_sitk(img), grid_mm=params.n4_grid_mm, iterations=params.n4_iterations,
                          control_points=params.n4_control_points, convergence=params.n4_convergence)
        reg = register(bias.corrected, bias.head_mask, template.t1, template.mask, params)
    _, priors, _ = warp_to_subject(template, reg, bias.corrected)
    mask = maps.brain_mask
    norm = np.zeros_like(priors)
    norm[:, mask] = _normalise_priors(priors, mask)
    rec["same_preproc"] = bool(np.array_equal(from_sitk(bias.corrected), maps.preproc))
    save = lambda a, name, dt: nib.save(nifti_like(a, img, dt), str(out / name))
    save(img.get_fdata(dtype=np.float32), "t1.nii.gz", np.float32)
    save(maps.preproc, "preproc.nii.gz", np.float32)
    save(mask, "mask.nii.gz", np.uint8)
    save(from_sitk(bias.head_mask) > 0, "head.nii.gz", np.uint8)
    for i, t in enumerate(("GM", "WM", "CSF")):
        save(norm[i], f"prior_{t}.nii.gz", np.float32)
    np.save(out / "pipeline_post.npy", maps.posteriors)
    np.save(out / "priors_raw.npy", priors)
print(json.dumps(rec))
"""

# Stage 4 alone, on the exported inputs (the raw warped priors: _segment_in_box normalises them).
_SEGMENT = """
import json, sys, time
def peak_kib():
    # VmHWM, not ru_maxrss: after a (v)fork + exec, ru_maxrss still holds the parent's peak.
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
from pathlib import Path
import numpy as np, nibabel as nib
from pipelines.anat.parameters import AnatParameters
from pipelines.anat.process import _segment_in_box, sitk_threads
work, threads = Path(sys.argv[1]), int(sys.argv[2])
ref = nib.load(str(work / "preproc.nii.gz"))
preproc = ref.get_fdata(dtype=np.float32)
mask = np.asanyarray(nib.load(str(work / "mask.nii.gz")).dataobj) > 0
priors = np.load(work / "priors_raw.npy")
spacing = tuple(float(z) for z in ref.header.get_zooms()[:3])
params = AnatParameters().with_threads(threads)
t0 = time.perf_counter()
with sitk_threads(threads):
    post, _ = _segment_in_box(preproc, mask, priors, spacing, params)
seconds = time.perf_counter() - t0
np.save(work / f"pipe-seg_{threads}.npy", post)
print(json.dumps({"seconds": seconds, "rss_kib": peak_kib()}))
"""

# One ANTs method; the thread count comes from ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS (set by the parent).
_ANTS = """
import json, sys, time
def peak_kib():
    # VmHWM, not ru_maxrss: after a (v)fork + exec, ru_maxrss still holds the parent's peak.
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
from pathlib import Path
import numpy as np
import ants
work, method, threads = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
mask = ants.image_read(str(work / "mask.nii.gz"))
t0 = time.perf_counter()
if method == "n4+atr-km":
    head = ants.image_read(str(work / "head.nii.gz"))
    image = ants.n4_bias_field_correction(ants.image_read(str(work / "t1.nii.gz")), mask=head)
else:
    image = ants.image_read(str(work / "preproc.nii.gz"))
mrf, conv = "[0.1,1x1x1]", "[5,0]"
if method == "atropos-pri":
    priors = [ants.image_read(str(work / f"prior_{t}.nii.gz")) for t in ("GM", "WM", "CSF")]
    seg = ants.atropos(a=image, x=mask, i=priors, m=mrf, c=conv, priorweight=0.25)
    order = (0, 1, 2)  # classes follow the priors: GM, WM, CSF
else:
    seg = ants.atropos(a=image, x=mask, i="Kmeans[3]", m=mrf, c=conv)
    order = (1, 2, 0)  # k-means classes by increasing T1 intensity: CSF, GM, WM
probs = np.stack([seg["probabilityimages"][k].numpy() for k in order]).astype(np.float32)
seconds = time.perf_counter() - t0
np.save(work / f"{method}_{threads}.npy", probs)
print(json.dumps({"seconds": seconds, "rss_kib": peak_kib()}))
"""


def _child(code: str, args: list[str], threads: int) -> dict:
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads),
               OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({args}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ants_version() -> str | None:
    done = subprocess.run([sys.executable, "-c", "import ants; print(ants.__version__)"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def philips_t1(work: Path) -> Path:
    """The Philips MPRAGE, converted as the tests convert it (``dcm2niix -b n -z y -f %s_%p``)."""
    dicom = work / "philips_dcm"
    dicom.mkdir()
    for gz in sorted((SHARED / "dcm_qa_philips_enh" / "In" / "cl").glob("*.dcm.gz")):
        with gzip.open(gz) as src, open(dicom / gz.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    exe = shutil.which("dcm2niix", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                         os.environ.get("PATH", "")]))
    if exe is None:
        raise FileNotFoundError("dcm2niix (PyPI package) is not installed next to this interpreter")
    out = work / "philips_nii"
    out.mkdir()
    subprocess.run([exe, "-b", "n", "-z", "y", "-f", "%s_%p", "-o", str(out), str(dicom)],
                   check=True, capture_output=True)
    (found,) = sorted(out.glob("*.nii.gz"))
    return found


def t1_inputs(work: Path, names: list[str]) -> dict[str, Path]:
    paths = {"philips": lambda: philips_t1(work),
             "xa30": lambda: SHARED / "dcm_qa_xa30" / "Ref" / "5_anat-T1w_acq-tfl.nii",
             "chris": lambda: SHARED / "niivue-images" / "chris_t1.nii.gz"}
    return {n: paths[n]() for n in names}


def hard(post: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 1 + np.argmax(post, axis=0), 0)


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    return 2.0 * float((x & y).sum()) / max(float(x.sum() + y.sum()), 1.0)


def run_all(t1: Path, work: Path, thread_counts: list[int]) -> dict:
    """Every method at every thread count on one T1: timings, soft volumes (ml), hard labels."""
    import nibabel as nib

    work.mkdir(parents=True)
    res: dict = {"timing": {}, "vol": {}, "labels": {}, "thread_diff": {}}
    for i, n in enumerate(thread_counts):
        rec = _child(_PIPELINE, [str(t1), str(work), str(n), "1" if i == 0 else "0"], n)
        res["timing"][("pipeline", n)] = rec
        if i == 0:
            res["same_preproc"] = rec["same_preproc"]
    ref = nib.load(str(work / "mask.nii.gz"))
    mask = np.asanyarray(ref.dataobj) > 0
    voxel_ml = float(abs(np.linalg.det(ref.affine[:3, :3]))) / 1000.0
    res["mask"], res["tiv"] = mask, mask.sum() * voxel_ml
    posts = {"pipeline": {thread_counts[0]: np.load(work / "pipeline_post.npy")}}
    for n in thread_counts:
        res["timing"][("pipe-seg", n)] = _child(_SEGMENT, [str(work), str(n)], n)
        posts.setdefault("pipe-seg", {})[n] = np.load(work / f"pipe-seg_{n}.npy")
        for m in ANTS_METHODS:
            res["timing"][(m, n)] = _child(_ANTS, [str(work), m, str(n)], n)
            posts.setdefault(m, {})[n] = np.load(work / f"{m}_{n}.npy")
    for m, by_threads in posts.items():
        first = by_threads[thread_counts[0]]
        res["vol"][m] = first[:, mask].astype(np.float64).sum(axis=1) * voxel_ml
        res["labels"][m] = hard(first, mask)
        res["thread_diff"][m] = max(int((hard(p, mask) != res["labels"][m]).sum())
                                    for p in by_threads.values())
    # compute's posteriors are exported at one thread count only; its stage 4 ran at every count.
    res["thread_diff"]["pipeline"] = res["thread_diff"]["pipe-seg"]
    return res


def _gb(rec: dict) -> float:
    return rec["rss_kib"] / 1024**2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--t1", default="philips,xa30,chris")
    p.add_argument("--threads", default="2,1", help="thread counts, the first also for the scanner change")
    p.add_argument("--no-scanner", action="store_true", help="skip the simulated scanner change")
    args = p.parse_args(argv)
    version = _ants_version()
    if version is None:
        print("antspyx is not importable (it is not a corelab dependency): install it into a separate "
              "folder with pip --target and put that folder on PYTHONPATH; nothing measured")
        return 0
    if not SHARED.exists():
        print(f"shared data not found at {SHARED}; set CORELAB_SHARED_DATA")
        return 1
    sys.path.insert(0, str(REPO))
    import nibabel as nib

    from tests.pipelines.test_anat_pipeline import simulated_scanner_change

    threads = [int(t) for t in args.threads.split(",")]
    print(f"anat segmentation vs ANTs Atropos (antspyx {version}); {os.cpu_count()} CPUs visible; "
          f"load average {os.getloadavg()[0]:.2f}")
    head = (f"{'T1':<8} {'method':<12} {'thr':>3} {'wall s':>7} {'peak GB':>7} {'GM ml':>6} {'WM ml':>6} "
            f"{'CSF ml':>6} {'GM/TIV':>6} {'WM/TIV':>6} {'Dice GM':>7} {'WM':>5} {'CSF':>5} {'thr-diff':>7}")
    scanner_rows = []
    with tempfile.TemporaryDirectory(prefix="bench-anat-ants-") as tmp:
        work = Path(tmp)
        t1s = t1_inputs(work, args.t1.split(","))
        print(head)
        for name, t1 in t1s.items():
            base = run_all(t1, work / name, threads)
            pipe = base["labels"]["pipeline"]
            for m in METHODS:
                vol = base["vol"][m]
                d = [dice(base["labels"][m], pipe, k) for k in (1, 2, 3)]
                for n in threads:
                    t = base["timing"][(m, n)]
                    print(f"{name:<8} {m:<12} {n:>3} {t['seconds']:7.1f} {_gb(t):7.2f} {vol[0]:6.0f} "
                          f"{vol[1]:6.0f} {vol[2]:6.0f} {vol[0] / base['tiv']:6.3f} {vol[1] / base['tiv']:6.3f} "
                          f"{d[0]:7.3f} {d[1]:5.3f} {d[2]:5.3f} {base['thread_diff'][m]:>7}",
                          flush=True)
            print(f"{name:<8} TIV {base['tiv']:.0f} ml; pipeline export reproduces compute's preproc: "
                  f"{base['same_preproc']}", flush=True)
            if args.no_scanner:
                continue
            changed = work / f"{name}_scanner.nii.gz"
            nib.save(simulated_scanner_change(nib.load(str(t1))), str(changed))
            other = run_all(changed, work / f"{name}_scanner", threads[:1])
            for m in METHODS:
                if m == "pipe-seg":
                    continue
                dv = 100.0 * (other["vol"][m] / base["vol"][m] - 1.0)
                scanner_rows.append(
                    f"{name:<8} {m:<12} {dv[0]:+7.2f} {dv[1]:+7.2f} {dv[2]:+7.2f} "
                    f"{100 * (other['tiv'] / base['tiv'] - 1):+7.2f} "
                    f"{dice(other['labels'][m], base['labels'][m], 1):8.3f} "
                    f"{dice(other['labels'][m], base['labels'][m], 2):8.3f}")
            print(f"{name:<8} scanner change done", flush=True)
    if scanner_rows:
        print(f"\nsimulated scanner change (tests/pipelines), {threads[0]} threads: change of soft volumes, "
              "and Dice of the changed vs the original hard labels")
        print(f"{'T1':<8} {'method':<12} {'dGM %':>7} {'dWM %':>7} {'dCSF %':>7} {'dTIV %':>7} "
              f"{'Dice GM':>8} {'Dice WM':>8}")
        print("\n".join(scanner_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
