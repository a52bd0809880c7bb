"""A second pipeline goes through process_study with nothing under tasks/ knowing about it.

The pipeline is tiny but real: a script that thresholds the T1 into a brain-mask volume, writes
it as a BIDS derivative, a measures table (one volume, in mm3) and a QC sidecar. Its spec,
image definition and lock live in a folder of their own, as a site's own pipeline package
would ship them; it is registered by name and run with the local backend, which checks this
environment against the image's requirements lock exactly as it does for anat.
"""

from __future__ import annotations

import json
import textwrap
from importlib import metadata

import pytest

from flows.process_study import process_study
from flows.receive_study import receive_study
from pipelines.images import LockedImage, sha256_file, source_sha256, write_lock_entry
from pipelines.registry import BUILTIN
from pipelines.spec import BidsQuery, Measure, PipelineSpec, SidecarMetric
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tests.data import shared_path

pytestmark = pytest.mark.prefect

MASK_PIPELINE = '''
"""mask 0.1: a brain-mask volume from a T1 (voxels above 15 % of the 98th percentile)."""
import argparse, json, os
import nibabel as nib
import numpy as np

p = argparse.ArgumentParser()
for flag in ("--input", "--output-dir", "--subject", "--session", "--acq", "--run"):
    p.add_argument(flag)
a = p.parse_args()
img = nib.as_closest_canonical(nib.load(a.input))
data = np.asanyarray(img.dataobj, dtype=np.float32)
mask = data > 0.15 * np.percentile(data, 98)
prefix = "_".join([f"sub-{a.subject}", f"ses-{a.session}"] + [f"{k}-{v}" for k, v in
                  (("acq", a.acq), ("run", a.run)) if v])
anat = os.path.join(a.output_dir, f"sub-{a.subject}", f"ses-{a.session}", "anat")
os.makedirs(anat, exist_ok=True)
nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), os.path.join(anat, prefix + "_desc-brain_mask.nii.gz"))
volume = float(mask.sum() * np.prod(img.header.get_zooms()[:3]))
with open(os.path.join(anat, prefix + "_desc-mask_measures.json"), "w") as fh:
    json.dump({"QC": {"mask_fraction": float(mask.mean())}}, fh)
with open(os.path.join(anat, prefix + "_desc-mask_measures.tsv"), "w") as fh:
    fh.write(f"measure\\tvalue\\tunit\\nmask_volume\\t{volume!r}\\tmm3\\n")
with open(os.path.join(a.output_dir, "dataset_description.json"), "w") as fh:
    json.dump({"Name": "mask", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
               "GeneratedBy": [{"Name": "mask", "Version": "0.1"}]}, fh)
'''


@pytest.fixture
def mask_pipeline(tmp_path, monkeypatch):
    """The mask pipeline's own tree (code, image definition, lock), registered as ``mask``."""
    root = tmp_path / "maskpkg"
    (root / "maskpipe").mkdir(parents=True)
    script = root / "maskpipe" / "mask.py"
    script.write_text(textwrap.dedent(MASK_PIPELINE))
    image = root / "containers" / "mask"
    image.mkdir(parents=True)
    (image / "Containerfile").write_text("FROM localhost/corelab-base:bookworm\nCOPY maskpipe /opt/maskpipe\n")
    pins = {name: metadata.version(name) for name in ("nibabel", "numpy")}
    (image / "requirements.lock").write_text("".join(f"{k}=={v}\n" for k, v in pins.items()))
    write_lock_entry(LockedImage(
        key="mask", name="localhost/corelab-mask", tag="0.1", digest="sha256:" + "5a" * 32,
        pipeline_version="0.1", containerfile_sha256=sha256_file(image / "Containerfile"),
        requirements_sha256=sha256_file(image / "requirements.lock"),
        source_sha256=source_sha256(("maskpipe",), root), python="3.11.2",
        base="localhost/corelab-base:bookworm", engine="podman version 4.3.1",
        built_at="2026-12-01T00:00:00+00:00"), root / "containers" / "lock")
    anat = "sub-{subject}/ses-{session}/anat/{prefix}"
    spec = PipelineSpec(
        name="mask", version="0.1", image="mask",
        command=("python", str(script), "--input", "{input}", "--output-dir", "{output_dir}",
                 "--subject", "{subject}", "--session", "{session}"),
        options={"acq": "--acq", "run": "--run"},
        inputs=(BidsQuery("anat", "T1w"),),
        outputs={"dataset_description": "dataset_description.json",
                 "brain_mask": f"{anat}_desc-brain_mask.nii.gz",
                 "measures": f"{anat}_desc-mask_measures.tsv"},
        measures=(Measure("mask_volume", "mm3", "voxels above 15 % of the 98th percentile"),),
        image_qc=("head",),
        qc_sidecar="measures",
        qc_metrics=(SidecarMetric("mask_fraction", "mask_fraction"),),
        sources=("maskpipe",),
        definitions=root / "containers",
    )
    monkeypatch.setitem(BUILTIN, "mask", lambda: spec)   # what register("mask", ...) does, undone after
    return spec


def test_a_registered_pipeline_runs_through_process_study(prefect_harness, tmp_path, trial, mask_pipeline):
    lake_dir = tmp_path / "lake"
    (o,) = receive_study(str(shared_path("dcm_qa_xa30", "In")), "siemens-xa30", lake_url=str(lake_dir), trial=trial)
    (sq,) = process_study(o.study.study_key, "siemens-xa30", lake_url=str(lake_dir), trial=trial,
                          pipelines=["mask"])
    lake = Lake(str(lake_dir))
    run = sq.run
    assert run.error is None and (run.pipeline, run.version) == ("mask", "0.1")
    assert set(run.outputs) == {"dataset_description", "brain_mask", "measures"}
    assert all(lake.exists(p) and p.startswith("derivatives/mask-0.1/") for p in run.outputs.values())
    # QC: the head metrics of the catalogue and the pipeline's own value, nothing of anat's
    assert set(sq.metrics) == {"efc", "fber", "fov_cut", "mask_fraction"} and not sq.missing
    assert 0.05 < sq.metrics["mask_fraction"] < 0.6
    assert sq.verdict.status == "PASS", sq.verdict.reasons
    bio = read_table(lake, "biomarkers")
    (row,) = bio.itertuples()
    assert (row.pipeline_name, row.measure, row.unit, row.qc_status) == ("mask", "mask_volume", "mm3", "PASS")
    assert 1e6 < row.value < 6e6                                                      # a head: 1-6 litres
    # run locally: no image ran, so no digest; the backend and the environment's hash say what did
    assert row.container_digest is None and row.backend == "local" and len(row.environment_sha256) == 64
    qc = read_table(lake, "qc")
    assert set(qc.pipeline_name) == {"mask"} and set(qc.metric) == {"efc", "fber", "fov_cut", "mask_fraction",
                                                                     "verdict"}
    provenance = json.loads(lake.read_text(next(p for p in lake.find("derivatives/mask-0.1")
                                                if p.endswith("_provenance.json"))))
    assert provenance["ok"] and provenance["backend"] == "local" and not provenance["version_override"]


def test_a_pipeline_whose_measures_break_its_spec_is_incomplete(prefect_harness, tmp_path, trial, mask_pipeline):
    from dataclasses import replace

    BUILTIN["mask"] = lambda: replace(mask_pipeline, measures=(Measure("mask_volume", "cm3"),))
    lake_dir = tmp_path / "lake"
    (o,) = receive_study(str(shared_path("dcm_qa_xa30", "In")), "siemens-xa30", lake_url=str(lake_dir), trial=trial)
    (sq,) = process_study(o.study.study_key, "siemens-xa30", lake_url=str(lake_dir), trial=trial,
                          pipelines=["mask"])
    assert sq.run.error_code == "pipeline_incomplete"
    assert "mask_volume [mm3, declared cm3]" in sq.run.error
    assert sq.verdict.status == "FAIL" and sq.verdict.reason_code == "pipeline_incomplete"
    assert read_table(Lake(str(lake_dir)), "biomarkers").empty
