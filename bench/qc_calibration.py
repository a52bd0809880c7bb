"""QC metrics of the real T1s of ../shared/data and of degraded copies: how the default
rules in data_contracts/qc_settings.py were set.

For each T1 (Philips MPRAGE 1 mm, Siemens XA30 2 mm, chris_t1 0.88 mm) and each
degradation (none; heavy Rician-like noise; top 30 % of slices removed; a simulated scanner
change; the non-heads of tests/pipelines/nonheads.py, and a bottle phantom) it runs
the anat pipeline, computes the QC metrics and prints them with the verdict
the default rules give. Run: .venv/bin/python bench/qc_calibration.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CORELAB_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))

from data_contracts.qc_settings import HEAD_CHECK, QCSettings  # noqa: E402
from pipelines.anat import run_anat  # noqa: E402
from pipelines.registry import get_spec  # noqa: E402
from tasks.qc.gate import judge  # noqa: E402
from tasks.qc.measure import image_metrics, needed_outputs  # noqa: E402
from tasks.qc.metrics import NotComputed  # noqa: E402
from tests.pipelines.nonheads import NON_HEADS, bottle_phantom  # noqa: E402
from tests.pipelines.test_anat_pipeline import simulated_scanner_change  # noqa: E402


def philips_t1(tmp: Path) -> Path:
    import gzip

    import dcm2niix

    src = tmp / "philips_dcm"
    src.mkdir()
    for p in sorted((DATA / "dcm_qa_philips_enh" / "In" / "cl").glob("*.gz")):
        (src / p.name[:-3]).write_bytes(gzip.decompress(p.read_bytes()))
    subprocess.run([str(dcm2niix.bin), "-z", "y", "-f", "philips", "-o", str(tmp), str(src)],
                   check=True, capture_output=True)
    return tmp / "philips.nii.gz"


def degrade(path: Path, how: str, out: Path) -> Path:
    """``noise``: Rician noise at 25 % of the 99th percentile; ``cut``: top 30 % of slices gone;
    ``scanner``: tests/pipelines' simulated scanner change; a name of tests/pipelines/nonheads.py:
    that non-head made from the T1 (the head check must fail it)."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    if how == "noise":
        rng = np.random.default_rng(0)
        sigma = 0.25 * float(np.percentile(data, 99))
        data = np.sqrt((data + rng.normal(0, sigma, data.shape)) ** 2 + rng.normal(0, sigma, data.shape) ** 2)
    elif how == "cut":
        data = data[:, :, : int(round(data.shape[2] * 0.7))]  # RAS: the third axis runs inferior->superior
    elif how == "scanner":
        nib.save(simulated_scanner_change(img), str(out))
        return out
    elif how in NON_HEADS:
        nib.save(NON_HEADS[how](img), str(out))
        return out
    nib.save(nib.Nifti1Image(data, img.affine), str(out))
    return out


def metrics_of(t1: Path, work: Path) -> dict[str, float | None]:
    res = run_anat(t1, work, "cal", "v1")
    o = res.outputs
    raw = nib.as_closest_canonical(nib.load(str(t1)))
    load = lambda k: np.asanyarray(nib.load(str(o[k])).dataobj, dtype=np.float32)  # noqa: E731
    spec = get_spec("anat")
    images = {k: load(k) for k in needed_outputs(spec.image_qc)}
    m = image_metrics(spec.image_qc, np.asanyarray(raw.dataobj, dtype=np.float32),
                      tuple(raw.header.get_zooms()[:3]), images)
    m = {k: (None if isinstance(v, NotComputed) else v) for k, v in m.items()}
    m["coverage"] = res.qc["template_brain_in_fov"]
    m["inu_range"] = res.qc["bias_field"]["p95"] - res.qc["bias_field"]["p05"]
    m |= res.qc["head_check"]
    return m


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="corelab-qc-cal-"))
    t1s = {"philips": philips_t1(tmp), "xa30": DATA / "dcm_qa_xa30" / "Ref" / "5_anat-T1w_acq-tfl.nii",
           "chris": DATA / "niivue-images" / "chris_t1.nii.gz"}
    rules = QCSettings().rules_for("any")
    names = None
    for name, path in t1s.items():
        for how in ("none", "noise", "cut", "scanner", *NON_HEADS):
            src = path if how == "none" else degrade(path, how, tmp / f"{name}_{how}.nii.gz")
            try:
                m = metrics_of(src, tmp / f"d_{name}_{how}")
            except Exception as exc:  # a pipeline failure is itself a QC outcome here
                print(f"{name:8} {how:6} pipeline failed: {exc}")
                continue
            v = judge(m, rules, {}, QCSettings().robust_z)
            names = names or sorted(m)
            print(f"{name:8} {how:11} {v.status:5} "
                  + " ".join(f"{k}={m[k]:.3g}" if m[k] is not None else f"{k}=None" for k in names))
            for r in v.reasons:
                print(f"{'':27}{r}")
    from pipelines.anat.template import template_dir

    extra = {"phantom": tmp / "phantom.nii.gz",
             "skull_stripped": template_dir() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"}
    phantom = extra["phantom"]
    nib.save(bottle_phantom(DATA / "dcm_qa_xa60" / "Ref" /
                            "phantom_check_MBfactor_CimaX_XA61_2_PRODUCT_ep2d_bold_p2_sms1.nii"), str(phantom))
    for how, path in extra.items():
        try:
            m = metrics_of(path, tmp / f"d_{how}")
            v = judge(m, rules, {}, QCSettings().robust_z)
            print(f"{'xa61' if how == 'phantom' else 'mni152':8} {how:14} {v.status:5} "
                  + " ".join(f"{k}={m[k]:.3g}" for k in HEAD_CHECK))
        except Exception as exc:  # a pipeline failure is itself a QC outcome here
            print(f"{how} pipeline failed: {exc}")


if __name__ == "__main__":
    main()
