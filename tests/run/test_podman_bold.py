"""The bold image, really built with podman, computes exactly what the local backend computes.

``make test-containers``: builds the image from containers/bold/ into a temporary copy of the lock
(without the layer cache: a cached build may reuse layers another build made, whose IDs then
stand in the image history and change its digest; the lock holds a clean build's), runs the bold pipeline on the
XA61 multiband BOLD of ../shared/data in the container (its JSON sidecar mounted beside it) and
with the ``local`` backend, and compares: same files, same voxels, same confounds and measures.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipelines.image_build import build_image
from pipelines.images import LOCK_PATH, read_lock
from pipelines.registry import get_spec
from tasks.run.runner import run_pipeline
from tests.pipelines.bold_data import convert, in_bids

pytestmark = pytest.mark.containers
BACKENDS = ("podman", "local")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run containers/setup_podman.sh (make test-containers)")
    lock = tmp_path_factory.mktemp("lock") / "lock"
    shutil.copy(LOCK_PATH, lock)
    entry = build_image(get_spec("bold"), lock_path=lock, no_cache=True)   # see the lock test below
    raw = in_bids(convert("xa61", tmp_path_factory.mktemp("bold")), tmp_path_factory.mktemp("raw"))
    out = tmp_path_factory.mktemp("runs")
    records = {b: run_pipeline(get_spec("bold"), raw, out / b, "01", "1", backend=b, entities={"task": "rest"},
                               threads=1, lock_path=lock)
               for b in BACKENDS}
    return entry, records, out


def test_the_committed_lock_pins_the_image_this_tree_builds(runs):
    entry, records, _ = runs
    assert read_lock(LOCK_PATH)["bold"].digest == entry.digest
    assert read_lock(LOCK_PATH)["bold"].reproducible is True     # a clean rebuild gave the same digest
    for backend, rec in records.items():
        assert rec.ok and rec.missing_outputs == [], f"{backend}: {rec.error}\n{rec.stderr_tail}"
    assert records["podman"].digest == entry.digest


def test_same_voxels_confounds_and_measures_in_the_container_and_here(runs):
    _, _, out = runs
    images = {b: sorted(p.relative_to(out / b) for p in (out / b).rglob("*.nii.gz")) for b in BACKENDS}
    assert images["podman"] == images["local"] and len(images["local"]) == 3
    for rel in images["local"]:
        ours, theirs = nib.load(out / "local" / rel), nib.load(out / "podman" / rel)
        assert np.array_equal(ours.affine, theirs.affine), rel
        assert np.array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj)), rel
    for pattern in ("*_timeseries.tsv", "*_measures.tsv"):
        (table,) = [p.relative_to(out / "local") for p in (out / "local").rglob(pattern)]
        ours, theirs = (pd.read_csv(out / b / table, sep="\t", na_values="n/a") for b in BACKENDS)
        assert list(ours.columns) == list(theirs.columns) and len(ours) == len(theirs)
        numeric = ours.select_dtypes("number").columns
        np.testing.assert_allclose(ours[numeric], theirs[numeric], rtol=0, atol=1e-6)
    assert list(ours["measure"]) == ["FD_mean", "FD_perc", "tSNR"]
