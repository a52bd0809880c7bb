"""Container engines: the exact command lines of podman, docker and apptainer, and image checks.

Pure command construction (:func:`oci_command`, :func:`apptainer_command`) is kept apart from
the calls that ask an engine about an image (:func:`verify_oci_image`) or check a SIF file
(:func:`verify_sif`), so tests can assert the command each backend gets without an engine.
The runner (``tasks/run/runner.py``) uses these; see its docstring for the rules.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelines.image_build import PODMAN_CONF, podman_env
from pipelines.images import CONTAINERS, LockedImage, sha256_file
from tasks.errors import CorelabError

OCI_ENGINES = ("podman", "docker")
ENGINES = (*OCI_ENGINES, "apptainer")
IN_DIR, OUT_DIR = "/data/in", "/data/out"
SIF_DIR = CONTAINERS / ".cache" / "sif"


class ContainerRunError(CorelabError, RuntimeError):
    """A pipeline run could not be attempted."""

    code = "run_refused"


class RunRefused(ContainerRunError):
    """The run was refused before starting; ``reasons`` lists why."""

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons = reasons or [message]


class ImageMissing(RunRefused):
    """The locked image is not in the engine's storage (or the SIF file is absent)."""

    code = "image_missing"


class DigestMismatch(RunRefused):
    """The engine's image is not the one whose digest is locked."""

    code = "digest_mismatch"


class StaleLock(RunRefused):
    """The image definition changed after the locked image was built."""

    code = "stale_lock"


class VersionMismatch(RunRefused):
    """``local`` backend: the installed environment differs from the image's lock."""

    code = "version_mismatch"


class EngineMissing(ContainerRunError):
    """The backend's executable is not on PATH."""

    code = "engine_missing"


class EngineUnavailable(ContainerRunError):
    """The engine is there but failed to answer (its own error, not the pipeline's): transient."""

    code = "engine_unavailable"


# podman and docker exit 125 when the engine itself fails (before or instead of running the
# container): a daemon or storage error, not the pipeline's own exit status.
ENGINE_ERROR_EXIT = 125
_NO_SUCH_IMAGE = ("no such image", "image not known", "failed to find image")


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool


def check_mount_path(path: Path) -> None:
    """Engines split mount specs on ',' (--mount) and ':' (-v, apptainer --bind)."""
    text = str(path)
    if any(c in text for c in ",:\n"):
        raise ContainerRunError(f"cannot bind-mount {text!r}: the path contains ',', ':' or a "
                                "newline; move or rename it")


def companions(input_path: Path) -> list[Path]:
    """The files BIDS keeps beside an image under the same name (``.json``, a dwi's ``.bval`` and
    ``.bvec``): a pipeline reads them as part of its input."""
    stem = input_path.name.removesuffix(".gz").removesuffix(".nii")
    return sorted(p for p in input_path.parent.glob(f"{glob.escape(stem)}.*")
                  if p.name != input_path.name and p.suffix in (".json", ".bval", ".bvec") and p.is_file())


def plan_mounts(input_path: Path, output_dir: Path, upstream: Mapping[str, Path] | None = None
                ) -> tuple[list[Mount], str, str, dict[str, str]]:
    """Mounts for one input file (with its :func:`companions`, read-only beside it), the upstream
    files (read-only, as ``<key>-<name>`` beside the input: no name can collide with it) and one
    output folder; the input's, output's and upstream files' paths inside the container."""
    input_path, output_dir = input_path.resolve(), output_dir.resolve()
    extra = {k: Path(p).resolve() for k, p in (upstream or {}).items()}
    beside = companions(input_path)
    for path in (input_path, output_dir, *beside, *extra.values()):
        check_mount_path(path)
    inside = f"{IN_DIR}/{input_path.name}"
    inside_extra = {k: f"{IN_DIR}/{k}-{p.name}" for k, p in extra.items()}
    return ([Mount(input_path, inside, True), *(Mount(p, f"{IN_DIR}/{p.name}", True) for p in beside),
             *(Mount(p, inside_extra[k], True) for k, p in extra.items()),
             Mount(output_dir, OUT_DIR, False)], inside, OUT_DIR, inside_extra)


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
            f"install {backend} or choose the podman or local backend"
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
    if proc.returncode != 0 and not any(s in proc.stderr.lower() for s in _NO_SUCH_IMAGE):
        raise EngineUnavailable(f"{backend} image inspect {entry.tagged} failed (exit {proc.returncode}): "
                                f"{proc.stderr.strip()[:300]}")
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
                           f"image with `corelab containers sif {entry.key}` (records sif_sha256)")
    if not sif.is_file():
        raise ImageMissing(f"SIF file {sif} for image {entry.reference} does not exist")
    actual = sha256_file(sif)
    if actual != entry.sif_sha256:
        raise DigestMismatch(f"SIF {sif} has sha256 {actual}, containers/lock pins "
                             f"{entry.sif_sha256}: refusing to run an unpinned image")


def remove_container(backend: str, command: list[str]) -> None:
    if backend in ("podman", "docker") and "--name" in command:
        name = command[command.index("--name") + 1]
        subprocess.run([backend, "rm", "-f", name], capture_output=True, env=engine_env(backend))
