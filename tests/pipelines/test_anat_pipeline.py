"""The built-in anatomical pipeline on real T1s from ../shared/data.

One run per T1, shared by the tests of this module (each run takes 10-30 s):
Philips MPRAGE (gzipped classic DICOM, converted here with dcm2niix), Siemens
XA30 (its Ref/ NIfTI), chris_t1 (NIfTI), a simulated scanner change of chris_t1,
and the MNI152 template itself.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_contracts.qc_settings import HEAD_CHECK, QCSettings
from pipelines.anat import NAME, VERSION, run_anat
from pipelines.anat.report import near_brain, overlay_png
from tasks.qc.gate import judge
from tests.data import shared_path

DIGEST = "sha256:" + "ab" * 32
VOLUMES = ("TIV", "GM", "WM", "CSF")


def _dcm2niix() -> str:
    found = shutil.which("dcm2niix", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail("dcm2niix (PyPI package) is not installed next to the test interpreter")
    return found


@pytest.fixture(scope="module")
def t1_paths(tmp_path_factory) -> dict[str, Path]:
    """The real T1s; the Philips one converted from its gzipped DICOM here."""
    dicom = tmp_path_factory.mktemp("philips_dcm")
    for gz in sorted(shared_path("dcm_qa_philips_enh", "In", "cl").glob("*.dcm.gz")):
        with gzip.open(gz) as src, open(dicom / gz.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    out = tmp_path_factory.mktemp("philips_nii")
    subprocess.run([_dcm2niix(), "-b", "n", "-z", "y", "-f", "%s_%p", "-o", str(out), str(dicom)],
                   check=True, capture_output=True)
    (philips,) = sorted(out.glob("*.nii.gz"))
    return {
        "philips": philips,
        "xa30": shared_path("dcm_qa_xa30", "Ref", "5_anat-T1w_acq-tfl.nii"),
        "chris": shared_path("niivue-images", "chris_t1.nii.gz"),
    }


@pytest.fixture(scope="module")
def deriv_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lake") / "derivatives" / f"{NAME}-{VERSION}"


@pytest.fixture(scope="module")
def runs(t1_paths, deriv_root):
    """One pipeline run per real T1, into one derivatives dataset."""
    return {name: run_anat(path, deriv_root, name, "base", entities={"acq": "mprage", "run": 1},
                           container_digest=DIGEST)
            for name, path in t1_paths.items()}


def simulated_scanner_change(img: nib.Nifti1Image, seed: int = 0) -> nib.Nifti1Image:
    """Another scanner's view of the same head: smooth bias field, gain 1.7, Rician noise.

    The field varies about 1.5-fold across the head; the noise SD is 2 % of a
    bright-tissue intensity (the 90th percentile of the upper half of voxels).
    """
    data = img.get_fdata()
    ijk = np.indices(data.shape).reshape(3, -1).T
    xyz = nib.affines.apply_affine(img.affine, ijk)
    x, y, z = ((xyz - xyz.mean(axis=0)) / 100.0).T
    field = np.exp(0.25 * (0.8 * x + 0.5 * z - 0.6 * y**2 + 0.4 * x * z)).reshape(data.shape)
    sigma = 0.02 * np.percentile(data[data > np.percentile(data, 50)], 90)
    rng = np.random.default_rng(seed)
    signal = 1.7 * data * field
    noisy = np.hypot(signal + rng.normal(0, 1.7 * sigma, data.shape),
                     rng.normal(0, 1.7 * sigma, data.shape))
    return nib.Nifti1Image(noisy.astype(np.float32), img.affine)


def _tsv(path: Path) -> dict[str, tuple[float, str]]:
    with open(path, newline="") as fh:
        return {r["measure"]: (float(r["value"]), r["unit"]) for r in csv.DictReader(fh, delimiter="\t")}


@pytest.mark.pipeline
@pytest.mark.parametrize("name", ["philips", "xa30", "chris"])
def test_real_t1_volumes_are_adult(runs, name):
    m = runs[name].measures
    assert 1.1e6 <= m["TIV"] <= 2.0e6, f"{name}: TIV {m['TIV'] / 1e3:.0f} cm3"
    fractions = {t: m[t] / m["TIV"] for t in ("GM", "WM", "CSF")}
    # Adult ranges, TIV-normalised (e.g. GM 40-55 %, WM 28-40 %, CSF 10-25 % in
    # SPM/FSL studies); our mask hugs the brain (the MNI152 mask), so CSF sits low.
    assert 0.38 <= fractions["GM"] <= 0.60, fractions
    assert 0.25 <= fractions["WM"] <= 0.45, fractions
    assert 0.05 <= fractions["CSF"] <= 0.30, fractions
    assert fractions["GM"] > fractions["WM"] > fractions["CSF"]
    assert m["GM_fraction"] == pytest.approx(fractions["GM"], rel=1e-12)
    # Posteriors sum to one in the mask, so the tissues add up to TIV.
    assert m["GM"] + m["WM"] + m["CSF"] == pytest.approx(m["TIV"], rel=1e-5)


@pytest.mark.pipeline
def test_outputs_form_a_bids_derivative(runs, t1_paths, deriv_root):
    desc = json.loads((deriv_root / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"] == [{"Name": NAME, "Version": VERSION,
                                    "Container": {"Type": "oci", "Tag": DIGEST}}]
    assert (deriv_root / "dseg.tsv").read_text().splitlines()[1:] == [
        "1\tGray Matter\tGM", "2\tWhite Matter\tWM", "3\tCerebrospinal Fluid\tCSF"]
    assert not list(deriv_root.glob(".anat-staging-*"))
    for name, result in runs.items():
        anat = deriv_root / f"sub-{name}" / "ses-base" / "anat"
        prefix = f"sub-{name}_ses-base_acq-mprage_run-1"
        for suffix in ("desc-preproc_T1w", "desc-brain_mask", "dseg", "label-GM_probseg",
                       "label-WM_probseg", "label-CSF_probseg"):
            assert (anat / f"{prefix}_{suffix}.nii.gz").is_file()
        sha = hashlib.sha256(t1_paths[name].read_bytes()).hexdigest()
        for key, sidecar in result.sidecars.items():
            meta = json.loads(sidecar.read_text())
            assert meta["InputSHA256"] == sha, key
            assert meta["Parameters"]["registration_seed"] == result.parameters["registration_seed"]
            assert meta["GeneratedBy"][0]["Container"]["Tag"] == DIGEST
            assert f"SimpleITK {result.versions['SimpleITK']}" in meta["SoftwareVersions"]
        assert result.outputs["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        table = _tsv(result.outputs["measures"])
        assert {k: v for k, (v, _) in table.items()} == result.measures
        assert table["TIV"][1] == "mm3" and table["GM_fraction"][1] == "1"


@pytest.mark.pipeline
@pytest.mark.parametrize("name", ["philips", "xa30", "chris"])
def test_maps_agree_with_measures_and_input_grid(runs, t1_paths, name):
    out = runs[name].outputs
    src = nib.as_closest_canonical(nib.load(str(t1_paths[name])))
    mask_img = nib.load(str(out["brain_mask"]))
    mask = np.asanyarray(mask_img.dataobj) > 0
    dseg = np.asanyarray(nib.load(str(out["dseg"])).dataobj)
    probs = np.stack([nib.load(str(out[f"probseg_{t}"])).get_fdata() for t in ("GM", "WM", "CSF")])
    voxel = abs(np.linalg.det(src.affine[:3, :3]))
    assert mask_img.shape == src.shape[:3]
    np.testing.assert_allclose(mask_img.affine, src.affine, atol=1e-4)
    assert mask.sum() * voxel == pytest.approx(runs[name].measures["TIV"], rel=1e-9)
    assert set(np.unique(dseg[mask])) == {1, 2, 3} and not dseg[~mask].any()
    np.testing.assert_allclose(probs[:, mask].sum(axis=0), 1.0, atol=1e-5)
    assert (1 + np.argmax(probs[:, mask], axis=0) == dseg[mask]).all()
    for i, tissue in enumerate(("GM", "WM", "CSF")):
        assert probs[i][mask].sum() * voxel == pytest.approx(runs[name].measures[tissue], rel=1e-5)
    # The bias field is kept for QC and explains the correction.
    field = nib.load(str(out["bias_field"])).get_fdata()
    preproc = nib.load(str(out["preproc"])).get_fdata()
    inside = mask & (field > 0)
    np.testing.assert_allclose(preproc[inside] * field[inside], src.get_fdata()[inside],
                               rtol=1e-3, atol=1e-3 * src.get_fdata().max())
    spread = runs[name].qc["bias_field"]
    assert spread["p05"] <= spread["median"] <= spread["p95"]


@pytest.mark.pipeline
def test_the_figure_shows_no_face(runs, tmp_path):
    """Class 14 (figures): nothing beyond 4 mm of the brain mask, where the face is, reaches the figure.

    chris_t1 is a whole head with its face. The figure is drawn twice, once from the T1 and once
    from the T1 with every voxel away from the brain replaced by noise: the PNGs are identical.
    """
    out = runs["chris"].outputs
    preproc_img = nib.load(str(out["preproc"]))
    t1 = preproc_img.get_fdata(dtype=np.float32)
    dseg = np.asanyarray(nib.load(str(out["dseg"])).dataobj)
    mask = np.asanyarray(nib.load(str(out["brain_mask"])).dataobj) > 0
    zooms = tuple(float(z) for z in preproc_img.header.get_zooms()[:3])
    shown = near_brain(mask, zooms)
    far = distance_from(mask, zooms) > 20.0
    head = t1 > 0.1 * np.percentile(t1, 98)
    # The input has a face: head voxels 2 cm or more in front of the brain, below its middle.
    front = np.zeros(mask.shape, bool)
    ys, zs = np.nonzero(mask.any(axis=0))
    front[:, ys.max() + 1:, : int(np.median(zs))] = True
    assert (head & far & front).sum() * np.prod(zooms) > 20_000, "chris_t1 should show a face"  # 33 cm3
    noise = np.random.default_rng(0).uniform(0, t1.max(), t1.shape).astype(np.float32)
    title = out["figure"].name.removesuffix("_desc-dseg_T1w.png")
    overlay_png(tmp_path / "faceless.png", np.where(shown, t1, noise), dseg, mask, title, zooms)
    # The figure the pipeline wrote is the one drawn without the face.
    assert out["figure"].read_bytes() == (tmp_path / "faceless.png").read_bytes()


def distance_from(mask: np.ndarray, zooms: tuple[float, ...]) -> np.ndarray:
    from scipy import ndimage

    return ndimage.distance_transform_edt(~mask, sampling=zooms)


@pytest.mark.pipeline
def test_simulated_scanner_change_keeps_volumes_within_2_percent(runs, t1_paths, tmp_path):
    changed = tmp_path / "chris_other_scanner.nii.gz"
    src = nib.load(str(t1_paths["chris"]))
    nib.save(simulated_scanner_change(src), str(changed))
    other = run_anat(changed, tmp_path / "deriv", "chris", "other")
    base = runs["chris"].measures
    deltas = {k: other.measures[k] / base[k] - 1.0 for k in VOLUMES}
    assert all(abs(d) < 0.02 for d in deltas.values()), deltas
    # The change was real: the field N4 found is much wider than the original's.
    assert other.qc["bias_field"]["p95_over_p05"] > runs["chris"].qc["bias_field"]["p95_over_p05"] + 0.1
    # It is still a head, and the head check says so by nearly the same values (the head mask, and so
    # the scalp margin, shrinks by 2-3 mm where the 1.5-fold field darkens the scalp).
    assert _head_check_verdict(other.qc["head_check"]) == "PASS"
    for k, v in other.qc["head_check"].items():
        assert v == pytest.approx(runs["chris"].qc["head_check"][k], abs=0.05 if k != "scalp_margin_mm" else 3.0)


def _head_check_verdict(values: dict) -> str:
    settings = QCSettings()
    return judge({k: values[k] for k in HEAD_CHECK}, settings.rules_for("any"), {}, settings.robust_z).status


@pytest.mark.pipeline
@pytest.mark.parametrize("name", ["philips", "xa30", "chris"])
def test_real_heads_pass_the_head_check_as_written_in_the_sidecar(runs, name):
    """Class 12: the head check (tests/pipelines/test_head_check.py fails the non-heads) passes heads."""
    meta = json.loads(runs[name].outputs["measures"].with_suffix(".json").read_text())
    values = meta["QC"]["head_check"]
    assert values == runs[name].qc["head_check"] and set(values) == set(HEAD_CHECK)
    assert _head_check_verdict(values) == "PASS", values


@pytest.mark.pipeline
def test_template_segmentation_matches_template_tissue_maps(tmp_path):
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )

    t1 = load_mni152_template(resolution=1)
    path = tmp_path / "mni152_t1.nii.gz"
    nib.save(t1, str(path))
    result = run_anat(path, tmp_path / "deriv", "mni", "template")
    mask = load_mni152_brain_mask(resolution=1).get_fdata() > 0
    gm = load_mni152_gm_template(resolution=1).get_fdata()
    wm = load_mni152_wm_template(resolution=1).get_fdata()
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    truth = np.where(mask, 1 + np.argmax(np.stack([gm, wm, csf]), axis=0), 0)
    dseg = np.asanyarray(nib.load(str(result.outputs["dseg"])).dataobj)
    assert dseg.shape == truth.shape

    def dice(label: int) -> float:
        a, b = dseg == label, truth == label
        return 2.0 * (a & b).sum() / (a.sum() + b.sum())

    assert dice(1) >= 0.85, f"GM Dice {dice(1):.3f}"
    assert dice(2) >= 0.85, f"WM Dice {dice(2):.3f}"
    # The registration of the template to itself is close to the identity.
    assert result.qc["affine_volume_scale"] == pytest.approx(1.0, abs=0.03)


@pytest.mark.pipeline
def test_same_input_gives_identical_outputs_whatever_the_threads(runs, t1_paths, tmp_path):
    again = run_anat(t1_paths["xa30"], tmp_path / "deriv", "xa30", "base",
                     entities={"acq": "mprage", "run": 1}, container_digest=DIGEST, threads=1)
    assert again.measures == runs["xa30"].measures
    for key, path in runs["xa30"].outputs.items():
        if path.name.endswith(".nii.gz"):
            a = np.asanyarray(nib.load(str(path)).dataobj)
            b = np.asanyarray(nib.load(str(again.outputs[key])).dataobj)
            assert np.array_equal(a, b), key
