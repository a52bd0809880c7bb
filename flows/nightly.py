"""Flow ``nightly_reprocess`` (cron): every study that has something left to do.

Inputs: the lake, the trial file and the container backend. For every accepted
study it runs ``process_study``, which converts what is not yet in BIDS and runs
each pipeline version that has not judged a series yet: new studies, and all
studies after a pipeline version change. Series whose pipeline could not run at
all are retried: their verdict's reason code is in the ``infrastructure`` category
of data_contracts/reasons.py (no engine, a refused image); a pipeline that ran and
failed on its input is not retried blindly. A study whose processing fails outright
(storage or an engine down past the task's retries) leaves no verdict: tonight's
run goes on with the other studies and ends Failed (red), and tomorrow's tries it
again. Returns counts.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Failed

from data_contracts.trial import load_trial
from flows.process_study import process_study
from tasks.lake import tables
from tasks.lake.storage import open_lake
from tasks.qc.record import clear_retryable


@flow(name="nightly_reprocess")
def nightly_reprocess(lake_url: str, trial_file: str, backend: str = "local") -> dict[str, int]:
    """Process whatever is new, failed-retryable or pipeline-changed (see module docstring)."""
    log = get_run_logger()
    trial = load_trial(trial_file)
    lake = open_lake(lake_url)
    studies = tables.read_table(lake, "studies")
    studies = studies[studies.status != "rejected"] if len(studies) else studies
    retried = sum(clear_retryable(lake, site) for site in sorted(set(studies.get("site", []))))
    processed, failed = 0, []
    for row in studies.itertuples():
        # one study's failed run (storage or engine down past its retries) does not stop the others
        state = process_study(row.study_key, row.site, lake_url=lake_url, backend=backend, trial=trial,
                              return_state=True)
        if state.is_completed():
            processed += len(state.result())
        else:
            failed.append(row.study_key)
            log.error("study %s: process_study %s (%s); tomorrow's run tries again", row.study_key[:16],
                      state.type.value.lower(), state.message)
    log.info("%d series processed (%d retried) in %d studies", processed, retried, len(studies))
    counts = {"studies": len(studies), "series_processed": processed, "retried": retried}
    if failed:  # red in Prefect: a night with work left undone is not a success
        return Failed(message=f"{len(failed)} of {len(studies)} studies failed to process: {counts}")
    return counts
