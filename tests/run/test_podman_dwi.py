"""The dwi image, really built with podman, computes exactly what the local backend computes.

``make test-containers``: builds the image from containers/dwi/ into a temporary copy of the lock
(without the layer cache: a cached build may reuse layers another build made, whose IDs then
stand in the image history and change its digest; the lock holds a clean build's), runs the dwi pipeline on the
Philips DWI of ../shared/data in the container (its .bval and .bvec mounted beside it, and the
anat pipeline's run on the Philips MPRAGE as the session's T1, mounted as upstream files) and with
the ``local`` backend, and compares: same files, same voxels, same measures within 1e-6.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipelines.dwi.process import MEASURES
from pipelines.image_build import build_image
from pipelines.images import LOCK_PATH, read_lock
from pipelines.registry import get_spec
from tasks.run.runner import run_pipeline
from tests.pipelines.dwi_data import in_bids, philips_dwi, philips_t1_anat

pytestmark = pytest.mark.containers
BACKENDS = ("podman", "local")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run containers/setup_podman.sh (make test-containers)")
    lock = tmp_path_factory.mktemp("lock") / "lock"
    shutil.copy(LOCK_PATH, lock)
    entry = build_image(get_spec("dwi"), lock_path=lock, no_cache=True)   # see the lock test below
    raw = in_bids(philips_dwi(tmp_path_factory.mktemp("dwi")), tmp_path_factory.mktemp("raw"))
    preproc, dseg = philips_t1_anat(tmp_path_factory.mktemp("t1"))
    out = tmp_path_factory.mktemp("runs")
    records = {b: run_pipeline(get_spec("dwi"), raw, out / b, "01", "1", backend=b, threads=1, lock_path=lock,
                               upstream={"t1w": preproc, "t1w_dseg": dseg})
               for b in BACKENDS}
    return entry, records, out


def test_the_committed_lock_pins_the_image_this_tree_builds(runs):
    entry, records, _ = runs
    assert read_lock(LOCK_PATH)["dwi"].digest == entry.digest
    assert read_lock(LOCK_PATH)["dwi"].reproducible is True     # a clean rebuild gave the same digest
    for backend, rec in records.items():
        assert rec.ok and rec.missing_outputs == [], f"{backend}: {rec.error}\n{rec.stderr_tail}"
    assert records["podman"].digest == entry.digest


def test_same_voxels_and_measures_in_the_container_and_here(runs):
    _, _, out = runs
    images = {b: sorted(p.relative_to(out / b) for p in (out / b).rglob("*.nii.gz")) for b in BACKENDS}
    assert images["podman"] == images["local"] and len(images["local"]) == 8     # with the T1's white matter
    for rel in images["local"]:
        ours, theirs = nib.load(out / "local" / rel), nib.load(out / "podman" / rel)
        assert np.array_equal(ours.affine, theirs.affine), rel
        assert np.array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj)), rel
    (table,) = [p.relative_to(out / "local") for p in (out / "local").rglob("*_measures.tsv")]
    ours, theirs = (pd.read_csv(out / b / table, sep="\t") for b in BACKENDS)
    assert list(ours["measure"]) == list(theirs["measure"]) == list(MEASURES)
    np.testing.assert_allclose(ours["value"], theirs["value"], rtol=0, atol=1e-6)
