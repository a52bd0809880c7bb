"""The anat spec is the anat pipeline's own contract, and every spec is one the QC stage can read."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipelines.anat.derivatives import output_names
from pipelines.anat.process import MEASURES
from pipelines.anat.template import TISSUES
from pipelines.registry import UnknownPipeline, get_spec, names, register, spec_for_image
from pipelines.spec import Measure, PipelineSpec, SpecError, sidecar_of
from tasks.qc.measure import needed_outputs


def test_the_anat_spec_names_the_outputs_anat_writes_by_their_keys():
    spec = get_spec("anat")
    prefix = "sub-S1_ses-V1_acq-fast_run-2"
    written = {"dataset_description": "dataset_description.json", **output_names(prefix, TISSUES)}
    assert spec.expected_outputs("S1", "V1", {"acq": "fast", "run": "2"}) == written


def test_the_anat_spec_declares_the_measures_anat_reports_with_their_units():
    assert get_spec("anat").measures == tuple(Measure(k, unit, what) for k, (unit, what) in MEASURES.items())


def test_every_spec_asks_only_for_qc_it_can_be_given():
    for name in names():
        spec = get_spec(name)
        assert set(needed_outputs(spec.image_qc)) <= set(spec.outputs), name
        if spec.qc_sidecar:
            assert sidecar_of(spec.outputs[spec.qc_sidecar]).endswith(".json")


def test_a_spec_that_cannot_be_read_is_refused_when_made():
    anat = get_spec("anat")
    with pytest.raises(SpecError, match="unknown image QC groups"):
        replace(anat, image_qc=("head", "colour"))
    with pytest.raises(SpecError, match=r"group 'volumes' is computed from outputs \['probseg_CSF'\]"):
        replace(anat, outputs={k: v for k, v in anat.outputs.items() if k != "probseg_CSF"})
    with pytest.raises(SpecError, match="declares measures but no 'measures' output"):
        replace(anat, outputs={k: v for k, v in anat.outputs.items() if k != "measures"})
    with pytest.raises(SpecError, match="qc_sidecar 'report'"):
        replace(anat, qc_sidecar="report")


def test_register_makes_a_pipeline_known(monkeypatch):
    import pipelines.registry as registry

    monkeypatch.setattr(registry, "BUILTIN", dict(registry.BUILTIN))
    toy = replace(get_spec("anat"), name="toy", image="toyimage")
    register("toy", lambda: toy)
    assert names() == ["anat", "bold", "dwi", "toy"] and get_spec("toy") is toy and spec_for_image("toyimage") is toy
    with pytest.raises(UnknownPipeline, match="known: \\['anat', 'bold', 'dwi', 'toy'\\]"):
        get_spec("fmri")
    assert isinstance(get_spec("anat"), PipelineSpec)


def test_sidecar_of_follows_the_bids_rule():
    assert sidecar_of("sub-1/ses-a/anat/sub-1_ses-a_desc-volumes_measures.tsv") == \
        "sub-1/ses-a/anat/sub-1_ses-a_desc-volumes_measures.json"
    assert sidecar_of("x_T1w.nii.gz") == "x_T1w.json"


def test_the_dwi_spec_promises_what_the_pipeline_writes():
    from pipelines.dwi.process import MEASURES, OPTIONAL_MEASURES
    from pipelines.dwi.run import file_prefix, output_names

    spec = get_spec("dwi")
    promised = spec.expected_outputs("01", "1", {"acq": "b1000"})
    written = output_names(file_prefix("01", "1", {"acq": "b1000"}))
    assert {k: v for k, v in promised.items() if k != "dataset_description"} == written
    assert [(m.name, m.unit) for m in spec.measures] == [(k, u) for k, (u, _) in MEASURES.items()]
    assert {m.name for m in spec.measures if m.optional} == set(OPTIONAL_MEASURES)
    assert set(spec.entities) == {"acq", "rec", "dir", "run"} and spec.sources == ("pipelines/dwi", "pipelines/anat")
    # the session's T1 comes from the anat pipeline's outputs, which its spec promises
    anat = get_spec("anat").outputs
    assert [(u.pipeline, u.output in anat) for u in spec.upstream] == [("anat", True), ("anat", True)]


def test_the_bold_spec_promises_what_the_pipeline_writes():
    from pipelines.bold.process import MEASURES
    from pipelines.bold.run import file_prefix, output_names

    spec = get_spec("bold")
    promised = spec.expected_outputs("01", "1", {"task": "rest", "run": "2"})
    written = output_names(file_prefix("01", "1", "rest", {"run": "2"}))
    assert {k: v for k, v in promised.items() if k != "dataset_description"} == written
    assert [(m.name, m.unit) for m in spec.measures] == [(k, u) for k, (u, _) in MEASURES.items()]
    assert "task" in spec.entities and spec.sources == ("pipelines/bold", "pipelines/anat")
    assert {m.metric for m in spec.qc_metrics} >= {"bold_fd_mean", "bold_tsnr", "bold_realign_failed"}
