"""Reading a pipeline's work through its spec: an input entity it does not take is refused, not dropped."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from pipelines.registry import get_spec
from tasks.lake.storage import Lake
from tasks.qc.measure import gate, measure_quality
from tasks.run.derivatives import image_entities, run_on_image


def test_an_entity_the_pipeline_does_not_take_is_refused_with_its_code(tmp_path, trial):
    """A contrast-enhanced T1 (ce-gad): anat takes acq and run only, and dropping ce would give the
    plain T1 of the same session and this one the same derivatives."""
    lake = Lake(str(tmp_path / "lake")).init()
    rel = "bids/sub-S1/ses-baseline/anat/sub-S1_ses-baseline_acq-fast_ce-gad_T1w.nii.gz"
    lake.write_bytes(rel, gzip.compress(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)).to_bytes()))
    assert image_entities(rel) == {"acq": "fast", "ce": "gad"}
    spec = get_spec("anat")
    run = run_on_image(lake, spec, rel, "S1", "baseline", "2.25.1", "local")
    assert run.error_code == "input_unsupported" and not run.outputs and not run.record
    assert "takes no BIDS entity ce (it takes acq, run)" in run.error
    assert lake.find("derivatives") == []                          # nothing ran, nothing written
    sq = measure_quality(lake, spec, run)
    verdict = gate(trial, "siemens-xa30", sq, {})
    assert verdict.status == "FAIL" and verdict.reason_code == "input_unsupported"
    assert "sub-S1_ses-baseline_acq-fast_ce-gad_T1w.nii.gz is not processed" in verdict.reasons[0]


def test_a_worker_without_its_engine_raises_and_writes_no_derivatives(tmp_path, monkeypatch):
    """The process deployment's backend is podman: on a worker where podman is not on PATH, nothing is
    learnt about the image, so the run raises (infrastructure, no verdict) instead of returning a FAIL."""
    import shutil

    import pytest

    from data_contracts.reasons import REASONS
    from tasks.run.engines import EngineMissing

    lake = Lake(str(tmp_path / "lake")).init()
    rel = "bids/sub-S1/ses-baseline/anat/sub-S1_ses-baseline_T1w.nii.gz"
    lake.write_bytes(rel, gzip.compress(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)).to_bytes()))
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))                      # a worker with no podman at all
    assert shutil.which("podman") is None
    for backend in ("podman", "apptainer"):
        with pytest.raises(EngineMissing) as info:
            run_on_image(lake, get_spec("anat"), rel, "S1", "baseline", "2.25.1", backend)
        assert REASONS[info.value.code].category == "infrastructure" and backend in str(info.value)
    assert lake.find("derivatives") == []


def test_upstream_outputs_are_those_of_the_first_usable_series_and_staged_from_s3(tmp_path):
    """The dwi pipeline takes the anat outputs of the first T1 its producer judged usable; on an S3
    lake (moto's server) those files are copied next to the run, byte for byte."""
    from tasks.run.derivatives import stage_upstream, upstream_inputs
    from tests.helpers import s3_lake

    dwi = get_spec("dwi")
    first = "bids/sub-S1/ses-baseline/anat/sub-S1_ses-baseline_acq-mprage_run-1_T1w.nii.gz"
    second = "bids/sub-S1/ses-baseline/anat/sub-S1_ses-baseline_run-2_T1w.nii.gz"
    chosen = upstream_inputs(dwi, "S1", "baseline", {"anat": [first, second]})
    anat_root = f"derivatives/anat-{get_spec('anat').version}/sub-S1/ses-baseline/anat"
    assert chosen == {"t1w": f"{anat_root}/sub-S1_ses-baseline_acq-mprage_run-1_desc-preproc_T1w.nii.gz",
                      "t1w_dseg": f"{anat_root}/sub-S1_ses-baseline_acq-mprage_run-1_dseg.nii.gz"}
    assert upstream_inputs(dwi, "S1", "baseline", {}) == {}
    assert upstream_inputs(get_spec("anat"), "S1", "baseline", {"anat": [first]}) == {}
    lake, server = s3_lake("upstream")
    try:
        for i, rel in enumerate(chosen.values()):
            lake.write_bytes(rel, bytes([i]) * 100)
        staged = stage_upstream(lake, chosen, tmp_path)
        assert {k: p.read_bytes() for k, p in staged.items()} == {"t1w": bytes([0]) * 100, "t1w_dseg": bytes([1]) * 100}
        assert all(p.name == chosen[k].rsplit("/", 1)[-1] for k, p in staged.items())
    finally:
        server.stop()
    local = Lake(str(tmp_path / "lake")).init()
    assert stage_upstream(local, chosen, tmp_path) == {k: Path(local.path(v)) for k, v in chosen.items()}


def test_a_t1_its_pipeline_failed_is_not_given_to_the_dwi_pipeline(tmp_path):
    """The flow's choice: the anat verdicts of this run (a FAIL is skipped, the next usable T1 taken),
    and with none usable the dwi pipeline runs without a T1."""
    from datetime import date

    from flows.process_study import upstream_inputs_of
    from tasks.lake.studies import Study
    from tasks.qc.gate import Verdict
    from tasks.qc.measure import SeriesQC
    from tasks.run.derivatives import PipelineRun

    lake = Lake(str(tmp_path / "lake")).init()
    study = Study("T", "site", "key", "S1", "baseline", "2.25.9", date(2026, 1, 1), 0, True)
    anat, dwi = get_spec("anat"), get_spec("dwi")
    t1 = {uid: f"bids/sub-S1/ses-baseline/anat/sub-S1_ses-baseline_run-{i}_T1w.nii.gz"
          for i, uid in enumerate(("2.25.1", "2.25.2"), start=1)}
    image = "bids/sub-S1/ses-baseline/dwi/sub-S1_ses-baseline_dwi.nii.gz"
    work = [(anat, uid, path) for uid, path in t1.items()] + [(dwi, "2.25.3", image)]

    def judged(*statuses: str) -> list[SeriesQC]:
        return [SeriesQC(PipelineRun(uid, t1[uid], "sha", "anat", anat.version), verdict=Verdict(s))
                for uid, s in zip(t1, statuses)]

    chosen = upstream_inputs_of(lake, study, work, judged("FAIL", "WARN"), work[2:])
    assert chosen["dwi"]["t1w"].endswith("sub-S1_ses-baseline_run-2_desc-preproc_T1w.nii.gz")
    assert upstream_inputs_of(lake, study, work, judged("FAIL", "FAIL"), work[2:]) == {"dwi": {}}
    assert upstream_inputs_of(lake, study, work, judged("PASS", "PASS"), work[:2]) == {}
