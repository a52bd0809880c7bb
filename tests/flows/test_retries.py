"""Prefect retries by reason code: a storage outage is retried and passes; a bad input fails at once.

The outage is real: the lake is on moto's S3 server, which is stopped when the task starts and
started again only when Prefect logs that it will retry the task (so the first attempt surely
meets the outage and the second surely does not).
"""

from __future__ import annotations

import logging

import pytest

from tasks.intake.custody import take_custody_task
from tasks.intake.identify import SubjectError
from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.receive.study import Upload, receive_one_study_task
from tests.helpers import GE_SERIES, copy_upload, rewrite, s3_lake

pytestmark = pytest.mark.prefect


class RetryLog(logging.Handler):
    """Prefect's "Retry n/m will start" lines and its final "Finished in state Failed" lines.

    ``on_retry`` runs at each retry line, before the retry starts.
    """

    def __init__(self, on_retry=lambda: None):
        super().__init__(logging.INFO)
        self.on_retry, self.retries, self.failures = on_retry, [], []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if " - Retry " in text:
            self.retries.append(text)
            self.on_retry()
        elif text.startswith("Finished in state Failed"):
            self.failures.append(text)


@pytest.fixture
def retry_log():
    handlers = []

    def attach(on_retry=lambda: None) -> RetryLog:
        h = RetryLog(on_retry)
        logging.getLogger("prefect.task_runs").addHandler(h)
        handlers.append(h)
        return h

    yield attach
    for h in handlers:
        logging.getLogger("prefect.task_runs").removeHandler(h)


def test_custody_during_a_storage_outage_is_retried_and_completes(prefect_harness, tmp_path, retry_log):
    lake, server = s3_lake("outage")
    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=3)
    inv = inventory_upload(up)
    server.stop()
    log = retry_log(on_retry=server.start)   # storage comes back when Prefect schedules the retry
    try:
        rejected = take_custody_task(lake, "ge-nih", "u1", up, inv)
        assert len(log.retries) == 1 and "StorageUnavailable" in log.retries[0] and not log.failures
        assert rejected == []
        assert sorted(lake.find("inbox/ge-nih/u1")) == sorted(f"inbox/ge-nih/u1/{p.name}" for p in up.iterdir())
    finally:
        server.stop()


def test_a_study_that_cannot_be_attributed_is_never_retried(prefect_harness, tmp_path, trial, retry_log):
    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=3)
    for p in up.iterdir():
        rewrite(p, PatientID="")
    lake = Lake(str(tmp_path / "lake")).init()
    log = retry_log()
    with pytest.raises(SubjectError, match="PatientID"):
        receive_one_study_task(Upload(trial, "ge-nih", "u1", lake), inventory_upload(up).accepted)
    assert log.retries == []
    assert len(log.failures) == 1 and "SubjectError" in log.failures[0]
