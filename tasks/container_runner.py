"""Run a pipeline in its pinned image (podman, docker, apptainer) or locally, with provenance.

Rules (see ../shared/DESIGN.md, "Pinned containers"):

- The image is the one in ``containers/lock``. Before a container run the runner asks the
  engine for the ID of the image tagged ``name:version`` and refuses (:class:`DigestMismatch`)
  when it is not the locked digest, or (:class:`ImageMissing`) when there is none; it then
  starts the image *by that ID*, so what runs is what was checked. Apptainer runs a SIF file,
  checked by its sha256 (``sif_sha256`` in the lock). A definition changed since the build
  (Containerfile, requirements lock) is refused as a stale lock (:class:`StaleLock`).
- ``local`` runs the same entrypoint with this interpreter. It is allowed only when the
  installed versions of every package in the image's requirements lock equal the lock's, the
  Python minor version and the pipeline's source code equal the image's; otherwise
  :class:`VersionMismatch`, unless ``allow_version_mismatch=True``, in which case the override
  and every mismatch are written into the provenance record.
- Containers run with ``--network none``, a read-only root file system, the input file
  bind-mounted read-only and the output folder read-write, as the calling user.
- Every run returns a :class:`RunRecord` (backend, image, digest, exact command, times, exit
  code, output tails, versions, override), and the exact command is logged before it runs.
  A pipeline that fails is not an exception: the record says so (``ok`` is False).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipelines.image_build import PODMAN_CONF, podman_env
from pipelines.images import (CONTAINERS, LOCK_PATH, REPO, LockedImage, definition_drift,
                              installed_mismatches, locked_image, python_mismatch,
                              read_requirements, requirements_path, sha256_file)
from pipelines.spec import PipelineSpec

log = logging.getLogger("corelab.container_runner")
BACKENDS = ("podman", "docker", "apptainer", "local")
IN_DIR, OUT_DIR = "/data/in", "/data/out"
TAIL = 4000
# Set inside containers and for local runs alike, so both compute the same way.
RUN_ENV = {"HOME": "/tmp", "MPLBACKEND": "Agg", "NIPYPE_NO_ET": "1", "PYTHONUNBUFFERED": "1"}
SIF_DIR = CONTAINERS / ".cache" / "sif"


class ContainerRunError(RuntimeError):
    """A pipeline run could not be attempted."""


class RunRefused(ContainerRunError):
    """The run was refused before starting; ``reasons`` lists why."""

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons = reasons or [message]


class ImageMissing(RunRefused):
    """The locked image is not in the engine's storage (or the SIF file is absent)."""


class DigestMismatch(RunRefused):
    """The engine's image is not the one whose digest is locked."""


class StaleLock(RunRefused):
    """The image definition changed after the locked image was built."""


class VersionMismatch(RunRefused):
    """``local`` backend: the installed environment differs from the image's lock."""


class EngineMissing(ContainerRunError):
    """The backend's executable is not on PATH."""


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool


@dataclass
class RunRecord:
    """Provenance of one run: JSON-ready through :meth:`to_dict`."""

    run_id: str
    pipeline: str
    pipeline_version: str
    backend: str
    image: str
    digest: str
    command: list[str]
    started_at: str
    finished_at: str = ""
    duration_s: float = 0.0
    exit_code: int | None = None
    ok: bool = False
    error: str = ""
    stdout_tail: str = ""
    stderr_tail: str = ""
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    missing_outputs: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    version_override: bool = False
    version_mismatches: list[str] = field(default_factory=list)
    host: str = field(default_factory=platform.node)

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)

    def to_dict(self) -> dict:
        return asdict(self) | {"command_line": self.command_line}


def check_mount_path(path: Path) -> None:
    """Engines split mount specs on ',' (--mount) and ':' (-v, apptainer --bind)."""
    text = str(path)
    if any(c in text for c in ",:\n"):
        raise ContainerRunError(f"cannot bind-mount {text!r}: the path contains ',', ':' or a "
                                "newline; move or rename it")


def plan_mounts(input_path: Path, output_dir: Path) -> tuple[list[Mount], str, str]:
    """Mounts for one input file and one output folder, and their paths inside the container."""
    input_path, output_dir = input_path.resolve(), output_dir.resolve()
    for path in (input_path, output_dir):
        check_mount_path(path)
    inside = f"{IN_DIR}/{input_path.name}"
    return ([Mount(input_path, inside, True), Mount(output_dir, OUT_DIR, False)], inside, OUT_DIR)


def oci_command(engine: str, image_id: str, mounts: list[Mount], argv: list[str], *,
                name: str, user: str, env: Mapping[str, str], runtime: str | None = None) -> list[str]:
    """``podman run`` / ``docker run`` of ``argv`` in the image with ID ``image_id``."""
    cmd = [engine]
    if runtime:
        cmd += ["--runtime", runtime]
    cmd += ["run", "--rm", "--name", name, "--pull", "never", "--network", "none", "--read-only",
            "--tmpfs", "/tmp", "--user", user, "--workdir", "/tmp",
            "--security-opt", "no-new-privileges"]
    for m in mounts:
        cmd += ["--mount", f"type=bind,source={m.source},target={m.target}"
                           + (",readonly" if m.read_only else "")]
    for key, value in sorted(env.items()):
        cmd += ["--env", f"{key}={value}"]
    return cmd + [image_id, *argv]


def apptainer_command(sif: Path, mounts: list[Mount], argv: list[str], *,
                      env: Mapping[str, str]) -> list[str]:
    """``apptainer exec`` of ``argv`` in ``sif``: no host env, home or network."""
    cmd = ["apptainer", "exec", "--containall", "--cleanenv", "--no-home", "--net",
           "--network", "none", "--pwd", "/tmp"]
    for m in mounts:
        cmd += ["--bind", f"{m.source}:{m.target}:{'ro' if m.read_only else 'rw'}"]
    for key, value in sorted(env.items()):
        cmd += ["--env", f"{key}={value}"]
    return cmd + [str(sif), *argv]


def engine_env(backend: str) -> dict[str, str]:
    return podman_env(PODMAN_CONF) if backend == "podman" else dict(os.environ)


def require_engine(backend: str) -> str:
    exe = shutil.which(backend)
    if exe is None:
        hint = "containers/setup_podman.sh installs podman" if backend == "podman" else \
            f"install {backend} or choose another backend ({', '.join(BACKENDS)})"
        raise EngineMissing(f"backend {backend!r}: {backend} is not on PATH; {hint}")
    return exe


def engine_version(backend: str) -> str:
    proc = subprocess.run([backend, "--version"], capture_output=True, text=True,
                          env=engine_env(backend))
    return proc.stdout.strip() or proc.stderr.strip()


def verify_oci_image(backend: str, entry: LockedImage) -> str:
    """The ID of the image tagged ``entry.tagged``; refuse unless it is the locked digest."""
    proc = subprocess.run([backend, "image", "inspect", "--format", "{{.Id}}", entry.tagged],
                          capture_output=True, text=True, env=engine_env(backend))
    if proc.returncode != 0:
        raise ImageMissing(f"{backend} has no image {entry.tagged} (locked as {entry.reference}); "
                           f"build it with `corelab containers build {entry.key}` or load the "
                           f"locked image. {backend} said: {proc.stderr.strip()[:300]}")
    actual = "sha256:" + proc.stdout.strip().removeprefix("sha256:")
    if actual != entry.digest:
        raise DigestMismatch(
            f"{backend} image {entry.tagged} is {actual}, but containers/lock pins {entry.digest}: "
            "refusing to run an unpinned image. Rebuild and re-lock it "
            f"(`corelab containers build {entry.key}`) or restore the locked image.")
    return actual


def sif_path(entry: LockedImage, sif_dir: Path = SIF_DIR) -> Path:
    return sif_dir / f"{entry.key}-{entry.digest.removeprefix('sha256:')[:12]}.sif"


def verify_sif(entry: LockedImage, sif: Path) -> None:
    if not entry.sif_sha256:
        raise ImageMissing(f"containers/lock has no SIF for image {entry.key!r}: convert the locked "
                           "image to SIF and record its sha256 as sif_sha256")
    if not sif.is_file():
        raise ImageMissing(f"SIF file {sif} for image {entry.reference} does not exist")
    actual = sha256_file(sif)
    if actual != entry.sif_sha256:
        raise DigestMismatch(f"SIF {sif} has sha256 {actual}, containers/lock pins "
                             f"{entry.sif_sha256}: refusing to run an unpinned image")


def local_mismatches(spec: PipelineSpec, entry: LockedImage,
                     containers: Path = CONTAINERS, repo: Path = REPO) -> list[str]:
    """Every way this environment differs from the image (empty: ``local`` is equivalent)."""
    out = definition_drift(entry, spec.sources, containers, repo)
    requirements = requirements_path(entry.key, containers)
    if requirements.is_file():
        out += installed_mismatches(read_requirements(requirements))
    py = python_mismatch(entry.python)
    return out + ([py] if py else [])


def thread_env(threads: int | None) -> dict[str, str]:
    """Thread counts pinned the same way for every backend (results can depend on them)."""
    if threads is None:
        return {}
    n = str(int(threads))
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
            "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": n}


@dataclass(frozen=True)
class Plan:
    """What is about to run: the command, its environment, and what the record will say."""

    command: list[str]
    env: dict[str, str]
    digest: str
    versions: dict[str, str]
    mismatches: list[str] = field(default_factory=list)
    cwd: str | None = None


def plan_container(backend: str, spec: PipelineSpec, entry: LockedImage, input_path: Path,
                   output_dir: Path, subject: str, session: str, options: dict,
                   containers: Path = CONTAINERS, sif_dir: Path = SIF_DIR) -> Plan:
    """Check the pinned image and build the container command (raises RunRefused)."""
    require_engine(backend)
    drift = definition_drift(entry, (), containers)
    if drift:
        raise StaleLock(f"containers/lock is stale for image {entry.key!r}: {'; '.join(drift)}. "
                        f"Rebuild with `corelab containers build {entry.key}`.", drift)
    mounts, inside_input, inside_output = plan_mounts(input_path, output_dir)
    argv = spec.render(inside_input, inside_output, subject, session,
                       container_digest=entry.digest, **options)
    env = RUN_ENV | thread_env(options.get("threads"))
    if backend == "apptainer":
        sif = sif_path(entry, sif_dir)
        verify_sif(entry, sif)
        command = apptainer_command(sif, mounts, argv, env=env)
    else:
        verify_oci_image(backend, entry)
        name = f"corelab-{spec.name}-{uuid.uuid4().hex[:12]}"
        command = oci_command(backend, entry.digest, mounts, argv, name=name,
                              user=f"{os.getuid()}:{os.getgid()}", env=env,
                              runtime="runc" if backend == "podman" else None)
    versions = {"engine": engine_version(backend), "python": entry.python}
    versions |= read_requirements(requirements_path(entry.key, containers))
    return Plan(command, engine_env(backend), entry.digest, versions)


def plan_local(spec: PipelineSpec, entry: LockedImage, input_path: Path, output_dir: Path,
               subject: str, session: str, options: dict, allow_version_mismatch: bool,
               containers: Path = CONTAINERS, repo: Path = REPO) -> Plan:
    """Check this environment against the image's lock and build the local command."""
    mismatches = local_mismatches(spec, entry, containers, repo)
    if mismatches and not allow_version_mismatch:
        raise VersionMismatch(
            f"local backend refused for {spec.name} {spec.version}: this environment differs from "
            f"image {entry.reference}: {'; '.join(mismatches)}. Run in the container, align the "
            "environment (make setup), or pass allow_version_mismatch=True (recorded).", mismatches)
    argv = spec.render(str(input_path.resolve()), str(output_dir.resolve()), subject, session,
                       **options)
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    env = dict(os.environ) | {k: v for k, v in RUN_ENV.items() if k != "HOME"}
    env |= thread_env(options.get("threads"))
    pins = read_requirements(requirements_path(entry.key, containers))
    versions = {"python": platform.python_version()} | {name: _installed(name) for name in pins}
    return Plan(argv, env, entry.digest, versions, mismatches, cwd=tempfile.gettempdir())


def _installed(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def execute(record: RunRecord, plan: Plan, backend: str, timeout_s: float | None) -> RunRecord:
    """Run the planned command, logging it first, and fill in the record's outcome."""
    log.info("running %s %s on %s: %s", record.pipeline, record.pipeline_version, backend,
             record.command_line)
    started = datetime.now(timezone.utc)
    record.started_at = started.isoformat()
    try:
        proc = subprocess.run(plan.command, env=plan.env, cwd=plan.cwd, capture_output=True,
                              text=True, timeout=timeout_s)
        record.exit_code, out, err = proc.returncode, proc.stdout, proc.stderr
        if proc.returncode != 0:
            last = (err.strip().splitlines() or ["(no stderr)"])[-1]
            record.error = f"pipeline exited with status {proc.returncode}: {last}"
    except subprocess.TimeoutExpired as exc:
        _kill(backend, plan.command)
        out, err = _text(exc.stdout), _text(exc.stderr)
        record.error = f"timed out after {timeout_s} s; the container was removed"
    finished = datetime.now(timezone.utc)
    record.finished_at = finished.isoformat()
    record.duration_s = round((finished - started).total_seconds(), 3)
    record.stdout_tail, record.stderr_tail = out[-TAIL:], err[-TAIL:]
    return record


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def _kill(backend: str, command: list[str]) -> None:
    if backend in ("podman", "docker") and "--name" in command:
        name = command[command.index("--name") + 1]
        subprocess.run([backend, "rm", "-f", name], capture_output=True, env=engine_env(backend))


def check_outputs(record: RunRecord, spec: PipelineSpec, output_dir: Path, subject: str,
                  session: str, entities: Mapping[str, str] | None) -> RunRecord:
    """Hash the promised outputs; a missing one makes the run not ok."""
    for rel in spec.expected_outputs(subject, session, entities):
        path = output_dir / rel
        if path.is_file():
            record.outputs[rel] = sha256_file(path)
        else:
            record.missing_outputs.append(rel)
    if record.exit_code == 0 and record.missing_outputs:
        record.error = f"pipeline exited 0 but left no {', '.join(record.missing_outputs)}"
    record.ok = record.exit_code == 0 and not record.missing_outputs
    return record
