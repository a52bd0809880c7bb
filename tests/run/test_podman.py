"""The anat image, really built with podman, computes exactly what the local backend computes.

``make test-containers`` (podman set up by containers/setup_podman.sh): builds the image from
containers/anat/ into a temporary copy of the lock (the committed lock is never rewritten by a
test), runs the anatomical pipeline on one real T1 from ../shared/data in the container and
with the ``local`` backend, and compares: same output files, same voxels, same measures
within 1e-6. Also checks that the real engine's digest is what the build recorded and that a
run against a lock that pins another digest is refused.

Provenance: a rebuild from a clean cache (an empty podman store, no layer cache) gives the same
image ID, and on the same base the committed lock's; the image exported as an OCI archive loads
into an empty store ("another site") as the locked image, twice exported gives the same bytes,
and an archive with one byte changed, or one that loads as another image, is refused.
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
from typer.testing import CliRunner

from pipelines.image_build import (
    SOURCE_DATE_EPOCH,
    ArchiveRefused,
    Reproduction,
    build_image,
    check_reproducible,
    export_archive,
    image_differences,
    load_archive,
    podman_env,
    storage_conf,
)
from pipelines.images import (
    LOCK_PATH,
    REPO,
    containerfile_path,
    read_lock,
    requirements_path,
    sha256_file,
    write_lock_entry,
)
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
    recorded[lock] = read_lock(lock)["anat"]   # as the build left it: the export test adds its archive later
    return lock, entry


recorded: dict[Path, object] = {}   # tests run in random order (pytest-randomly)


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
    assert recorded[lock] == entry
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


# --- provenance: a clean rebuild, export and load -------------------------------------------------

def podman_in(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def rebuilt(locked) -> Reproduction:
    lock, _ = locked
    return check_reproducible(get_spec("anat"), lock)


def test_a_clean_rebuild_gives_the_same_digest(rebuilt, locked):
    lock, entry = locked
    assert rebuilt.locked == entry.digest
    assert rebuilt.rebuilt == entry.digest, "\n".join(rebuilt.differs)
    assert rebuilt.differs == ()
    recorded = read_lock(lock)["anat"]
    assert recorded.reproducible is True and recorded.rebuilt_digest == entry.digest
    assert recorded.digest == entry.digest


def test_on_the_same_base_the_build_gives_the_committed_digest(locked):
    """Another machine (CI's, a site's) builds what containers/lock pins, unless its Debian base differs.

    The base is debootstrap from the Debian mirror: a point release changes packages and so the
    base; then the lock is rebuilt, which this says instead of failing.
    """
    _, entry = locked
    committed = read_lock(LOCK_PATH)["anat"]
    if entry.base != committed.base or entry.engine != committed.engine:
        pytest.skip(f"this machine's base/engine ({entry.base}, {entry.engine}) is not the locked "
                    f"({committed.base}, {committed.engine}): rebuild the lock")
    assert entry.digest == committed.digest
    assert committed.reproducible is True


@pytest.fixture
def other_site(tmp_path):
    """An empty podman image store, as on another site's machine."""
    root = tmp_path / "store"
    root.mkdir()
    env = podman_env(storage_conf=storage_conf(root))
    yield env
    podman_in(env, "rmi", "--all", "--force")


@pytest.fixture(scope="module")
def exported(locked, tmp_path_factory) -> Path:
    lock, _ = locked
    return export_archive("anat", lock, tmp_path_factory.mktemp("export"))


def test_export_then_load_elsewhere_gives_the_locked_image(locked, exported, other_site, tmp_path):
    lock, entry = locked
    assert exported.name == f"anat-{entry.digest.removeprefix('sha256:')[:12]}.oci.tar"
    assert read_lock(lock)["anat"].archive_sha256 == sha256_file(exported)
    # Exported again: the same bytes (podman's own save differs in the archive's mtimes).
    again = export_archive("anat", lock, tmp_path / "again")
    assert sha256_file(again) == sha256_file(exported)
    committed = read_lock(LOCK_PATH)["anat"]
    if committed.digest == entry.digest and committed.archive_sha256:   # the image the lock pins
        assert sha256_file(exported) == committed.archive_sha256
    assert podman_in(other_site, "image", "exists", entry.tagged).returncode == 1
    loaded = load_archive(exported, lock, env=other_site)
    assert loaded.digest == entry.digest
    inspect = podman_in(other_site, "image", "inspect", "--format", "{{.Id}}", entry.tagged)
    assert "sha256:" + inspect.stdout.strip() == entry.digest


def test_a_tampered_archive_is_refused(locked, exported, other_site, tmp_path):
    lock, _ = locked
    bad = tmp_path / exported.name
    shutil.copy(exported, bad)
    with open(bad, "r+b") as fh:        # one byte, inside a layer blob
        fh.seek(bad.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArchiveRefused, match="is not an archive"):
        load_archive(bad, lock, env=other_site)
    assert podman_in(other_site, "images", "--quiet").stdout.strip() == ""   # nothing loaded
    import flows.cli.containers as cli

    result = CliRunner().invoke(cli.app, ["load", str(bad), "--lock", str(lock)])
    assert result.exit_code == 1
    assert "refusing to load" in result.output and str(bad) in result.output.replace("\n", "")
    assert "Traceback" not in result.output


def test_an_archive_that_loads_as_another_image_is_refused(locked, exported, other_site, tmp_path):
    lock, entry = locked
    other = tmp_path / "lock"
    write_lock_entry(replace(read_lock(lock)["anat"], digest="sha256:" + "1" * 64), other)
    with pytest.raises(ArchiveRefused, match=f"loaded as {entry.digest}, not the locked sha256:1111"):
        load_archive(exported, other, env=other_site)
    assert podman_in(other_site, "image", "exists", entry.tagged).returncode == 1


def test_differences_between_two_builds_are_named_and_verify_says_so(locked, tmp_path):
    """Two builds of one Containerfile at different timestamps: image_differences names the config's
    created time and the layer's file mtimes; a lock that records them makes `verify` say so."""
    lock, entry = locked
    env = podman_env()
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Containerfile").write_text(
        f"FROM {entry.base.split('@')[0]}\nRUN echo corelab > /opt/marker\n")
    layouts = []
    for n, stamp in enumerate((SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH + 86400)):
        tag = f"localhost/corelab-difftest:{n}"
        subprocess.run(["podman", "build", "--quiet", "--network", "none", "--pull=never", "--no-cache",
                        "--timestamp", str(stamp), "-t", tag, str(tmp_path / "ctx")],
                       env=env, check=True, capture_output=True)
        layouts.append(tmp_path / f"oci{n}")
        subprocess.run(["podman", "save", "--format", "oci-dir", "-o", str(layouts[-1]), tag],
                       env=env, check=True, capture_output=True)
        subprocess.run(["podman", "rmi", tag], env=env, capture_output=True)
    differs = image_differences(*layouts)
    assert any(d.startswith("config created:") for d in differs), differs
    layer = [d for d in differs if d.startswith("layer ")]
    assert len(layer) == 1 and "echo corelab > /opt/marker" in layer[0] and "files' mtime" in layer[0], differs
    assert "content" not in layer[0], differs

    repo = tmp_path / "repo"
    for folder in ("containers/anat", *get_spec("anat").sources):
        shutil.copytree(REPO / folder, repo / folder)
    write_lock_entry(replace(read_lock(lock)["anat"], reproducible=False,
                             rebuilt_digest="sha256:" + "2" * 64, differs=tuple(differs)),
                     repo / "containers" / "lock")
    import flows.cli.containers as cli

    result = CliRunner().invoke(cli.app, ["verify", "anat", "--no-engine", "--repo", str(repo)])
    assert result.exit_code == 0, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("anat: ok; NOT reproducible: a clean rebuild gave sha256:2222")
    assert "config created" in line and "files' mtime" in line
