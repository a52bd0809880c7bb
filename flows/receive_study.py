"""Flow ``receive_study``: accept or bounce a site's upload within seconds.

Inputs: an upload folder (or file), the site id, the trial file and the lake.
Outputs: verified de-identified DICOM in ``deid/``, rejects in ``quarantine/``
with reasons, rows in the ``studies``, ``series``, ``deviations`` and
``queries`` tables, and audit events. Returns one :class:`StudyOutcome` per
study found in the upload.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.events import emit_event
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from data_contracts.trial import TrialConfig, load_trial
from tasks.audit import append_event
from tasks.identify import SubjectError
from tasks.inbox import QuarantineRecord, quarantine, release_inbox, stage_inbox
from tasks.intake import StudyContext, receive_one_study_task, record_study_task
from tasks.inventory import Inventory, ReceivedFile, inventory_upload, upload_id
from tasks.protocol import Finding
from tasks.records import StudyOutcome
from tasks.storage import Lake, open_lake


@task(name="inventory", cache_policy=NO_CACHE)
def take_inventory(upload: Path) -> Inventory:
    return inventory_upload(upload)


@task(name="custody", cache_policy=NO_CACHE)
def take_custody(lake: Lake, site: str, upload_key: str, upload: Path, inv: Inventory) -> list[QuarantineRecord]:
    """Raw copy into the inbox; every rejected file into quarantine with its reason."""
    stage_inbox(lake, site, upload_key, upload)
    return [quarantine(lake, site, upload_key, r.rel, r.raw, r.reason, r.code, r.sha256)
            for r in inv.rejected]


@task(name="reject-study", cache_policy=NO_CACHE)
def reject_study(lake: Lake, site: str, upload_key: str, files: list[ReceivedFile], reason: str,
                 code: str) -> list[QuarantineRecord]:
    return [quarantine(lake, site, upload_key, f.rel, f.raw, f"{f.rel}: {reason}", code, f.sha256)
            for f in files]


def quarantine_finding(r: QuarantineRecord) -> Finding:
    """A rejected file as a deviation; a stray non-DICOM file (a README) is minor."""
    return Finding(kind="quarantined_file", severity="minor" if r.code == "not_dicom" else "major",
                   observed=f"{r.code} sha256:{r.sha256[:12]}",
                   message=f"file with sha256 {r.sha256[:12]} quarantined ({r.code})")


def _studies(files: list[ReceivedFile]) -> dict[str, list[ReceivedFile]]:
    out: dict[str, list[ReceivedFile]] = {}
    for f in files:
        out.setdefault(str(f.header.StudyInstanceUID), []).append(f)
    return out


def run_id() -> str | None:
    rid = flow_run.get_id()
    return str(rid) if rid else None


@flow(name="receive_study", log_prints=False)
def receive_study(upload: str, site: str, trial_file: str | None = None, lake_url: str | None = None,
                  trial: TrialConfig | None = None) -> list[StudyOutcome]:
    """Receive one upload from one site (see module docstring)."""
    log = get_run_logger()
    trial = trial or load_trial(trial_file or "trial.yaml")
    trial.site(site)  # an unknown site stops here, before anything is written
    lake = open_lake(lake_url)
    path = Path(upload)

    # 1. inventory: hash and parse every file; rejects named with their reason
    inv = take_inventory(path)
    key = upload_id(inv)
    # 2. custody: raw copy in the inbox, rejects in quarantine. Big arguments are
    # quoted: Prefect would otherwise walk every file of them looking for futures.
    rejected = take_custody(lake, site, key, path, quote(inv))
    outcomes: list[StudyOutcome] = []
    for n, files in enumerate(_studies(inv.accepted).values()):
        sc = StudyContext(trial, site, key, lake)
        # 3-5. identify, de-identify + verify, check the protocol
        try:
            outcome = receive_one_study_task(sc, quote(files))
        except (SubjectError, ValueError) as exc:
            log.error("study rejected: %s", exc)
            rejected += reject_study(lake, site, key, quote(files), str(exc), "unattributable")
            append_event(lake, "study_rejected", site=site, upload=key, n_files=len(files),
                         reason_code="unattributable")
            continue
        if outcome.already_received:
            log.info("study %s already received; nothing to do", outcome.study_key[:12])
            outcomes.append(outcome)
            continue
        if n == 0:  # files rejected at inventory belong to the upload's first study
            outcome.quarantined = rejected + outcome.quarantined
            outcome.findings += [quarantine_finding(r) for r in rejected]
            outcome.n_quarantined = len(outcome.quarantined)
        outcome.flow_run_id = run_id()
        # 6. record: tables, site queries, audit (each checked for PHI first)
        record_study_task(lake, quote(outcome), quote(outcome.matcher))
        # the processing deployment listens for this (deployments/prefect.yaml)
        emit_event("corelab.study.received", resource={"prefect.resource.id": f"corelab.study.{outcome.study_key}"},
                   payload={"study_key": outcome.study_key, "site": site, "status": outcome.status})
        outcomes.append(outcome)
    # 7. release raw copies whose de-identified copies are verified; the rest stays
    verified = {rel for o in outcomes for rel in o.verified_files}
    release_inbox(lake, site, key, verified, inv.names)
    if not inv.accepted and inv.rejected:
        append_event(lake, "upload_rejected", site=site, upload=key, n_files=len(inv.rejected),
                     quarantined_sha256=[r.sha256 for r in inv.rejected])
    return outcomes
