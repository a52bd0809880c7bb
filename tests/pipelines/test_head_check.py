"""Issue 10, class 12: nothing checked that the image is a head.

The held-out GE T1 of a fruit passed the brain-plausibility limits (TIV 1942 cm3, GM fraction
0.58) and one reviewer override made it five biomarker rows. Here non-heads are made from the
real data (tests/pipelines/nonheads.py) and each one must either be refused by the pipeline or
FAIL the gate with reason ``not_a_head``; the real heads (test_anat_pipeline.py) must pass it.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import nibabel as nib
import pytest

from data_contracts.qc_settings import DEFAULT_RULES, HEAD_CHECK, QCSettings
from pipelines.anat.errors import AnatProcessingError
from pipelines.anat.io import load_t1
from pipelines.anat.parameters import AnatParameters
from pipelines.anat.process import compute
from pipelines.anat.template import template_dir
from tasks.qc.gate import check_rule, judge
from tests.data import shared_path
from tests.pipelines.nonheads import NON_HEADS, bottle_phantom

pytestmark = pytest.mark.pipeline

XA30 = ("dcm_qa_xa30", "Ref", "5_anat-T1w_acq-tfl.nii")
CHRIS = ("niivue-images", "chris_t1.nii.gz")
PHANTOM = ("dcm_qa_xa60", "Ref", "phantom_check_MBfactor_CimaX_XA61_2_PRODUCT_ep2d_bold_p2_sms1.nii")


CASES = (("xa30", "fruit"), ("xa30", "inverted"), ("xa30", "shuffled"),
         ("chris", "inverted"), ("chris", "upside_down"))
SOURCES = {"xa30": XA30, "chris": CHRIS}
ALL_CASES = CASES + (("xa61", "phantom"), ("mni152", "skull_stripped"))


def _object(source: str, kind: str):
    if kind == "phantom":
        return bottle_phantom(shared_path(*PHANTOM))
    if kind == "skull_stripped":  # the MNI152 T1 nilearn ships is a brain without its head
        return nib.load(str(template_dir() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    return NON_HEADS[kind](nib.as_closest_canonical(nib.load(str(shared_path(*SOURCES[source])))))


def _compute(path: str):
    """``anat``'s maps of one saved object, or the AnatProcessingError's message (in a worker process)."""
    try:
        return compute(load_t1(path), AnatParameters(threads=1))
    except AnatProcessingError as exc:
        return AnatProcessingError(str(exc))


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """``anat`` on each object as the pipeline reads it (saved, loaded, checked), once per module:
    the maps, or the AnatProcessingError that refused it. The objects are computed two at a time
    in worker processes (one thread each): on CI's two cores the module takes half the time."""
    paths = {}
    for source, kind in ALL_CASES:
        path = tmp_path_factory.mktemp(kind) / f"{source}_{kind}.nii.gz"
        nib.save(_object(source, kind), str(path))
        paths[source, kind] = str(path)
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        futures = {case: pool.submit(_compute, path) for case, path in paths.items()}
        cache = {case: f.result() for case, f in futures.items()}

    def get(source: str, kind: str):
        return cache[source, kind]
    return get


def _gate(maps) -> object:
    head = maps.qc["head_check"]
    return judge({k: head[k] for k in HEAD_CHECK}, QCSettings().rules_for("site"), {}, QCSettings().robust_z)


@pytest.mark.parametrize(("source", "kind"), ALL_CASES, ids=["-".join(c) for c in ALL_CASES])
def test_a_non_head_is_refused_or_fails_as_not_a_head(computed, source, kind):
    result = computed(source, kind)
    if isinstance(result, AnatProcessingError):
        # Registration refused it (a diverged scale, an affine far from the similarity): the run fails
        # with a named reason and nothing is measured, so no verdict and no biomarker can come from it.
        assert "registration" in str(result)
        return
    verdict = _gate(result)
    assert verdict.status == "FAIL", (kind, result.qc["head_check"])
    failed = [r for r in verdict.metrics if r.status == "FAIL"]
    assert failed and {r.code for r in failed} == {"not_a_head"}
    assert all("may not be a T1-weighted head" in r.reason for r in failed)


def test_most_non_heads_reach_the_gate(computed):
    """The head check is what stops them, not only registration's own refusals."""
    gated = [c for c in CASES if not isinstance(computed(*c), Exception)]
    assert len(gated) >= 3, gated


def test_the_fruit_passes_the_volume_limits_and_fails_the_head_check(computed):
    """The held-out fruit's case, rebuilt: plausible volumes, not a head."""
    maps = computed("xa30", "fruit")
    assert not isinstance(maps, Exception), maps
    m = maps.measures
    volumes = {"tiv_cm3": m["TIV"] / 1000.0, "gm_fraction": m["GM_fraction"],
               "wm_fraction": m["WM"] / m["TIV"], "csf_fraction": m["CSF"] / m["TIV"]}
    # Without the head check nothing about its size or tissue split would fail it ...
    assert all(check_rule(k, v, DEFAULT_RULES[k])[0] != "FAIL" for k, v in volumes.items()), volumes
    # ... and with it, every one of the three says it is not a head.
    verdict = _gate(maps)
    assert {r.metric for r in verdict.metrics if r.code == "not_a_head" and r.status == "FAIL"} == set(HEAD_CHECK)


def test_a_value_that_cannot_be_measured_fails_as_missing(computed):
    maps = computed("xa30", "fruit")
    values = {**maps.qc["head_check"], "tissue_order": None}
    gone = judge(values, QCSettings().rules_for("s"), {}, QCSettings().robust_z)
    assert gone.status == "FAIL" and any(r.metric == "tissue_order" and r.code == "metric_missing"
                                         for r in gone.metrics)
