"""The anat image, really built with podman, computes exactly what the local backend computes.

``make test-containers`` (podman set up by containers/setup_podman.sh): builds the image from
containers/anat/ into a temporary copy of the lock (the committed lock is never rewritten by a
test), runs the anatomical pipeline on one real T1 from ../shared/data in the container and
with the ``local`` backend, and compares: same output files, same voxels, same measures
within 1e-6. Also checks that the real engine's digest is what the build recorded and that a
run against a lock that pins another digest is refused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipelines.image_build import build_image, podman_env
from pipelines.images import LOCK_PATH, containerfile_path, read_lock, requirements_path, sha256_file, write_lock_entry
from pipelines.registry import get_spec
from tasks.run.runner import DigestMismatch, run_pipeline
from tests.data import shared_path

pytestmark = pytest.mark.containers
BACKENDS = ("podman", "local")


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run containers/setup_podman.sh (make test-containers)")
    lock = tmp_path_factory.mktemp("lock") / "lock"
    if LOCK_PATH.exists():
        shutil.copy(LOCK_PATH, lock)
    entry = build_image(get_spec("anat"), lock_path=lock)
    return lock, entry


@pytest.fixture(scope="module")
def t1() -> Path:
    # Siemens XA30 MPRAGE, 2 mm: a real head that keeps the two runs short.
    return shared_path("dcm_qa_xa30", "Ref", "5_anat-T1w_acq-tfl.nii")


@pytest.fixture(scope="module")
def runs(locked, t1, tmp_path_factory):
    lock, _ = locked
    out = tmp_path_factory.mktemp("runs")
    # One thread, so the comparison cannot depend on whether multi-threaded ITK filters reduce
    # in a fixed order (an earlier anat at 2 threads differed run to run in the last bits).
    records = {backend: run_pipeline(get_spec("anat"), t1, out / backend, "xa30", "1",
                                     backend=backend, entities={"acq": "tfl"}, threads=1,
                                     lock_path=lock)
               for backend in BACKENDS}
    return records, out


def files(root: Path, pattern: str) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob(pattern))}


def test_build_records_what_podman_holds(locked):
    lock, entry = locked
    proc = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", entry.tagged],
                          capture_output=True, text=True, env=podman_env(), check=True)
    assert entry.digest == "sha256:" + proc.stdout.strip()
    assert read_lock(lock)["anat"] == entry
    assert entry.containerfile_sha256 == sha256_file(containerfile_path("anat"))
    assert entry.requirements_sha256 == sha256_file(requirements_path("anat"))
    assert entry.python.startswith("3.11.")


def test_both_backends_run_and_promise_is_kept(runs, locked):
    records, _ = runs
    _, entry = locked
    for backend, rec in records.items():
        assert rec.ok, f"{backend}: {rec.error}\n{rec.stderr_tail}"
        assert rec.missing_outputs == [] and rec.outputs
        assert not rec.version_override
    podman = records["podman"].command
    assert podman[podman.index("--network") + 1] == "none" and entry.digest in podman
    assert records["podman"].digest == entry.digest


def test_same_files_and_same_voxels(runs):
    _, out = runs
    images = {b: files(out / b, "*.nii*") for b in BACKENDS}
    assert images["podman"].keys() == images["local"].keys()
    assert len(images["local"]) >= 6
    for rel, path in images["local"].items():
        ours, theirs = nib.load(path), nib.load(images["podman"][rel])
        assert np.array_equal(ours.affine, theirs.affine), rel
        assert ours.get_data_dtype() == theirs.get_data_dtype(), rel
        assert np.array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj)), rel


def test_same_measures_within_1e_6(runs):
    _, out = runs
    tables = {b: files(out / b, "*.tsv") for b in BACKENDS}
    assert tables["podman"].keys() == tables["local"].keys() and tables["local"]
    for rel, path in tables["local"].items():
        ours, theirs = pd.read_csv(path, sep="\t"), pd.read_csv(tables["podman"][rel], sep="\t")
        assert list(ours.columns) == list(theirs.columns) and len(ours) == len(theirs) > 0, rel
        numeric = ours.select_dtypes("number").columns
        assert len(numeric) > 0, rel
        np.testing.assert_allclose(ours[numeric].to_numpy(float), theirs[numeric].to_numpy(float),
                                   rtol=0, atol=1e-6, err_msg=rel)


def test_container_outputs_name_the_image_digest(runs, locked):
    _, out = runs
    _, entry = locked
    (desc,) = files(out / "podman", "dataset_description.json").values()
    assert entry.digest in json.dumps(json.loads(desc.read_text())["GeneratedBy"])


def test_real_engine_refuses_an_image_the_lock_does_not_pin(locked, t1, tmp_path):
    lock, entry = locked
    other = tmp_path / "lock"
    write_lock_entry(replace(entry, digest="sha256:" + "0" * 64), other)
    with pytest.raises(DigestMismatch, match=entry.digest):
        run_pipeline(get_spec("anat"), t1, tmp_path / "out", "xa30", "1", backend="podman",
                     lock_path=other)
    assert not (tmp_path / "out").exists()
