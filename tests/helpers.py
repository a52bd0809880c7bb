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


def bids_validator(root: Path) -> tuple[list[dict], list[dict]]:
    """The official BIDS validator's (bids-validator-deno) errors and warnings on a dataset folder.

    Every file is checked (``--max-rows -1``: all TSV rows, not the first 1000).
    """
    import json
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("bids-validator-deno")
    assert exe.is_file(), f"{exe} missing: bids-validator-deno is in requirements.lock"
    proc = subprocess.run([str(exe), "--format", "json", "--max-rows", "-1", str(root)],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.stdout.strip(), f"bids-validator gave no report (exit {proc.returncode}): {proc.stderr[-500:]}"
    issues = json.loads(proc.stdout)["issues"]["issues"]
    return ([i for i in issues if i["severity"] == "error"], [i for i in issues if i["severity"] == "warning"])


def describe(issues: list[dict]) -> list[str]:
    """One line per validator issue: code, sub-code and where."""
    return sorted(f"{i['code']} {i.get('subCode') or ''} {i.get('location') or ''}".strip() for i in issues)


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
