"""The lake on a local folder and on S3 (a real S3 API served by moto), through the same code."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import pytest

from tasks.lake.audit import append_event, verify_chain
from tasks.lake.storage import Lake, LakePathError
from tasks.lake.tables import read_table, write_rows


@pytest.fixture(scope="module")
def s3_url():
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="lake")
    yield endpoint
    server.stop()


def _lakes(tmp_path, endpoint, prefix="trial1"):
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    return [Lake(str(tmp_path / "local")).init(), Lake(f"s3://lake/{prefix}", opts).init()]


def test_same_code_local_and_s3(tmp_path, s3_url):
    for lake in _lakes(tmp_path, s3_url):
        lake.write_text("reports/a.txt", "hello")
        assert lake.read_text("reports/a.txt") == "hello" and lake.exists("reports/a.txt")
        assert lake.find("reports") == ["reports/a.txt"]
        write_rows(lake, "queries", "site-a", [dict(query_id="Q1", study_key="k", status="open",
                                                    message="m", created_at=datetime.now(timezone.utc))])
        assert read_table(lake, "queries")["query_id"].tolist() == ["Q1"]
        for i in range(3):
            append_event(lake, "x", n=i)
        report = verify_chain(lake)
        assert report.ok and report.events == 3, (lake.url, report.problems)


def test_paths_cannot_leave_the_lake(tmp_path):
    lake = Lake(str(tmp_path))
    for bad in ("../etc/passwd", "/etc/passwd", "a/../../b"):
        with pytest.raises(LakePathError):
            lake.path(bad)


def test_write_many_is_all_there_and_leaves_no_temporary_files(tmp_path, s3_url):
    for lake in _lakes(tmp_path, s3_url):
        items = {f"deid/s/{i:03d}.dcm": bytes([i]) * 100 for i in range(20)}
        lake.write_many(items)
        assert lake.find("deid") == sorted(items)
        assert all(lake.read_bytes(k) == v for k, v in items.items())
    assert not [p for p in (tmp_path / "local").rglob(".tmp-*")]


def test_a_store_that_is_down_is_a_transient_storage_error_naming_the_lake(tmp_path):
    """moto's S3 server stopped under a lake: an outage, retried; a missing key is not one."""
    from tasks.errors import is_transient
    from tasks.lake.storage import StorageUnavailable
    from tests.helpers import s3_lake

    lake, server = s3_lake("down")
    lake.write_text("reports/a.txt", "hello")
    with pytest.raises(FileNotFoundError):
        lake.read_bytes("reports/absent.txt")           # not there: trying again changes nothing
    server.stop()
    try:
        for call in (lambda: lake.read_bytes("reports/a.txt"), lambda: lake.write_text("reports/b.txt", "x"),
                     lambda: lake.exists("reports/a.txt"), lambda: lake.find("reports")):
            with pytest.raises(StorageUnavailable, match=r"lake s3://down/trial1: \w+ .*failed") as err:
                call()
            assert is_transient(err.value) and err.value.code == "storage_unavailable"
    finally:
        server.start()
    assert lake.read_text("reports/a.txt") == "hello"     # back up: the same lake works again
    server.stop()
    local = Lake(str(tmp_path / "local")).init()
    with pytest.raises(FileNotFoundError):
        local.read_bytes("reports/absent.txt")


@pytest.mark.parametrize("exc,outage", [
    (OSError(5, "Input/output error"), True),             # EIO: a failing disk, S3's own error answer
    (ConnectionRefusedError(111, "refused"), True),
    (TimeoutError("read timed out"), True),
    (OSError(28, "No space left on device"), False),      # full: waiting seconds does not help
    (OSError(30, "Read-only file system"), False),
    (PermissionError(13, "denied"), False),
    (FileNotFoundError(2, "absent"), False),
])
def test_what_counts_as_an_outage(exc, outage):
    from tasks.lake.storage import _is_outage

    assert _is_outage(exc) is outage


def test_s3_configuration_errors_are_not_outages():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ParamValidationError

    from tasks.lake.storage import _is_outage

    assert _is_outage(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not _is_outage(NoCredentialsError()) and not _is_outage(ParamValidationError(report="bad bucket"))


def test_an_outage_message_names_no_file_of_the_restricted_stores(tmp_path, monkeypatch):
    from tasks.lake.storage import StorageUnavailable

    lake = Lake(str(tmp_path)).init()

    def down(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(lake.fs, "exists", down)
    with pytest.raises(StorageUnavailable) as err:
        lake.exists("inbox/site/u1/Doe_John_T1.dcm")
    assert "Doe_John" not in str(err.value) and "exists failed" in str(err.value)
    with pytest.raises(StorageUnavailable, match="'tables/qc'"):
        lake.exists("tables/qc")


def test_local_paths_for_programs_that_read_files(tmp_path, s3_url):
    """nibabel, dcm2niix and pipelines read by path: a local lake hands its own files, S3 copies."""
    for lake in _lakes(tmp_path, s3_url, prefix="local-paths"):   # its own prefix in the shared bucket
        lake.write_many({"deid/s/series-1/a.dcm": b"a", "deid/s/series-1/b.dcm": b"bb"})
        work = tmp_path / f"work-{lake.is_local}"
        work.mkdir()
        folder = lake.local_folder("deid/s/series-1", work)
        assert sorted(os.listdir(folder)) == ["a.dcm", "b.dcm"]
        assert open(os.path.join(folder, "b.dcm"), "rb").read() == b"bb"
        path = lake.local_file("deid/s/series-1/a.dcm", work)
        assert open(path, "rb").read() == b"a"
        assert (path == lake.path("deid/s/series-1/a.dcm")) is lake.is_local
