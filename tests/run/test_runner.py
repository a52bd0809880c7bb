"""The container runner without a container engine: specs, the lock, refusals, exact commands.

Docker and apptainer cannot run on these machines, so they are replaced at their true
boundary only: a fake ``docker`` / ``podman`` / ``apptainer`` executable on PATH that records
the argv it was given and answers ``image inspect``. Everything above it (lock reading,
digest checks, mounts, provenance) is the real code. The ``local`` backend runs for real.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.image_build import export_sif
from pipelines.images import (
    REPO,
    LockedImage,
    LockError,
    definition_drift,
    installed_mismatches,
    read_lock,
    read_requirements,
    sha256_file,
    source_sha256,
    write_lock_entry,
)
from pipelines.registry import get_spec
from pipelines.spec import BidsQuery, Measure, PipelineSpec, SpecError, Upstream, bids_prefix
from tasks.lake.storage import open_lake
from tasks.run.derivatives import PipelineRun, read_measures
from tasks.run.engines import apptainer_command, oci_command, plan_mounts
from tasks.run.runner import (
    ContainerRunError,
    DigestMismatch,
    EngineMissing,
    ImageMissing,
    StaleLock,
    VersionMismatch,
    environment_hash,
    run_pipeline,
)
from tests.data import shared_path

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
ANAT_REQUIREMENTS = REPO / "containers" / "anat" / "requirements.lock"

# A toy pipeline: copies its input into the output folder (and can fail or stall on demand).
TOY = PipelineSpec(
    name="toy", version="1.0", image="toy",
    command=("python", "-c",
             "import shutil, sys, os, time; time.sleep(float(os.environ.get('TOY_SLEEP', 0)));"
             "os.makedirs(sys.argv[2] + '/sub-' + sys.argv[3], exist_ok=True);"
             "shutil.copy(sys.argv[1], sys.argv[2] + '/sub-' + sys.argv[3] + '/out.nii.gz');"
             "print('toy done'); sys.exit(int(os.environ.get('TOY_EXIT', 0)))",
             "{input}", "{output_dir}", "{subject}"),
    options={"acq": "--acq", "threads": "--threads", "container_digest": "--container-digest"},
    inputs=(BidsQuery("anat", "T1w"),),
    outputs={"image": "sub-{subject}/out.nii.gz"},
    sources=("toysrc",),
)

FAKE_ENGINE = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as fh:
    fh.write(json.dumps([os.path.basename(sys.argv[0])] + args) + "\\n")
if args[:1] == ["--version"]:
    print("fake-engine 1.0"); sys.exit(0)
if args[:1] == ["save"]:
    open(args[args.index("-o") + 1], "w").write("image archive")
if args[:1] == ["build"]:
    open(args[2], "w").write("SIF built from " + args[3])
if args[:2] == ["image", "inspect"]:
    if not os.environ.get("FAKE_ID"):
        print("Error: no such image", file=sys.stderr); sys.exit(125)
    print(os.environ["FAKE_ID"]); sys.exit(0)
if "run" in args or "exec" in args:
    for i, a in enumerate(args):
        spec = a if a.startswith("type=bind") else args[i + 1] if a == "--bind" else ""
        if "/data/out" in spec:
            src = spec.split("source=")[1].split(",")[0] if "source=" in spec else spec.split(":")[0]
            os.makedirs(src + "/sub-01", exist_ok=True)
            open(src + "/sub-01/out.nii.gz", "w").write("fake")
    print("pipeline ran"); sys.exit(int(os.environ.get("FAKE_EXIT", 0)))
sys.exit(0)
"""


@pytest.fixture(scope="module")
def t1() -> Path:
    return shared_path("niivue-images", "chris_t1.nii.gz")


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    """A repo-like tree for the toy image: definitions, sources, lock, fake engines on PATH."""
    repo = tmp_path / "repo"
    containers = repo / "containers"
    (containers / "toy").mkdir(parents=True)
    (containers / "toy" / "Containerfile").write_text("FROM scratch\n")
    shutil.copy(ANAT_REQUIREMENTS, containers / "toy" / "requirements.lock")
    (repo / "toysrc").mkdir()
    (repo / "toysrc" / "main.py").write_text("print('toy')\n")
    entry = LockedImage(
        key="toy", name="localhost/corelab-toy", tag="1.0", digest=DIGEST, pipeline_version="1.0",
        containerfile_sha256=sha256_file(containers / "toy" / "Containerfile"),
        requirements_sha256=sha256_file(containers / "toy" / "requirements.lock"),
        source_sha256=source_sha256(("toysrc",), repo), python="3.11.2",
        base="localhost/corelab-base:bookworm@" + OTHER, engine="fake", built_at="2026-01-01T00:00:00+00:00")
    lock = containers / "lock"
    write_lock_entry(entry, lock)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("docker", "podman", "apptainer"):
        exe = bin_dir / name
        exe.write_text(FAKE_ENGINE.format(python=sys.executable))
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "engine.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_ID", DIGEST.removeprefix("sha256:"))
    monkeypatch.chdir(repo)
    kw = dict(lock_path=lock, containers=containers, sif_dir=tmp_path / "sif")
    return {"repo": repo, "containers": containers, "entry": entry, "lock": lock, "log": log,
            "kw": kw, "out": tmp_path / "out"}


def toy_run(setup: dict, t1: Path, backend: str, **kwargs):
    return run_pipeline(TOY, t1, setup["out"], "01", "V1", backend=backend, **setup["kw"], **kwargs)


def engine_calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def runs(log: Path) -> list[list[str]]:
    return [c for c in engine_calls(log) if "run" in c or "exec" in c]


# --- specs -----------------------------------------------------------------------------------

def test_render_fills_fields_and_only_given_options():
    argv = TOY.render("/in/t1.nii.gz", "/out", "01", "V1", threads=2, acq=None)
    assert argv[-5:] == ["/in/t1.nii.gz", "/out", "01", "--threads", "2"]
    assert "--acq" not in argv


@pytest.mark.parametrize("subject", ["sub-01", "01/../x", "", "0 1"])
def test_render_refuses_labels_that_are_not_bids(subject):
    with pytest.raises(SpecError, match="subject"):
        TOY.render("/in", "/out", subject, "V1")


def test_render_refuses_unknown_options():
    with pytest.raises(SpecError, match="run"):
        TOY.render("/in", "/out", "01", "V1", run=2)


def test_bids_prefix_orders_entities_and_checks_run_index():
    assert bids_prefix("01", "V1", {"run": "02", "acq": "mprage"}) == "sub-01_ses-V1_acq-mprage_run-2"
    with pytest.raises(SpecError, match="run"):
        bids_prefix("01", "V1", {"run": "2a"})
    with pytest.raises(SpecError, match="colour"):
        bids_prefix("01", "V1", {"colour": "red"})          # not a BIDS entity at all
    # echo is a BIDS entity, but not one the anat pipeline (or the toy) takes from its input
    assert bids_prefix("01", "V1", {"echo": "1"}) == "sub-01_ses-V1_echo-1"
    assert get_spec("anat").entities == ("acq", "run") and TOY.entities == ("acq",)
    with pytest.raises(SpecError, match="echo"):
        get_spec("anat").render("/in", "/out", "01", "V1", echo="1")


def test_bids_query_matches_datatype_and_suffix():
    q = BidsQuery("anat", "T1w")
    assert q.matches("sub-01/ses-V1/anat/sub-01_ses-V1_acq-tfl_T1w.nii.gz")
    assert q.matches("sub-01/anat/sub-01_T1w.nii")
    assert not q.matches("sub-01/ses-V1/anat/sub-01_ses-V1_T2w.nii.gz")
    assert not q.matches("sub-01/ses-V1/func/sub-01_ses-V1_T1w.nii.gz")
    assert not q.matches("sub-01/ses-V1/anat/sub-01_ses-V1_T1w.json")


# --- lock and definitions ----------------------------------------------------------------------

def test_lock_round_trip_and_errors(setup, tmp_path):
    assert read_lock(setup["lock"]) == {"toy": setup["entry"]}
    assert read_lock(tmp_path / "absent") == {}
    text = setup["lock"].read_text()
    bad = tmp_path / "bad"
    bad.write_text(text.replace(DIGEST, "sha256:1234"))
    with pytest.raises(LockError, match="digest"):
        read_lock(bad)
    bad.write_text(text.replace('tag = "1.0"', 'tag = "1.0"\ncolour = "blue"'))
    with pytest.raises(LockError, match="colour"):
        read_lock(bad)


def test_definition_drift_names_what_changed(setup):
    entry, containers, repo = setup["entry"], setup["containers"], setup["repo"]
    assert definition_drift(entry, ("toysrc",), containers, repo) == []
    (containers / "toy" / "Containerfile").write_text("FROM scratch\nRUN true\n")
    (repo / "toysrc" / "new.py").write_text("")
    drift = definition_drift(entry, ("toysrc",), containers, repo)
    assert len(drift) == 2
    assert "Containerfile" in drift[0] and "toysrc" in drift[1]


def test_image_requirements_are_the_repository_pins_and_installed_here():
    """What lets the local backend run in the repo's .venv: same versions as the image."""
    image = read_requirements(ANAT_REQUIREMENTS)
    repo = read_requirements(REPO / "requirements.lock")
    assert {"numpy", "simpleitk", "nibabel", "nilearn", "scipy"} <= set(image)
    assert {name: repo.get(name) for name in image} == image
    assert installed_mismatches(image) == []
    assert all(line.strip().startswith("--hash=sha256:") for line in
               ANAT_REQUIREMENTS.read_text().splitlines() if line.startswith(" "))


# --- command lines ----------------------------------------------------------------------------

def test_oci_and_apptainer_commands_mount_input_read_only_and_cut_the_network(t1, tmp_path):
    mounts, inside_in, inside_out, _ = plan_mounts(t1, tmp_path)
    argv = ["python", "-m", "x", inside_in, inside_out]
    cmd = oci_command("docker", DIGEST, mounts, argv, name="n", user="1000:1000", env={"A": "1"})
    assert cmd == ["docker", "run", "--rm", "--name", "n", "--pull", "never", "--network", "none",
                   "--read-only", "--tmpfs", "/tmp", "--user", "1000:1000", "--workdir", "/tmp",
                   "--security-opt", "no-new-privileges",
                   "--mount", f"type=bind,source={t1.resolve()},target=/data/in/{t1.name},readonly",
                   "--mount", f"type=bind,source={tmp_path.resolve()},target=/data/out",
                   "--env", "A=1", DIGEST, *argv]
    cmd = apptainer_command(tmp_path / "x.sif", mounts, argv, env={"A": "1"})
    assert cmd == ["apptainer", "exec", "--containall", "--cleanenv", "--no-home", "--net",
                   "--network", "none", "--pwd", "/tmp",
                   "--bind", f"{t1.resolve()}:/data/in/{t1.name}:ro",
                   "--bind", f"{tmp_path.resolve()}:/data/out:rw", "--env", "A=1",
                   str(tmp_path / "x.sif"), *argv]


def test_paths_engines_cannot_mount_are_refused(t1, tmp_path):
    with pytest.raises(ContainerRunError, match="':'"):
        plan_mounts(t1, tmp_path / "a:b")


# --- runs through fake engines -----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["docker", "podman"])
def test_oci_run_checks_digest_then_runs_the_locked_id(setup, t1, backend):
    rec = toy_run(setup, t1, backend, threads=2)
    (ran,) = runs(setup["log"])
    assert rec.ok and rec.exit_code == 0 and rec.command == ran
    assert ran[ran.index("--network") + 1] == "none"
    # Started by the locked ID, and the pipeline is told the digest it runs in.
    assert ran[ran.index(DIGEST) + 1:][:2] == ["python", "-c"]
    assert ran[-2:] == ["--container-digest", DIGEST]
    assert ["--threads", "2"] == ran[-4:-2]
    if backend == "podman":
        assert ran[1:3] == ["--runtime", "runc"]
    inspect = [c for c in engine_calls(setup["log"]) if c[1:3] == ["image", "inspect"]]
    assert inspect[0][-1] == "localhost/corelab-toy:1.0"
    assert rec.digest == DIGEST and rec.image == f"localhost/corelab-toy@{DIGEST}"
    assert rec.inputs == {str(t1.resolve()): sha256_file(t1)}
    assert rec.outputs == {"sub-01/out.nii.gz": sha256_file(setup["out"] / "sub-01/out.nii.gz")}
    assert rec.versions["engine"] == "fake-engine 1.0" and rec.versions["numpy"] == "1.26.4"
    assert "pipeline ran" in rec.stdout_tail and not rec.version_override


def test_oci_run_refused_when_the_image_is_not_the_locked_one(setup, t1, monkeypatch):
    monkeypatch.setenv("FAKE_ID", OTHER.removeprefix("sha256:"))
    with pytest.raises(DigestMismatch, match=OTHER):
        toy_run(setup, t1, "docker")
    assert not setup["out"].exists()
    monkeypatch.setenv("FAKE_ID", "")
    with pytest.raises(ImageMissing, match="corelab containers build toy"):
        toy_run(setup, t1, "podman")
    assert runs(setup["log"]) == []


def test_container_run_refused_when_the_definition_changed(setup, t1):
    (setup["containers"] / "toy" / "requirements.lock").write_text("numpy==1.26.4\n")
    with pytest.raises(StaleLock, match="requirements lock"):
        toy_run(setup, t1, "docker")
    assert runs(setup["log"]) == []


def test_run_refused_when_the_lock_was_built_for_another_pipeline_version(setup, t1):
    with pytest.raises(StaleLock, match="1.0"):
        run_pipeline(replace(TOY, version="2.0"), t1, setup["out"], "01", "V1", backend="docker",
                     **setup["kw"])
    with pytest.raises(ImageMissing, match="not in"):
        run_pipeline(replace(TOY, image="other"), t1, setup["out"], "01", "V1", backend="docker",
                     **setup["kw"])


def test_apptainer_runs_only_the_locked_sif(setup, t1, tmp_path):
    with pytest.raises(ImageMissing, match="no SIF"):
        toy_run(setup, t1, "apptainer")
    sif = export_sif("toy", setup["lock"], tmp_path / "sif")
    assert sif.name == "toy-abababababab.sif" and not list(sif.parent.glob("*.tar"))
    assert read_lock(setup["lock"])["toy"].sif_sha256 == sha256_file(sif)
    save, build = [c for c in engine_calls(setup["log"]) if c[1] in ("save", "build")]
    assert save[-1] == DIGEST.removeprefix("sha256:") and build[-1].startswith("docker-archive://")
    rec = toy_run(setup, t1, "apptainer")
    (ran,) = runs(setup["log"])
    assert rec.ok and rec.command == ran and ran[ran.index(str(sif)) + 1] == "python"
    assert f"{t1.resolve()}:/data/in/{t1.name}:ro" in ran
    sif.write_bytes(b"another image")
    with pytest.raises(DigestMismatch, match="sha256"):
        toy_run(setup, t1, "apptainer")


def test_failed_pipeline_is_a_record_not_an_exception(setup, t1, monkeypatch):
    monkeypatch.setenv("FAKE_EXIT", "3")
    rec = toy_run(setup, t1, "docker")
    assert not rec.ok and rec.exit_code == 3 and "status 3" in rec.error
    assert rec.to_dict()["command_line"].startswith("docker run --rm")


def test_missing_engine_is_named(setup, t1, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EngineMissing, match="docker is not on PATH"):
        toy_run(setup, t1, "docker")
    with pytest.raises(ContainerRunError, match="unknown backend"):
        toy_run(setup, t1, "singularity")


# --- local backend -----------------------------------------------------------------------------

def test_local_runs_when_the_environment_equals_the_image(setup, t1):
    rec = run_pipeline(TOY, t1, setup["out"], "01", "V1", backend="local", **setup["kw"])
    assert rec.ok and rec.command[0] == sys.executable
    # no image ran: the record and the outputs name no image digest, the environment instead
    assert "--container-digest" not in rec.command and rec.digest == ""
    assert rec.environment_sha256 == environment_hash(rec.versions)
    assert "python" in rec.versions and rec.versions["numpy"] == "1.26.4"
    assert not rec.version_override and rec.version_mismatches == []
    assert rec.outputs["sub-01/out.nii.gz"] == sha256_file(t1)
    assert runs(setup["log"]) == []


def test_local_refused_on_version_mismatch_unless_overridden(setup, t1):
    req = setup["containers"] / "toy" / "requirements.lock"
    req.write_text(req.read_text().replace("numpy==1.26.4", "numpy==1.25.0"))
    write_lock_entry(replace(setup["entry"], requirements_sha256=sha256_file(req)), setup["lock"])
    with pytest.raises(VersionMismatch, match="numpy: image has 1.25.0, installed 1.26.4"):
        toy_run(setup, t1, "local")
    assert not (setup["out"] / "sub-01").exists()
    rec = toy_run(setup, t1, "local", allow_version_mismatch=True)
    assert rec.ok and rec.version_override and "--container-digest" not in rec.command
    assert rec.version_mismatches == ["numpy: image has 1.25.0, installed 1.26.4"]
    assert rec.to_dict()["version_override"] is True


def test_local_refused_when_the_pipeline_code_differs_from_the_image(setup, t1):
    (setup["repo"] / "toysrc" / "main.py").write_text("print('changed')\n")
    with pytest.raises(VersionMismatch, match="toysrc changed"):
        toy_run(setup, t1, "local")


def test_local_failure_and_timeout_are_recorded(setup, t1, monkeypatch):
    monkeypatch.setenv("TOY_EXIT", "4")
    rec = toy_run(setup, t1, "local")
    assert not rec.ok and rec.exit_code == 4 and "toy done" in rec.stdout_tail
    monkeypatch.setenv("TOY_EXIT", "0")
    monkeypatch.setenv("TOY_SLEEP", "30")
    rec = run_pipeline(TOY, t1, setup["out"] / "t", "01", "V1", backend="local", timeout_s=1,
                       **setup["kw"])
    assert not rec.ok and rec.exit_code is None and "timed out" in rec.error
    assert rec.missing_outputs == ["sub-01/out.nii.gz"] and rec.duration_s < 20


# --- the CLI and the committed lock --------------------------------------------------------------

def test_cli_verify_reports_drift(setup, monkeypatch):
    import flows.cli.containers as cli

    monkeypatch.setattr(cli, "spec_for_image", lambda key: TOY)
    args = ["verify", "--no-engine", "--repo", str(setup["repo"])]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "toy: ok"
    (setup["repo"] / "toysrc" / "main.py").write_text("print('changed')\n")
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 1 and "toysrc changed" in result.output


def test_committed_lock_describes_the_current_anat_definition():
    """Fails when containers/anat/ or pipelines/anat/ changed without a rebuild.

    Fix: ``corelab containers build anat`` (podman; see containers/README.md), then commit
    containers/lock. The local backend would refuse the stale lock anyway; this says so early.
    """
    spec = get_spec("anat")
    entry = read_lock(REPO / "containers" / "lock")["anat"]
    assert entry.pipeline_version == spec.version
    assert definition_drift(entry, spec.sources) == []


def test_an_engine_that_fails_to_answer_is_transient_and_never_a_verdict(setup, t1, monkeypatch, tmp_path, trial):
    """podman or docker failing on its own (exit 125, a storage or daemon error) is not the pipeline's
    failure: run_on_image raises it for Prefect to retry, and writes no verdict or provenance."""
    from tasks.errors import is_transient
    from tasks.lake.storage import Lake
    from tasks.run.derivatives import run_on_image
    from tasks.run.engines import EngineUnavailable

    spec = replace(TOY, definitions=setup["containers"])
    lake = Lake(str(tmp_path / "lake")).init()
    rel = "bids/sub-01/ses-V1/anat/sub-01_ses-V1_T1w.nii.gz"
    lake.write_bytes(rel, t1.read_bytes())
    monkeypatch.setenv("FAKE_EXIT", "125")
    with pytest.raises(EngineUnavailable, match="exit 125") as err:
        run_on_image(lake, spec, rel, "01", "V1", "2.25.7", "docker")
    assert is_transient(err.value)
    assert not [p for p in lake.find("derivatives") if p.endswith("_provenance.json")]   # no record of a run
    monkeypatch.setenv("FAKE_EXIT", "3")                 # the pipeline's own failure stays a record
    run = run_on_image(lake, spec, rel, "01", "V1", "2.25.7", "docker")
    assert run.error_code == "pipeline_failed" and "status 3" in run.error


def test_image_inspect_failing_for_another_reason_than_a_missing_image_is_transient(setup, t1, monkeypatch):
    engine = setup["repo"].parent / "bin" / "docker"
    engine.write_text(engine.read_text().replace(
        'print("Error: no such image", file=sys.stderr); sys.exit(125)',
        'print("Error: database is locked", file=sys.stderr); sys.exit(125)'))
    monkeypatch.setenv("FAKE_ID", "")
    from tasks.run.engines import EngineUnavailable

    with pytest.raises(EngineUnavailable, match="database is locked"):
        toy_run(setup, t1, "docker")
    with pytest.raises(ImageMissing):
        toy_run(setup, t1, "podman")                     # its fake still says: no such image


def test_a_dwi_goes_in_with_its_gradient_table_and_sidecar_read_only(tmp_path):
    folder = tmp_path / "raw" / "sub-01" / "ses-1" / "dwi"
    folder.mkdir(parents=True)
    for ext in (".nii.gz", ".bval", ".bvec", ".json"):
        (folder / f"sub-01_ses-1_dwi{ext}").write_text("x")
    (folder / "sub-01_ses-1_dwi2.bval").write_text("another image's")
    (folder / "sub-01_ses-1_dwi.tsv").write_text("not a BIDS companion")
    mounts, inside_in, _, _ = plan_mounts(folder / "sub-01_ses-1_dwi.nii.gz", tmp_path / "out")
    assert inside_in == "/data/in/sub-01_ses-1_dwi.nii.gz"
    assert [(m.target, m.read_only) for m in mounts] == [
        ("/data/in/sub-01_ses-1_dwi.nii.gz", True), ("/data/in/sub-01_ses-1_dwi.bval", True),
        ("/data/in/sub-01_ses-1_dwi.bvec", True), ("/data/in/sub-01_ses-1_dwi.json", True), ("/data/out", False)]


# --- another pipeline's outputs as inputs (the dwi pipeline's T1) ------------------------------

UPSTREAM_TOY = replace(TOY, upstream=(Upstream("t1w", "anat", "preproc", "--t1w"),))


@pytest.mark.parametrize("backend", ["podman", "local"])
def test_an_upstream_file_goes_in_read_only_beside_the_input_and_is_hashed(setup, t1, tmp_path, backend):
    other = tmp_path / "deriv" / "sub-01_desc-preproc_T1w.nii.gz"
    other.parent.mkdir()
    other.write_bytes(b"the anat run's T1")
    rec = run_pipeline(UPSTREAM_TOY, t1, setup["out"], "01", "V1", backend=backend, upstream={"t1w": other},
                       **setup["kw"])
    assert rec.ok, rec.error
    assert rec.inputs == {str(t1.resolve()): sha256_file(t1), str(other.resolve()): sha256_file(other)}
    if backend == "podman":
        (ran,) = runs(setup["log"])
        inside = f"/data/in/t1w-{other.name}"
        assert f"type=bind,source={other.resolve()},target={inside},readonly" in ran
        assert ran[ran.index("--t1w") + 1] == inside
    else:
        assert rec.command[rec.command.index("--t1w") + 1] == str(other.resolve())


def test_an_upstream_file_that_is_not_there_or_not_declared_is_refused(setup, t1, tmp_path):
    with pytest.raises(ContainerRunError, match="does not exist"):
        run_pipeline(UPSTREAM_TOY, t1, setup["out"], "01", "V1", backend="local",
                     upstream={"t1w": tmp_path / "absent.nii.gz"}, **setup["kw"])
    with pytest.raises(SpecError, match="upstream"):
        TOY.render("/in", "/out", "01", "V1", {"t1w": "/x"})
    with pytest.raises(SpecError, match="upstream keys"):
        replace(TOY, upstream=(Upstream("acq", "anat", "preproc", "--t"),))


def test_optional_measures_may_be_absent_but_never_undeclared_or_in_another_unit(tmp_path):
    spec = replace(TOY, outputs={"measures": "m.tsv"}, measures=(
        Measure("FA_WM", "1"), Measure("FA_T1WM", "1", optional=True)))
    lake = open_lake(str(tmp_path / "lake"))

    def read(rows: str) -> PipelineRun:
        lake.write_text("m.tsv", "measure\tvalue\tunit\n" + rows)
        run = PipelineRun("uid", "bids/x", "sha", "toy", "1.0", outputs={"measures": "m.tsv"})
        read_measures(lake, spec, run)
        return run

    assert read("FA_WM\t0.4\t1\n").error is None
    assert read("FA_WM\t0.4\t1\nFA_T1WM\t0.42\t1\n").error is None
    assert "FA_WM [absent" in read("FA_T1WM\t0.42\t1\n").error
    assert "FA_T1WM [um2/ms" in read("FA_WM\t0.4\t1\nFA_T1WM\t0.42\tum2/ms\n").error
    assert "RD [1, declared nothing]" in read("FA_WM\t0.4\t1\nRD\t0.4\t1\n").error
