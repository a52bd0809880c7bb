"""Building blocks for tests: uploads made from the real files of ../shared/data."""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import pydicom

from data_contracts import example_path
from tests.data import shared_path

GE_SERIES = ("dcm_qa_nih", "In", "20180918GE", "mr_0004")
DEMO_TRIAL = example_path()


def dicom_files(*parts: str) -> list[Path]:
    folder = shared_path(*parts)
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".txt"))


def copy_upload(dest: Path, *parts: str, limit: int | None = None) -> Path:
    """Copy (some of) a real series into a fresh upload folder."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in dicom_files(*parts)[:limit]:
        shutil.copy(p, dest / p.name)
    return dest


def rewrite(path: Path, **changes) -> None:
    """Change header values of a real DICOM file in place (None deletes)."""
    ds = pydicom.dcmread(path)
    for kw, value in changes.items():
        if value is None:
            delattr(ds, kw)
        else:
            setattr(ds, kw, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())


def gz(path: Path) -> Path:
    out = path.with_name(path.name + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return out


def s3_lake(bucket: str):
    """A lake on moto's real S3 API server, on a port of its own so the server can stop and start.

    Returns the lake and the (started) server. Botocore makes one attempt per call, so an outage
    reaches corelab at once instead of after botocore's own retries.
    """
    import socket

    from moto.server import ThreadedMotoServer

    from tasks.lake.storage import Lake

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
            "config_kwargs": {"retries": {"max_attempts": 1}}}
    lake = Lake(f"s3://{bucket}/trial1", opts)
    lake.fs.mkdir(bucket)
    return lake, server
