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

Concurrent writers of one object (a table partition, the audit head) serialise
through :meth:`Lake.lock`: ``flock`` on a local lake, a lease object created with
a conditional PUT (``If-None-Match: *``) on S3. :meth:`Lake.write_new` writes a
file only if it is not there yet, on both.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import posixpath
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
import fsspec.asyn

from tasks.errors import CorelabError

log = logging.getLogger("corelab.lake")

# The stores that hold something; creating them up front makes a new lake self-describing.
# (Site queries are a table under tables/; QC verdicts too, until QC snapshots need a store.)
STORES = ("inbox", "quarantine", "deid", "bids", "derivatives", "tables", "models", "reports", "audit")


class LakePathError(CorelabError, ValueError):
    """A relative lake path tried to escape the lake root or was absolute."""

    code = "lake_path_invalid"


class StorageUnavailable(CorelabError, OSError):
    """The lake could not be read or written: transient, retried."""

    code = "storage_unavailable"


class LockTimeout(StorageUnavailable):
    """Another writer held a lake lock for longer than this writer would wait: transient, retried.

    Its code is ``storage_unavailable``: the write did not happen, nothing is wrong with the data.
    """


class LockLost(StorageUnavailable):
    """A writer's lease ran out and was broken while it held it: its write may race another's; retried."""


# Leases on object stores (see Lake.lock). A holder renews its lease every LOCK_TTL / 3 s, so a
# lease runs out only when its holder is gone (kill -9, a lost machine) or stalled for over
# 2/3 of LOCK_TTL; a waiter gives up after LOCK_TIMEOUT, longer than LOCK_TTL so that a dead
# holder's lease runs out and is broken before anyone gives up.
LOCK_TTL = 30.0
LOCK_TIMEOUT = 120.0
_POLL_FIRST, _POLL_MAX = 0.05, 0.5      # a waiter's back-off: doubling, jittered, capped


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


def _s3_code(exc: BaseException) -> str | None:
    """S3's error code behind an exception s3fs translated (``PreconditionFailed``...), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
        seen = seen.__cause__
    return None


# S3's answers to a conditional request that lost: the condition is false (412), or another
# conditional write of the same key was in flight (409; AWS asks the client to try again).
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict"}


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

    def _fresh(self, path: str) -> str:
        """``path``, with what s3fs cached about it and its folders forgotten.

        Other processes and machines write the lake: a listing cached by this process says
        nothing about what they wrote since (s3fs keeps listings until told otherwise, and
        answers ``exists`` from them), so the lake always asks the store.
        """
        if not self.is_local:
            self.fs.invalidate_cache(path)
        return path

    # -- reading -------------------------------------------------------------
    @_io
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._fresh(self.path(rel)))

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
        base = self._fresh(self.path(rel))
        if not self.fs.exists(base):
            return []
        return sorted(self.rel(p) for p in self.fs.find(base) if not _is_temp(p))

    @_io
    def listdir(self, rel: str = "") -> list[str]:
        """Names directly below ``rel`` (files and folders), sorted."""
        base = self._fresh(self.path(rel))
        if not self.fs.exists(base):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False, refresh=True)
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
            with _durable_temp(target, data) as tmp:
                os.replace(tmp, target)
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
    def write_new(self, rel: str, data: bytes) -> str:
        """Write ``data`` at ``rel`` only if nothing is there yet; returns the relative path.

        For records that must never be overwritten (an audit event's sequence number): even a
        writer whose lock was broken cannot replace what another wrote. Atomic like
        :meth:`write_bytes`: a local file is written under a temporary name and hard-linked to
        its name (``link`` fails if the name exists); on S3 it is one PUT with
        ``If-None-Match: *``.

        Raises
        ------
        FileExistsError
            ``rel`` exists already; nothing was written.
        """
        target = self.path(rel)
        if not self.is_local:
            for attempt in range(5):
                try:
                    self.fs.pipe_file(target, data, mode="create")
                    return rel
                except FileExistsError:
                    raise
                except OSError as exc:   # 409: a concurrent create of the same key; ask again
                    if _s3_code(exc) != "ConditionalRequestConflict" or attempt == 4:
                        raise
                    time.sleep(random.uniform(0.05, 0.2))
        with _durable_temp(target, data) as tmp:
            try:
                os.link(tmp, target)
            except OSError as exc:   # a file system without hard links: exclusive create, then rename
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                    raise
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os.replace(tmp, target)
        return rel

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
    def lock(self, name: str, *, timeout: float | None = None, ttl: float | None = None) -> Iterator[None]:
        """An exclusive lock for read-modify-write of a shared object, across processes and machines.

        Local lakes use ``flock`` on a file under ``.locks/`` (blocking; the kernel drops it
        when its holder dies).

        Object stores have no lock primitive but do have conditional writes. The lock is a
        lease object ``.locks/<name>.lock`` created with ``PUT If-None-Match: *``: exactly one
        of many writers' creates succeeds, the others get 412 and wait, polling with doubling,
        jittered back-off. The lease holds an owner token and an expiry; a thread of the
        holder renews it every ``ttl / 3`` s (``PUT If-Match: <its ETag>``). Leaving the block
        deletes the lease with ``DELETE If-Match: <its ETag>``, so only our own lease is ever
        deleted. A lease past its expiry (its holder was killed) is broken by a waiter with
        the same conditional delete, naming the ETag it read: a lease renewed or taken by
        someone else meanwhile has another ETag and stays.

        What remains: a holder that is alive but stalls for longer than the lease's remaining
        life (at least 2/3 of ``ttl``, thanks to renewal: a frozen VM, a partition that hides
        its renewals), or a waiter whose clock runs that far ahead of the holder's, lets a
        second writer in while the first still writes; the first then finds its lease gone
        when it leaves the block and raises :class:`LockLost` (retryable; the table writes are
        idempotent upserts). ``ttl`` bounds that window from below: only a stall longer than
        it can open it. Audit events use :meth:`write_new`, so even then no sequence number is
        written twice. The store must honour ``If-None-Match`` on PUT and ``If-Match`` on PUT
        and DELETE (AWS S3 does since 2024/2025, and moto; check another S3-compatible store).

        Parameters
        ----------
        name
            The lock's name (one per shared object, e.g. ``table-qc-<site>``).
        timeout
            Seconds to wait for the lease on an object store (default :data:`LOCK_TIMEOUT`).
        ttl
            Seconds a lease lives without renewal (default :data:`LOCK_TTL`).

        Raises
        ------
        LockTimeout
            The lease could not be had within ``timeout`` (another writer holds it).
        LockLost
            Our lease was broken while we held it (only raised when the block itself succeeded).
        """
        if not self.is_local:
            lease = _Lease(self, name, LOCK_TTL if ttl is None else ttl)
            lease.acquire(LOCK_TIMEOUT if timeout is None else timeout)
            done = False
            try:
                yield
                done = True
            finally:
                lease.release(raise_if_lost=done)
            return
        folder = self.path(".locks")
        os.makedirs(folder, exist_ok=True)
        with open(posixpath.join(folder, name.replace("/", "_") + ".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- conditional requests on S3 (the lease primitives) ---------------------
    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self.path(rel))
        return bucket, key

    @_io
    def _put_if(self, rel: str, data: bytes, etag: str | None = None) -> str | None:
        """PUT ``data`` if ``rel`` is absent (``etag`` None) or still has ``etag``; its new ETag, or None."""
        bucket, key = self._bucket_key(rel)
        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        for attempt in range(3):
            try:
                return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
            except FileNotFoundError:                 # If-Match on a key that is gone
                return None
            except OSError as exc:
                code = _s3_code(exc)
                if code == "ConditionalRequestConflict" and attempt < 2:   # 409: asked to try again
                    time.sleep(random.uniform(0.05, 0.2))
                    continue
                if code in _CONDITION_FAILED:
                    return None
                raise
            finally:
                self.fs.invalidate_cache(self.path(rel))
        return None

    @_io
    def _get_with_etag(self, rel: str) -> tuple[bytes, str] | None:
        """The bytes at ``rel`` and the ETag of exactly those bytes (None if absent)."""
        bucket, key = self._bucket_key(rel)

        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    @_io
    def _delete_if(self, rel: str, etag: str) -> bool:
        """DELETE ``rel`` only if it still has ``etag``; whether it was deleted."""
        bucket, key = self._bucket_key(rel)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _s3_code(exc) in _CONDITION_FAILED:
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path(rel))


class _Lease:
    """One holder's lease on an object store: acquire, renew in a thread, release (see :meth:`Lake.lock`)."""

    def __init__(self, lake: Lake, name: str, ttl: float) -> None:
        self.lake, self.name, self.ttl = lake, name, ttl
        self.rel = f".locks/{name.replace('/', '_')}.lock"
        self.token = uuid.uuid4().hex
        self.etag = ""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.token, "lock": self.name, "host": socket.gethostname(),
                           "pid": os.getpid(), "ttl": self.ttl, "expires": time.time() + self.ttl}).encode()

    def acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = _POLL_FIRST
        expires = 0.0          # expiry of the last lease we read: no need to read again before it
        holder: dict[str, Any] = {}
        while True:
            etag = self.lake._put_if(self.rel, self._body())
            again = False      # the lease went away or was broken: ask again without waiting
            if etag is None and time.time() >= expires:
                seen = self.lake._get_with_etag(self.rel)
                holder = _lease_body(seen[0]) if seen else {}
                expires = holder.get("expires", 0.0)
                if seen is None:
                    again = True
                elif holder.get("owner") == self.token:      # our create landed, its answer did not
                    etag = seen[1]
                elif time.time() > expires:
                    if self.lake._delete_if(self.rel, seen[1]):    # only that very lease
                        log.warning("lake %s: broke the lease on %r of %s pid %s, %.0f s past its expiry",
                                    self.lake.url, self.name, holder.get("host"), holder.get("pid"),
                                    time.time() - expires)
                    again = True
            if etag is not None:
                self.etag = etag
                self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
                self._renewer.start()
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"lake {self.lake.url}: lock {self.name!r} still held after {timeout:.0f} s "
                                  f"(by {holder.get('host')} pid {holder.get('pid')}, lease expires in "
                                  f"{expires - time.time():.0f} s)")
            time.sleep(min(left, random.uniform(0, 0.01) if again else delay * random.uniform(0.5, 1.0)))
            delay = delay if again else min(2 * delay, _POLL_MAX)

    def _still_ours(self) -> bool:
        """Whether the lease object is still ours (adopting its ETag: a write of ours whose answer was lost)."""
        seen = self.lake._get_with_etag(self.rel)
        if seen is None or _lease_body(seen[0]).get("owner") != self.token:
            return False
        self.etag = seen[1]
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                etag = self.lake._put_if(self.rel, self._body(), self.etag)
                if etag is None and self._still_ours():
                    etag = self.lake._put_if(self.rel, self._body(), self.etag)
            except StorageUnavailable as exc:   # try again at the next tick; the lease has time left
                log.warning("lake %s: could not renew the lease on %r: %s", self.lake.url, self.name, exc)
                continue
            if etag is None:
                log.error("lake %s: the lease on %r was broken while held", self.lake.url, self.name)
                return
            self.etag = etag

    def release(self, raise_if_lost: bool) -> None:
        """Delete the lease if it is still ours; raise LockLost if it was not (when asked to)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            # A lease object that still has our ETag was never replaced, so nobody else held the
            # lock meanwhile: no other writer can make a lease with our token.
            lost = not self.lake._delete_if(self.rel, self.etag) and not (
                self._still_ours() and self.lake._delete_if(self.rel, self.etag))
        except StorageUnavailable as exc:   # ours still, as far as we know; it runs out within ttl
            log.warning("lake %s: could not delete the lease on %r (it expires within %.0f s): %s",
                        self.lake.url, self.name, self.ttl, exc)
            return
        if lost and raise_if_lost:
            raise LockLost(f"lake {self.lake.url}: the lease on {self.name!r} ran out and was broken while "
                           f"held (a stall of over {self.ttl * 2 / 3:.0f} s?); the write may race another's")
        if lost:
            log.error("lake %s: the lease on %r ran out and was broken while held", self.lake.url, self.name)


def _lease_body(data: bytes) -> dict[str, Any]:
    """A lease's content; an unreadable one counts as expired."""
    try:
        body = json.loads(data)
        return dict(body, expires=float(body["expires"]))
    except (ValueError, TypeError, KeyError):
        return {}


@contextlib.contextmanager
def _durable_temp(target: str, data: bytes) -> Iterator[str]:
    """``data`` in a temporary file beside ``target``, on disk (fsynced); removed after unless moved."""
    folder = posixpath.dirname(target)
    os.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
