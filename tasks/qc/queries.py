"""A site query's life: open -> answered (by the site) -> resolved, or escalated when overdue.

A query is raised for each major deviation (:mod:`tasks.conformance.findings`) and for each QC
FAIL (:mod:`tasks.qc.record`). Then:

- the site answers it (``corelab queries answer``: a comment, or that it re-sent the series);
- the core lab resolves it (``corelab queries resolve``), or it resolves itself when a re-sent
  series of the same type, subject and visit passes the QC gate (:func:`resolve_by_resend`);
- it is escalated when no one resolved it within the trial's ``query_due_working_days`` (Monday
  to Friday; :func:`escalate_overdue`, run nightly); an escalated query stays first on every list.

Each step is a row update (status, who, when, text) and an audit event with the acting user.
``closed`` is corelab withdrawing a query about an infrastructure failure (:mod:`tasks.qc.record`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from data_contracts.trial import TrialConfig
from tasks.errors import CorelabError
from tasks.lake import tables
from tasks.lake.audit import append_event
from tasks.lake.storage import Lake

UNRESOLVED = ("open", "answered", "escalated")


class QueryError(CorelabError, ValueError):
    """A query id that names no query or several, or a step its state does not allow."""

    code = "query_invalid"


@dataclass(frozen=True)
class Found:
    site: str
    row: dict


def due_date(created_at: pd.Timestamp | datetime, working_days: int) -> pd.Timestamp:
    """The moment a query raised at ``created_at`` falls due: ``working_days`` Mon-Fri days later."""
    t = pd.Timestamp(created_at)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    # raised on a weekend: counted from the Friday before, so it is due at the same time of day
    # on the 5th working day after it (Saturday -> the next Friday), never a day later
    day = np.busday_offset(np.datetime64(t.date()), working_days, roll="backward")
    return pd.Timestamp(day).tz_localize("UTC") + (t - t.normalize())


def find_query(lake: Lake, query: str) -> Found:
    """The one query whose id starts with ``query`` (ids are printed by ``corelab queries list``)."""
    q = tables.read_table(lake, "queries")
    hit = q[q["query_id"].str.startswith(query)] if len(q) and query else q.iloc[0:0]
    if hit.empty:
        raise QueryError(f"no query {query!r} in the lake (`corelab queries list` shows them)")
    if len(hit) > 1:
        raise QueryError(f"{query!r} names {len(hit)} queries; give more of the id")
    row = hit.iloc[0].to_dict()
    return Found(str(row.pop("site")), row)


def _step(lake: Lake, site: str, query_id: str, allowed: tuple[str, ...], change) -> bool:
    """Apply ``change`` to the query under its partition's lock if its status is still one of
    ``allowed`` (another step may have moved it since it was read); whether it changed."""
    return tables.update_rows(lake, "queries", site, {"query_id": query_id},
                              lambda q: change(q) if q["status"] in allowed else q) > 0


def answer(lake: Lake, query: str, text: str, by: str, resent: bool = False,
           now: datetime | None = None) -> dict:
    """The site's answer (a comment; ``resent``: it sent the series again)."""
    found = find_query(lake, query)
    if found.row["status"] not in UNRESOLVED:
        raise QueryError(f"query {found.row['query_id']} is {found.row['status']}: nothing to answer")
    if not text.strip():
        raise QueryError("an answer needs its text (what the site did or says)")
    text = ("re-sent: " if resent else "") + text.strip()
    at = now or datetime.now(timezone.utc)
    # an escalated query stays escalated when the site answers (the answer is recorded with it)
    changes = {"answer": text, "answered_by": by, "answered_at": at}
    if not _step(lake, found.site, found.row["query_id"], UNRESOLVED,
                 lambda q: {**q, **changes, "status": "escalated" if q["status"] == "escalated" else "answered"}):
        raise QueryError(f"query {found.row['query_id']} changed meanwhile: nothing to answer")
    row = {**found.row, **changes}
    append_event(lake, "query_answered", actor=by, site=found.site, query_id=row["query_id"],
                 study_key=row["study_key"], answer=text)
    return row


def resolve(lake: Lake, query: str, resolution: str, by: str, now: datetime | None = None) -> dict:
    """The core lab closes the question (accepted as is, corrected, re-sent and checked)."""
    found = find_query(lake, query)
    if found.row["status"] not in UNRESOLVED:
        raise QueryError(f"query {found.row['query_id']} is {found.row['status']} already")
    if not resolution.strip():
        raise QueryError("a resolution needs its text (why the question is settled)")
    changes = {"status": "resolved", "resolution": resolution.strip(), "resolved_by": by,
               "resolved_at": now or datetime.now(timezone.utc)}
    if not _step(lake, found.site, found.row["query_id"], UNRESOLVED, lambda q: {**q, **changes}):
        raise QueryError(f"query {found.row['query_id']} changed meanwhile: resolved or withdrawn already")
    row = {**found.row, **changes}
    append_event(lake, "query_resolved", actor=by, site=found.site, query_id=row["query_id"],
                 study_key=row["study_key"], resolution=row["resolution"])
    return row


def escalate_overdue(lake: Lake, trial: TrialConfig, now: datetime | None = None) -> list[str]:
    """Escalate every open or answered query past its due date; the ids escalated."""
    at = pd.Timestamp(now or datetime.now(timezone.utc))
    at = at.tz_localize("UTC") if at.tzinfo is None else at
    q = tables.read_table(lake, "queries")
    out = []
    for r in q[q["status"].isin(("open", "answered"))].itertuples() if len(q) else []:
        due = due_date(r.created_at, trial.query_due_working_days)
        if at <= due:
            continue
        if not _step(lake, r.site, r.query_id, ("open", "answered"),
                     lambda row, at=at: {**row, "status": "escalated", "escalated_at": at.to_pydatetime()}):
            continue
        append_event(lake, "query_escalated", actor="corelab", site=r.site, query_id=r.query_id,
                     study_key=r.study_key, due=due.isoformat())
        out.append(r.query_id)
    return out


def resolve_by_resend(lake: Lake, site: str, subject: str, session: str, pipeline: str,
                      passed_series: str, now: datetime | None = None) -> list[str]:
    """Resolve the unresolved QC FAIL queries a passing re-send answers; the ids resolved.

    A query resolves itself when its deviation is a ``qc_fail`` of ``pipeline`` on a series of
    the same type, subject and visit as ``passed_series``, which has just passed. Only the queries
    table is read when the visit has no unresolved query (every PASS calls this).
    """
    q = tables.read_table(lake, "queries", [site])
    if q.empty:
        return []
    q = q[q["status"].isin(UNRESOLVED) & (q["subject"] == subject) & (q["session"] == session)]
    if q.empty:
        return []
    series = tables.read_table(lake, "series", [site])
    types = dict(zip(series["series_uid"], series["series_type"]))
    series_type = types.get(passed_series)
    if not series_type:
        return []
    dev = tables.read_table(lake, "deviations", [site])
    failed = dev[(dev["kind"] == "qc_fail") & (dev["parameter"] == pipeline)
                 & (dev["series_uid"] != passed_series)
                 & dev["series_uid"].map(lambda uid: types.get(uid) == series_type)]
    text = f"a re-sent {series_type} series of this visit passed {pipeline} QC: {passed_series}"
    return _resolve_each(lake, site, q[q["deviation_id"].isin(set(failed["deviation_id"]))], text, "corelab", now)


def resolve_for_series(lake: Lake, site: str, series_uid: str, pipeline: str, by: str, reason: str,
                       now: datetime | None = None) -> list[str]:
    """Resolve the unresolved QC FAIL queries of one series and pipeline (a reviewer passed it)."""
    q = tables.read_table(lake, "queries", [site])
    dev = tables.read_table(lake, "deviations", [site])
    if q.empty or dev.empty:
        return []
    mine = set(dev.loc[(dev["kind"] == "qc_fail") & (dev["series_uid"] == series_uid)
                       & (dev["parameter"] == pipeline), "deviation_id"])
    text = f"the series was passed by a reviewer: {reason}"
    return _resolve_each(lake, site, q[q["status"].isin(UNRESOLVED) & q["deviation_id"].isin(mine)], text, by, now)


def _resolve_each(lake: Lake, site: str, queries: pd.DataFrame, text: str, by: str,
                  now: datetime | None) -> list[str]:
    """Resolve each of ``queries`` still unresolved (audited as ``by``); the ids resolved."""
    at = now or datetime.now(timezone.utc)
    changes = {"status": "resolved", "resolution": text, "resolved_by": by, "resolved_at": at}
    out = []
    for r in queries.itertuples():
        if _step(lake, site, r.query_id, UNRESOLVED, lambda row: {**row, **changes}):
            append_event(lake, "query_resolved", actor=by, site=site, query_id=r.query_id, study_key=r.study_key,
                         resolution=text)
            out.append(r.query_id)
    return out
