"""Typed failures: every stage error has a known reason code, and only transient ones are retried."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from prefect.states import Completed, Failed

import tasks
from data_contracts.reasons import REASONS, codes_in
from data_contracts.schemas import DEVIATIONS, QC
from tasks.errors import CorelabError, is_transient, transient
from tasks.intake.identify import AttributionError, StudyDateError, SubjectError
from tasks.intake.inventory import InventoryError
from tasks.lake.storage import StorageUnavailable
from tasks.lake.tables import SchemaViolation


def _stage_errors() -> list[type[CorelabError]]:
    for mod in pkgutil.walk_packages(tasks.__path__, "tasks."):
        importlib.import_module(mod.name)
    found, todo = [], [CorelabError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def test_every_stage_error_names_a_known_reason_code():
    errors = _stage_errors()
    assert len(errors) >= 20, [e.__name__ for e in errors]
    for cls in errors:
        assert cls.code in REASONS, (cls.__name__, cls.code)
        assert inspect.getmodule(cls).__name__.startswith("tasks."), cls


def test_an_unknown_code_is_refused_where_it_is_made():
    with pytest.raises(ValueError, match="'no_such_code' is not in data_contracts.reasons"):
        CorelabError("boom", "no_such_code")
    assert InventoryError("pixel_size", "x").code == "pixel_size"


def test_the_tables_accept_exactly_the_reason_codes():
    assert QC.allowed["reason_code"] == DEVIATIONS.allowed["reason_code"] == frozenset(REASONS)


def test_only_transient_errors_are_retryable():
    assert {c for c, r in REASONS.items() if r.retryable} == {"storage_unavailable", "engine_unavailable"}
    assert is_transient(StorageUnavailable("lake s3://x: write_bytes failed"))
    for exc in (InventoryError("unreadable", "truncated"), SubjectError("no PatientID"),
                SchemaViolation("bad row"), ZeroDivisionError(), FileNotFoundError("gone"), None):
        assert not is_transient(exc), exc


def test_the_retry_condition_reads_the_failed_state():
    assert transient(None, None, Failed(data=StorageUnavailable("down")))
    assert not transient(None, None, Failed(data=InventoryError("corrupt_gzip", "corrupt gzip")))
    assert not transient(None, None, Failed(data=RuntimeError("a bug")))
    assert not transient(None, None, Completed(data=1))


def test_attribution_errors_are_one_family():
    assert issubclass(SubjectError, AttributionError) and issubclass(StudyDateError, AttributionError)
    assert SubjectError("x").code == StudyDateError("x").code == "unattributable"
    assert "unattributable" in codes_in("input") and "engine_missing" in codes_in("infrastructure")
