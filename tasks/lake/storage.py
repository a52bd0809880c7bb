"""The lake: every store of ../DESIGN.md behind one fsspec filesystem.

A lake is a root URL (a local folder by default, ``s3://bucket/prefix`` in
production). All reads and writes go through fsspec (s3fs for S3), so the same
code runs on a laptop and on S3. Paths handed to a :class:`Lake` are always
relative, with ``/`` separators, and never leave the root.

Writes are atomic: on a local filesystem the bytes go to a hidden temporary
name in the same folder and are renamed over the target (``os.replace`` is
atomic on POSIX); on object stores a single PUT is already all-or-nothing.

A store that cannot be reached (a network or S3 error, a failing disk) raises
:class:`StorageUnavailable`, a transient error that Prefect retries. A file that
is not there stays a ``FileNotFoundError``, and a denied one a ``PermissionError``:
trying again would change neither.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec

from tasks.errors import CorelabError

# The stores that hold something; creating them up front makes a new lake self-describing.
# (Site queries are a table under tables/; QC verdicts too, until QC snapshots need a store.)
STORES = ("inbox", "quarantine", "deid", "bids", "derivatives", "tables", "models", "reports", "audit")


class LakePathError(CorelabError, ValueError):
    """A relative lake path tried to escape the lake root or was absolute."""

    code = "lake_path_invalid"


class StorageUnavailable(CorelabError, OSError):
    """The lake could not be read or written: transient, retried."""

    code = "storage_unavailable"


# Errors that say the store is down or unreachable for now, as opposed to "not there", "not
# allowed" or "full": only those are worth trying again. s3fs passes botocore's connection and
# HTTP errors through (measured with moto: a stopped server gives botocore
# EndpointConnectionError after ~7 s of botocore's own retries) and maps S3's own error answers
# to OSError; a disk or network file system says it with errno.
_OUTAGE_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                  errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ESTALE}


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, CorelabError):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):  # builtin: refused, reset, aborted, timed out
        return True
    if isinstance(exc, OSError):
        return exc.errno in _OUTAGE_ERRNOS
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # s3fs is not installed: no S3 lake either
        return False
    # not NoCredentialsError, ParamValidationError and the like: no retry fixes a configuration
    return isinstance(exc, (BotoConnectionError, HTTPClientError))


F = TypeVar("F", bound=Callable[..., Any])


def _io(method: F) -> F:
    """Report an outage of the store as StorageUnavailable, naming the lake and the operation."""
    @functools.wraps(method)
    def wrapper(self: "Lake", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if not _is_outage(exc):
                raise
            # paths in the restricted stores keep the site's own file names, which may identify
            rel = args[0] if args and isinstance(args[0], str) else ""
            what = f" {rel!r}" if rel and not rel.startswith(("inbox/", "quarantine/")) else ""
            raise StorageUnavailable(f"lake {self.url}: {method.__name__}{what} failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
    return wrapper  # type: ignore[return-value]


@dataclass
class Lake:
    """A root URL plus an fsspec filesystem.

    Parameters
    ----------
    url
        Local folder or fsspec URL (``s3://bucket/prefix``).
    storage_options
        Passed to fsspec (for S3: key, secret, client_kwargs.endpoint_url ...).
    """

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/") if root != "/" else root
        self.is_local = "file" in _protocols(self.fs)
        if self.is_local:
            self.root = os.path.abspath(self.root)

    # -- paths ---------------------------------------------------------------
    def path(self, rel: str) -> str:
        """Absolute filesystem path of a relative lake path."""
        rel = rel.strip()
        if rel.startswith("/") or "\\" in rel:
            raise LakePathError(f"lake paths are relative with '/' separators: {rel!r}")
        norm = posixpath.normpath(rel) if rel else "."
        if norm == ".":
            return self.root
        if norm == ".." or norm.startswith("../"):
            raise LakePathError(f"lake path escapes the lake root: {rel!r}")
        return f"{self.root}/{norm}"

    def rel(self, path: str) -> str:
        """Relative lake path of an absolute filesystem path inside the lake."""
        path = path.rstrip("/")
        if path == self.root:
            return ""
        prefix = self.root.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise LakePathError(f"{path!r} is not inside the lake {self.root!r}")
        return path[len(prefix):]

    def uri(self, rel: str = "") -> str:
        """Full URL of a relative path, for humans and provenance."""
        p = self.path(rel)
        return p if self.is_local else self.fs.unstrip_protocol(p)

    # -- reading -------------------------------------------------------------
    @_io
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    @_io
    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    @_io
    def find(self, rel: str = "") -> list[str]:
        """Every file below ``rel`` as relative lake paths, sorted."""
        base = self.path(rel)
        if not self.fs.exists(base):
            return []
        return sorted(self.rel(p) for p in self.fs.find(base) if not _is_temp(p))

    @_io
    def listdir(self, rel: str = "") -> list[str]:
        """Names directly below ``rel`` (files and folders), sorted."""
        base = self.path(rel)
        if not self.fs.exists(base):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False)
                      if not _is_temp(p))

    def local_file(self, rel: str, tmp: str | os.PathLike[str]) -> str:
        """A local path holding the file ``rel``: the lake's own file, or a copy in ``tmp`` (object stores).

        For programs that read files by path (nibabel, dcm2niix, a pipeline container).
        """
        if self.is_local:
            return self.path(rel)
        dest = os.path.join(os.fspath(tmp), posixpath.basename(rel))
        with open(dest, "wb") as fh:
            fh.write(self.read_bytes(rel))
        return dest

    def local_folder(self, rel: str, tmp: str | os.PathLike[str]) -> str:
        """A local folder holding the files directly below ``rel`` (the lake's own, or copies in ``tmp``)."""
        if self.is_local:
            return self.path(rel)
        dest = os.path.join(os.fspath(tmp), posixpath.basename(rel.rstrip("/")) or "folder")
        os.makedirs(dest, exist_ok=True)
        for path in self.find(rel):
            self.local_file(path, dest)
        return dest

    # -- writing -------------------------------------------------------------
    @_io
    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    @_io
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` atomically at ``rel``; returns the relative path."""
        target = self.path(rel)
        if self.is_local:
            folder = posixpath.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(target, data)  # one PUT: all or nothing
        return rel

    @_io
    def write_many(self, items: dict[str, bytes]) -> list[str]:
        """Write many files, each atomically, with one flush to disk for all of them.

        A series of hundreds of slices would otherwise pay one ``fsync`` per file
        (about a millisecond each here); the data reach the disk with a single
        ``os.sync`` before any file takes its final name, so a crash leaves either
        the old state or complete files, never a partial one.
        """
        if not self.is_local:
            for rel, data in items.items():
                self.fs.pipe_file(self.path(rel), data)
            return list(items)
        staged = []
        try:
            for rel, data in items.items():
                target = self.path(rel)
                folder = posixpath.dirname(target)
                os.makedirs(folder, exist_ok=True)
                tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}")
                with open(tmp, "wb") as fh:
                    fh.write(data)
                staged.append((tmp, target))
            os.sync()
            for tmp, target in staged:
                os.replace(tmp, target)
            staged = []
        finally:
            for tmp, _ in staged:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return list(items)

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode("utf-8"))

    @_io
    def put_file(self, local_path: str, rel: str) -> str:
        """Copy a local file into the lake atomically."""
        if self.is_local:
            with open(local_path, "rb") as fh:
                return self.write_bytes(rel, fh.read())
        self.fs.put_file(local_path, self.path(rel))
        return rel

    @_io
    def remove(self, rel: str, recursive: bool = False) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=recursive)

    def init(self) -> "Lake":
        """Create the stores (idempotent)."""
        if self.is_local:
            for store in STORES:
                self.makedirs(store)
        return self

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive lock for read-modify-write of a shared object.

        Local lakes use ``flock`` on a file under ``.locks/``. Object stores have
        no lock primitive; there the orchestrator must serialise writers of one
        object (Prefect concurrency limits per site), so this is a no-op.
        """
        if not self.is_local:
            yield
            return
        folder = self.path(".locks")
        os.makedirs(folder, exist_ok=True)
        with open(posixpath.join(folder, name.replace("/", "_") + ".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _is_temp(path: str) -> bool:
    base = posixpath.basename(path.rstrip("/"))
    return base.startswith(".tmp-") or base == ".locks"


def open_lake(url: str | None = None, storage_options: dict[str, Any] | None = None) -> Lake:
    """The lake at ``url``, else ``$CORELAB_LAKE``, else ``./corelab-lake``."""
    url = url or os.environ.get("CORELAB_LAKE") or "corelab-lake"
    return Lake(url, storage_options or {}).init()
