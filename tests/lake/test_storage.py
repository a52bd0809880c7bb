"""The lake on a local folder and on S3 (a real S3 API served by moto), through the same code."""

from __future__ import annotations

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


def _lakes(tmp_path, endpoint):
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    return [Lake(str(tmp_path / "local")).init(), Lake("s3://lake/trial1", opts).init()]


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
