"""Benchmark of the built-in anatomical pipeline: seconds and peak memory per T1.

Prints one table row per (T1, backend) and one per DICOM conversion, against
the issue's targets (<= 60 s and <= 4 GB per 1 mm T1 on 2 cores; container and
wrapper overhead <= 10 %). Each pipeline run is a fresh child process (what a
backend does), so its peak RSS is its own.

Hooks for others
----------------
- ``BACKENDS``: backend name -> function ``(t1, workdir) -> Timing``. Only
  ``local`` is here; the container runner adds e.g. ``BACKENDS["podman"]``.
- ``CONVERSIONS``: name -> function ``(dicom_dir, workdir) -> Timing``. ``dcm2niix``
  (the bare binary) is here; the BIDS conversion adds ``CONVERSIONS["wrapper"]``.
Rows whose hook is missing are printed as "not measured".

Usage: ``python bench/anat.py [--backends local,podman] [--t1 philips,xa30,chris]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CORELAB_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGET_SECONDS, TARGET_GB, TARGET_OVERHEAD = 60.0, 4.0, 0.10
THREADS = 2


@dataclass(frozen=True)
class Timing:
    """Wall and CPU seconds and peak resident memory (GB) of one measured step."""

    seconds: float
    cpu_seconds: float
    peak_gb: float
    note: str = ""


# The child runs the same entry point the local backend runs and reports its own
# peak RSS (ru_maxrss is in KiB on Linux).
_CHILD = """
import json, resource, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from pipelines.anat import run_anat
r = run_anat(sys.argv[1], sys.argv[2], "bench", "1", threads=int(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "tiv": r.measures["TIV"]}))
"""


def time_local(t1: Path, workdir: Path) -> Timing:
    """``local`` backend: ``run_anat`` in a fresh interpreter of this environment."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(t1), str(workdir / "deriv"), str(THREADS)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return Timing(rec["seconds"], rec["cpu"], rec["rss_kib"] / 1024**2,
                  f"{_voxel(t1)}, TIV {rec['tiv'] / 1000:.0f} cm3")


def _voxel(t1: Path) -> str:
    import nibabel as nib

    img = nib.load(str(t1))
    zooms = img.header.get_zooms()[:3]
    return f"{'x'.join(str(s) for s in img.shape[:3])} @ {max(zooms):.2g} mm"


def time_dcm2niix(dicom_dir: Path, workdir: Path) -> Timing:
    """The bare dcm2niix binary (PyPI package), as the BIDS conversion calls it."""
    exe = shutil.which("dcm2niix", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                         os.environ.get("PATH", "")]))
    if exe is None:
        raise FileNotFoundError("dcm2niix is not installed")
    out = workdir / "nii"
    out.mkdir(exist_ok=True)
    start, before = time.perf_counter(), os.times()
    subprocess.run([exe, "-b", "y", "-z", "y", "-f", "%s_%p", "-o", str(out), str(dicom_dir)],
                   check=True, capture_output=True)
    after = os.times()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    cpu = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    return Timing(time.perf_counter() - start, cpu, peak, "max RSS over all children so far")


def time_podman(t1: Path, workdir: Path) -> Timing:
    """The pinned anat image under podman, through the runner (digest checked, --network none)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from containers import time_backends  # bench/containers.py

    (row,) = time_backends(t1, backends=("podman",), threads=THREADS)
    if not row["ok"]:
        raise RuntimeError(row["note"] or "podman run failed")
    return Timing(row["seconds"], float("nan"), row["peak_mb"] / 1024, f"{_voxel(t1)}, image by digest")


def time_wrapper(dicom_dir: Path, workdir: Path) -> Timing:
    """Our BIDS conversion (tasks.bids.convert.convert_series): dcm2niix plus naming, validation, checks."""
    sys.path.insert(0, str(REPO))
    from data_contracts import example_path as demo_trial_path
    from data_contracts.trial import load_trial
    from tasks.bids.convert import SeriesToConvert, _validator, convert_series
    from tasks.lake.storage import Lake

    _validator()  # the BIDS rules load once per process (a running service has them)

    lake = Lake(str(workdir / "wrapper_lake")).init()
    shutil.copytree(dicom_dir, lake.path("deid/s/sub/v1/series-1"))
    t1w = next(st for st in load_trial(demo_trial_path()).protocol.series_types if st.name == "T1w")
    start, before = time.perf_counter(), os.times()
    convert_series(lake, SeriesToConvert("2.25.1", 1, "deid/s/sub/v1/series-1", t1w, "E0"), "bench", "v1", [])
    after = os.times()
    cpu = (after.children_user + after.children_system + after.user + after.system) - \
          (before.children_user + before.children_system + before.user + before.system)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    return Timing(time.perf_counter() - start, cpu, peak, "BIDS name, validator, sidecar")


#: Backend name -> timing function.
BACKENDS: dict[str, Callable[[Path, Path], Timing]] = {"local": time_local, "podman": time_podman}
#: Conversion name -> timing function.
CONVERSIONS: dict[str, Callable[[Path, Path], Timing]] = {"dcm2niix": time_dcm2niix, "wrapper": time_wrapper}


def philips_dicom(workdir: Path) -> Path:
    """The Philips MPRAGE's gzipped DICOM files, unpacked (dcm2niix reads plain files)."""
    out = workdir / "philips_dcm"
    out.mkdir(exist_ok=True)
    for gz in sorted((SHARED / "dcm_qa_philips_enh" / "In" / "cl").glob("*.dcm.gz")):
        with gzip.open(gz) as src, open(out / gz.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def t1_inputs(workdir: Path, conversion: Timing | None) -> dict[str, Path]:
    """The real T1s of ../shared/data; the Philips one from the conversion's output."""
    found = sorted((workdir / "nii").glob("*.nii.gz")) if conversion else []
    t1s = {"philips": found[0] if found else None,
           "xa30": SHARED / "dcm_qa_xa30" / "Ref" / "5_anat-T1w_acq-tfl.nii",
           "chris": SHARED / "niivue-images" / "chris_t1.nii.gz"}
    return {k: v for k, v in t1s.items() if v is not None and v.exists()}


def _row(name: str, step: str, t: Timing | None, extra: str = "") -> str:
    if t is None:
        return f"{name:<8} {step:<10} {'not measured':>32}  {extra}"
    ok = "ok" if t.seconds <= TARGET_SECONDS and t.peak_gb <= TARGET_GB else "OVER TARGET"
    return (f"{name:<8} {step:<10} {t.seconds:8.1f} {t.cpu_seconds:8.1f} {t.peak_gb:8.2f}  "
            f"{ok:<11} {t.note} {extra}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="local,podman")
    p.add_argument("--t1", default="philips,xa30,chris")
    args = p.parse_args(argv)
    if not SHARED.exists():
        print(f"shared data not found at {SHARED}; set CORELAB_SHARED_DATA")
        return 1
    print(f"anat benchmark: {os.cpu_count()} CPUs visible, {THREADS} SimpleITK threads; "
          f"targets <= {TARGET_SECONDS:.0f} s, <= {TARGET_GB:.0f} GB per 1 mm T1, "
          f"overhead <= {100 * TARGET_OVERHEAD:.0f} %")
    print(f"{'T1':<8} {'step':<10} {'wall s':>8} {'cpu s':>8} {'peak GB':>8}  status")
    with tempfile.TemporaryDirectory(prefix="bench-anat-") as tmp:
        work = Path(tmp)
        dicom = philips_dicom(work)
        conv: dict[str, Timing | None] = {}
        for name in ("dcm2niix", "wrapper"):
            fn = CONVERSIONS.get(name)
            conv[name] = fn(dicom, work) if fn else None
            bare = conv["dcm2niix"]
            over = (f"overhead {100 * (conv[name].seconds / bare.seconds - 1):+.0f} %"
                    if name != "dcm2niix" and conv[name] and bare else "")
            print(_row("philips", name, conv[name], f"(DICOM -> NIfTI) {over}"))
        for t1_name, t1 in t1_inputs(work, conv["dcm2niix"]).items():
            if t1_name not in args.t1.split(","):
                continue
            base = None
            for backend in args.backends.split(","):
                fn = BACKENDS.get(backend)
                timing = fn(t1, Path(tempfile.mkdtemp(dir=work))) if fn else None
                base = timing if backend == "local" else base
                over = (f"overhead {100 * (timing.seconds / base.seconds - 1):+.0f} %"
                        if timing and base and backend != "local" else "")
                print(_row(t1_name, backend, timing, over), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
