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


def test_write_new_never_replaces_what_is_there(tmp_path, s3_url):
    for lake in _lakes(tmp_path, s3_url, prefix="write-new"):
        lake.write_new("audit/events/000000000001.json", b"first")
        with pytest.raises(FileExistsError):
            lake.write_new("audit/events/000000000001.json", b"second")
        assert lake.read_bytes("audit/events/000000000001.json") == b"first"
        assert lake.find("audit") == ["audit/events/000000000001.json"]
    assert not [p for p in (tmp_path / "local").rglob(".tmp-*")]


def test_write_new_from_many_writers_at_once_has_one_winner(tmp_path, s3_url):
    """20 threads, each with its own client, create one name at once: one succeeds, 19 are refused."""
    import threading

    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_url},
            "skip_instance_cache": True}
    def race(lakes):
        go, won, refused = threading.Barrier(len(lakes)), [], []

        def create(i):
            go.wait()
            try:
                lakes[i].write_new("audit/events/000000000007.json", f"writer {i}".encode())
                won.append(i)
            except FileExistsError:
                refused.append(i)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(len(lakes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return won, refused

    for url in (str(tmp_path / "local"), "s3://lake/write-new-race"):
        lakes = [Lake(url, opts if url.startswith("s3") else {}) for _ in range(20)]
        won, refused = race(lakes)
        assert len(won) == 1 and len(refused) == 19, (url, won, refused)
        assert lakes[0].read_bytes("audit/events/000000000007.json") == f"writer {won[0]}".encode()


def test_a_lake_sees_what_another_client_wrote_after_it_listed(s3_url):
    """s3fs caches listings and answers exists() from them: the lake must ask the store instead."""
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_url}}
    ours = Lake("s3://lake/fresh", opts)
    theirs = Lake("s3://lake/fresh", dict(opts, skip_instance_cache=True))    # another machine
    ours.write_text("audit/events/000000000001.json", "{}")
    assert ours.listdir("audit/events") == ["000000000001.json"]
    assert ours.find("audit") == ["audit/events/000000000001.json"]
    theirs.write_text("audit/events/000000000002.json", "{}")
    theirs.write_text("audit/head.json", "{}")
    assert ours.exists("audit/events/000000000002.json") and ours.exists("audit/head.json")
    assert ours.listdir("audit/events") == ["000000000001.json", "000000000002.json"]
    assert ours.listdir("audit") == ["events", "head.json"]
    assert ours.find("audit") == ["audit/events/000000000001.json", "audit/events/000000000002.json",
                                  "audit/head.json"]


def test_a_lock_that_cannot_be_had_is_a_retryable_infrastructure_failure(s3_url):
    from data_contracts.reasons import REASONS
    from tasks.errors import is_transient
    from tasks.lake.storage import LockTimeout

    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_url}}
    lake = Lake("s3://lake/lock-timeout", opts)
    with lake.lock("table-qc-site-a"):
        with pytest.raises(LockTimeout, match=r"lock 'table-qc-site-a' still held after 1 s") as err:
            with lake.lock("table-qc-site-a", timeout=1):
                pass
    assert is_transient(err.value) and REASONS[err.value.code].category == "infrastructure"
    with lake.lock("table-qc-site-a", timeout=1):    # released on leaving the block
        pass
