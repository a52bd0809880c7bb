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
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipelines.images import (
    CONTAINERS,
    REPO,
    LockedImage,
    LockError,
    definition_drift,
    installed_mismatches,
    locked_image,
    python_mismatch,
    read_requirements,
    requirements_path,
    sha256_file,
)
from pipelines.spec import PipelineSpec
from tasks.lake.versions import installed_version
from tasks.run.engines import (
    ENGINES,
    SIF_DIR,
    ContainerRunError,
    DigestMismatch,
    EngineMissing,
    ImageMissing,
    RunRefused,
    StaleLock,
    VersionMismatch,
    apptainer_command,
    engine_env,
    engine_version,
    oci_command,
    plan_mounts,
    remove_container,
    require_engine,
    sif_path,
    verify_oci_image,
    verify_sif,
)

__all__ = ["BACKENDS", "ContainerRunError", "DigestMismatch", "EngineMissing", "ImageMissing",
           "RunRecord", "RunRefused", "StaleLock", "VersionMismatch", "environment_hash", "run_pipeline"]

log = logging.getLogger("corelab.run")
BACKENDS = (*ENGINES, "local")
TAIL = 4000
# Set inside containers and for local runs alike (HOME only inside), so both compute alike.
RUN_ENV = {"HOME": "/tmp", "MPLBACKEND": "Agg", "NIPYPE_NO_ET": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class RunRecord:
    """Provenance of one run: JSON-ready through :meth:`to_dict`.

    ``image`` names the locked image: the one that ran (container backends) or the one this
    environment was checked against (``local``). ``digest`` is the digest of the image that ran,
    and empty for ``local``, where no image ran: a local run is identified by
    ``environment_sha256`` instead, the hash of the software it ran with (the Python version and
    the installed version of every package the image's requirements lock pins), equal on every
    machine whose environment equals the lock. ``command`` is the exact argv run;
    ``inputs`` and ``outputs`` map paths (outputs relative to the output folder) to sha256;
    ``versions`` holds the engine and Python versions and the package versions in effect
    (the image's pins, or what is installed for ``local``). ``version_override`` is True only
    for a ``local`` run allowed despite ``version_mismatches``.
    """

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
    outputs: dict[str, str] = field(default_factory=dict)
    missing_outputs: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    version_override: bool = False
    version_mismatches: list[str] = field(default_factory=list)
    environment_sha256: str = ""
    host: str = field(default_factory=platform.node)

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)

    def to_dict(self) -> dict:
        return asdict(self) | {"command_line": self.command_line}


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
    environment_sha256: str = ""


def environment_hash(versions: Mapping[str, str]) -> str:
    """sha256 of a software environment: its name -> version pairs, canonically ordered."""
    text = "\n".join(f"{name}=={version}" for name, version in sorted(versions.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def plan_container(backend: str, spec: PipelineSpec, entry: LockedImage, input_path: Path,
                   output_dir: Path, subject: str, session: str, options: dict,
                   containers: Path = CONTAINERS, sif_dir: Path = SIF_DIR,
                   upstream: Mapping[str, Path] | None = None) -> Plan:
    """Check the pinned image and build the container command (raises RunRefused)."""
    require_engine(backend)
    drift = definition_drift(entry, (), containers)
    if drift:
        raise StaleLock(f"containers/lock is stale for image {entry.key!r}: {'; '.join(drift)}. "
                        f"Rebuild with `corelab containers build {entry.key}`.", drift)
    mounts, inside_input, inside_output, inside_upstream = plan_mounts(input_path, output_dir, upstream)
    if "container_digest" in spec.options:  # the pipeline stamps it into its outputs
        options = options | {"container_digest": entry.digest}
    argv = spec.render(inside_input, inside_output, subject, session, inside_upstream, **options)
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
               containers: Path = CONTAINERS, repo: Path = REPO,
               upstream: Mapping[str, Path] | None = None) -> Plan:
    """Check this environment against the image's lock and build the local command."""
    mismatches = local_mismatches(spec, entry, containers, repo)
    if mismatches and not allow_version_mismatch:
        raise VersionMismatch(
            f"local backend refused for {spec.name} {spec.version}: this environment differs from "
            f"image {entry.reference}: {'; '.join(mismatches)}. Run in the container, align the "
            "environment (make setup), or pass allow_version_mismatch=True (recorded).", mismatches)
    # No image runs here: the outputs never name one (their provenance names the environment).
    argv = spec.render(str(input_path.resolve()), str(output_dir.resolve()), subject, session,
                       {k: str(Path(p).resolve()) for k, p in (upstream or {}).items()}, **options)
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    env = dict(os.environ) | {k: v for k, v in RUN_ENV.items() if k != "HOME"}
    env |= thread_env(options.get("threads"))
    pins = read_requirements(requirements_path(entry.key, containers))
    versions = {"python": platform.python_version()}
    versions |= {name: installed_version(name) or "not installed" for name in pins}
    return Plan(argv, env, "", versions, mismatches, cwd=tempfile.gettempdir(),
                environment_sha256=environment_hash(versions))


def execute(record: RunRecord, plan: Plan, backend: str, timeout_s: float | None) -> RunRecord:
    """Run the planned command, logging it first, and fill in the record's outcome."""
    log.info("running %s %s on %s: %s", record.pipeline, record.pipeline_version, backend,
             record.command_line)
    started = datetime.now(timezone.utc)
    record.started_at = started.isoformat()
    try:
        proc = subprocess.run(plan.command, env=plan.env, cwd=plan.cwd, capture_output=True,
                              text=True, timeout=timeout_s, preexec_fn=_die_with_parent)
        record.exit_code, out, err = proc.returncode, proc.stdout, proc.stderr
        if proc.returncode != 0:
            last = (err.strip().splitlines() or ["(no stderr)"])[-1]
            record.error = f"pipeline exited with status {proc.returncode}: {last}"
    except subprocess.TimeoutExpired as exc:
        remove_container(backend, plan.command)
        out, err = _text(exc.stdout), _text(exc.stderr)
        record.error = f"timed out after {timeout_s} s; the container was removed"
    finished = datetime.now(timezone.utc)
    record.finished_at = finished.isoformat()
    record.duration_s = round((finished - started).total_seconds(), 3)
    record.stdout_tail, record.stderr_tail = out[-TAIL:], err[-TAIL:]
    return record


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the thread that started it dies (Linux prctl).

    A flow killed with -9 must not leave its pipeline writing into ``derivatives/`` unsupervised
    while a restart runs the same pipeline into the same folder. ``subprocess.run`` blocks the
    starting thread until the child ends, so the signal fires only when the process is gone.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def check_outputs(record: RunRecord, spec: PipelineSpec, output_dir: Path, subject: str,
                  session: str, entities: Mapping[str, str] | None) -> RunRecord:
    """Hash the promised outputs; a missing one makes the run not ok."""
    for rel in spec.expected_outputs(subject, session, entities).values():
        path = output_dir / rel
        if path.is_file():
            record.outputs[rel] = sha256_file(path)
        else:
            record.missing_outputs.append(rel)
    if record.exit_code == 0 and record.missing_outputs:
        record.error = f"pipeline exited 0 but left no {', '.join(record.missing_outputs)}"
    record.ok = record.exit_code == 0 and not record.missing_outputs
    return record


def run_pipeline(spec: PipelineSpec, input_path: str | Path, output_dir: str | Path,
                 subject: str, session: str, *, backend: str = "podman",
                 entities: Mapping[str, str] | None = None, threads: int | None = None,
                 allow_version_mismatch: bool = False, timeout_s: float | None = None,
                 lock_path: Path | None = None, containers: Path | None = None,
                 sif_dir: Path = SIF_DIR, upstream: Mapping[str, Path] | None = None) -> RunRecord:
    """Run ``spec`` on one input file with ``backend`` and return its provenance.

    Parameters
    ----------
    spec : PipelineSpec
        The pipeline (see ``pipelines.registry``).
    input_path, output_dir : path
        The input file (mounted read-only) and the derivatives folder it writes into.
    subject, session : str
        BIDS labels (without ``sub-``/``ses-``).
    backend : {"podman", "docker", "apptainer", "local"}
    entities : mapping, optional
        Further BIDS entities of the input (``acq``, ``run``).
    threads : int, optional
        Thread count for the pipeline; give the same one to compare backends.
    allow_version_mismatch : bool
        ``local`` only: run although the environment differs from the image; the record
        then carries ``version_override=True`` and the list of mismatches.
    timeout_s : float, optional
        Stop (and remove) the run after this many seconds.
    lock_path, containers : Path, optional
        The lock and the image definitions (default: the spec's ``definitions`` folder).
    upstream : mapping of str to path, optional
        Files of other pipelines' runs this one takes (key of one of the spec's
        :class:`~pipelines.spec.Upstream` -> path), mounted read-only and hashed with the inputs.

    Returns
    -------
    RunRecord
        ``ok`` is True when the pipeline exited 0 and left every promised output.

    Raises
    ------
    RunRefused
        ImageMissing, DigestMismatch, StaleLock or VersionMismatch: nothing was run.
    EngineMissing, ContainerRunError
        The backend is unknown or absent, or the input cannot be mounted.
    """
    if backend not in BACKENDS:
        raise ContainerRunError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    input_path, output_dir = Path(input_path), Path(output_dir)
    upstream = {k: Path(p) for k, p in (upstream or {}).items()}
    for path in (input_path, *upstream.values()):
        if not path.is_file():
            raise ContainerRunError(f"input {path} does not exist or is not a file")
    containers = containers or spec.definitions
    entry = _locked(spec, lock_path or spec.lock_path)
    entities = {k: v for k, v in (entities or {}).items() if v is not None}
    options = dict(entities) | {"threads": threads}
    if backend == "local":
        plan = plan_local(spec, entry, input_path, output_dir, subject, session, options,
                          allow_version_mismatch, containers, repo=containers.parent, upstream=upstream)
    else:
        plan = plan_container(backend, spec, entry, input_path, output_dir, subject, session,
                              options, containers, sif_dir, upstream=upstream)
    output_dir.mkdir(parents=True, exist_ok=True)  # only once the run is allowed
    record = RunRecord(
        run_id=datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "_" + uuid.uuid4().hex[:8],
        pipeline=spec.name, pipeline_version=spec.version, backend=backend,
        image=entry.reference, digest=plan.digest, command=plan.command, started_at="",
        inputs={str(p.resolve()): sha256_file(p) for p in (input_path, *upstream.values())},
        versions=plan.versions,
        version_override=bool(plan.mismatches), version_mismatches=list(plan.mismatches),
        environment_sha256=plan.environment_sha256)
    if record.version_override:
        log.warning("local run of %s despite %d mismatch(es) with %s (override recorded): %s",
                    spec.name, len(plan.mismatches), entry.reference, "; ".join(plan.mismatches))
    execute(record, plan, backend, timeout_s)
    return check_outputs(record, spec, output_dir, subject, session, entities)


def _locked(spec: PipelineSpec, lock_path: Path) -> LockedImage:
    try:
        entry = locked_image(spec.image, lock_path)
    except LockError as err:
        raise ImageMissing(str(err)) from err
    if entry.pipeline_version != spec.version:
        raise StaleLock(f"image {entry.reference} was built for {spec.name} {entry.pipeline_version}, "
                        f"the spec is {spec.version}: rebuild with `corelab containers build {spec.image}`")
    return entry
