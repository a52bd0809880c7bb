"""Flow ``receive_study``: accept or bounce a site's upload within seconds.

Inputs: an upload folder (or file), the site id, the trial file and the lake.
Outputs: verified de-identified DICOM in ``deid/``, rejects in ``quarantine/``
with reasons, rows in the ``studies``, ``series``, ``deviations`` and
``queries`` tables, and audit events. Returns one :class:`StudyOutcome` per
study found in the upload.

A study that cannot be attributed to a subject or a visit is quarantined with its reason.
Any other error (a bug, storage that stays down after the task's retries) fails the flow run
(red in Prefect) with an audit event naming the error's type and code; the raw upload stays in
``inbox/``, so nothing received is lost and the run can be repeated.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.utilities.annotations import quote

from data_contracts.trial import TrialConfig, load_trial
from flows.runtime import flow_run_id, load_secrets, trial_secrets
from tasks.intake.custody import QuarantineRecord, quarantine_files_task, release_inbox, take_custody_task
from tasks.intake.identify import AttributionError
from tasks.intake.inventory import ReceivedFile, inventory_task, upload_id
from tasks.lake.audit import append_event
from tasks.lake.storage import Lake, open_lake
from tasks.receive.record import StudyOutcome, record_study_task
from tasks.receive.study import Upload, quarantine_finding, receive_one_study_task


def _audit_failure(lake: Lake, site: str, upload_key: str, n_files: int, exc: Exception) -> None:
    """An audit event for a study that failed without a verdict (the error's type and code, never its text).

    When the lake is what failed, the event cannot be written either: that is logged, and the
    original error is the one the run fails with.
    """
    try:
        append_event(lake, "study_failed", site=site, upload=upload_key, n_files=n_files,
                     error=type(exc).__name__, reason_code=getattr(exc, "code", None))
    except Exception as audit_exc:
        get_run_logger().error("the failure could not be audited (%s: %s)", type(audit_exc).__name__,
                               getattr(audit_exc, "code", ""))


def _studies(files: list[ReceivedFile]) -> dict[str, list[ReceivedFile]]:
    out: dict[str, list[ReceivedFile]] = {}
    for f in files:
        out.setdefault(str(f.header.StudyInstanceUID), []).append(f)
    return out


@flow(name="receive_study", log_prints=False)
def receive_study(upload: str, site: str, trial_file: str | None = None, lake_url: str | None = None,
                  trial: TrialConfig | None = None) -> list[StudyOutcome]:
    """Receive one upload from one site (see module docstring)."""
    log = get_run_logger()
    trial = trial or load_trial(trial_file or "trial.yaml")
    load_secrets(trial_secrets(trial, lake_url))  # from Prefect Secret blocks when not in the environment
    trial.site(site)  # an unknown site stops here, before anything is written
    lake = open_lake(lake_url)
    path = Path(upload)

    # 1. inventory: hash and parse every file; rejects named with their reason
    inv = inventory_task(path)
    key = upload_id(inv)
    # 2. custody: raw copy in the inbox, rejects in quarantine. Big arguments are
    # quoted: Prefect would otherwise walk every file of them looking for futures.
    rejected: list[QuarantineRecord] = take_custody_task(lake, site, key, path, quote(inv))
    outcomes: list[StudyOutcome] = []
    for n, files in enumerate(_studies(inv.accepted).values()):
        # 3-5. identify, de-identify + verify, check the protocol
        try:
            outcome = receive_one_study_task(Upload(trial, site, key, lake, inv.absent()), quote(files))
        except AttributionError as exc:  # whose or when is unknown: the site must correct it
            log.error("study rejected (%s): %s", exc.code, exc)
            records = quarantine_files_task(lake, site, key, quote(files), str(exc), exc.code)
            rejected += records
            if any(r.new for r in records):  # the same refused study sent again is not a new event
                append_event(lake, "study_rejected", site=site, upload=key, n_files=len(files),
                             reason_code=exc.code)
            continue
        except Exception as exc:  # a bug or an outage: no verdict; the raw upload stays in the inbox
            _audit_failure(lake, site, key, len(files), exc)
            raise
        if outcome.already_received:
            log.info("study %s already received; nothing to do", outcome.study.study_key[:12])
            outcomes.append(outcome)
            continue
        if n == 0:  # files rejected at inventory belong to the upload's first study
            outcome.quarantined = rejected + outcome.quarantined
            outcome.findings += [quarantine_finding(r) for r in rejected]
        outcome.flow_run_id = flow_run_id()
        # 6. record: tables, site queries, audit (each checked for PHI first)
        try:
            record_study_task(lake, quote(outcome), quote(outcome.matcher))
        except Exception as exc:
            _audit_failure(lake, site, key, len(files), exc)
            raise
        # the processing deployment listens for this (deployments/prefect.yaml)
        study_key = outcome.study.study_key
        emit_event("corelab.study.received", resource={"prefect.resource.id": f"corelab.study.{study_key}"},
                   payload={"study_key": study_key, "site": site, "status": outcome.status})
        outcomes.append(outcome)
    # 7. release raw copies whose de-identified copies are verified; the rest stays
    verified = {rel for o in outcomes for rel in o.verified_files}
    release_inbox(lake, site, key, verified, inv.names)
    if not inv.accepted and any(r.new for r in rejected):
        append_event(lake, "upload_rejected", site=site, upload=key, n_files=len(inv.rejected),
                     quarantined_sha256=[r.sha256 for r in inv.rejected])
    return outcomes
