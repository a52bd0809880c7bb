"""Reading a pipeline's work through its spec: an input entity it does not take is refused, not dropped."""

from __future__ import annotations

import gzip

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
