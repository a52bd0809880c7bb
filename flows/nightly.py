"""Flow ``nightly_reprocess`` (cron): every study that has something left to do, side by side.

Inputs: the lake, the trial file and the container backend. It first withdraws verdicts that
older versions wrote for runs that never started (:func:`tasks.qc.record.clear_retryable`), then
selects exactly the studies :func:`tasks.qc.due.studies_due` finds work for: never processed, left
without a verdict by a run that could not start (no engine, a refused image), or judged by a
pipeline version other than the current one. Nothing else is touched. The selected studies run
``process_study`` in parallel through the flow's task runner (threads by default, Dask when the
caller gives a DaskTaskRunner). A study whose processing fails (storage or an engine down past the
task's retries, a pipeline that could not start) leaves no verdict: tonight's run goes on with
the other studies and ends Failed (red), and tomorrow's selects it again. Last, visits whose
window closed with nothing received become deviations and site queries, site queries past
their due date are escalated, and it writes the site dashboard (``reports/sites.html``) from the
tables as they stand, with a QC review page for each series judged since their page was made.
``as_of`` is the trial's clock (now by default; the virtual trial runs its night months on).
Returns counts.
"""

from __future__ import annotations

from datetime import datetime

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from data_contracts.trial import TrialConfig, load_trial
from pipelines.registry import get_spec, names
from tasks.errors import TRANSIENT_RETRIES
from tasks.lake.storage import open_lake
from tasks.qc.due import studies_due
from tasks.qc.queries import escalate_overdue
from tasks.qc.record import clear_retryable
from tasks.report.missing import record_missing_visits
from tasks.report.qc_page import write_qc_pages
from tasks.report.sites_page import write_sites_page


@task(name="process-study", cache_policy=NO_CACHE)
def process_study_run(study_key: str, site: str, lake_url: str, backend: str, trial: TrialConfig,
                      threads: int | None = None) -> int:
    """One study's ``process_study`` run (a subflow): the number of series it judged; its error, if any.

    The flow is imported here, not at the top: on a Dask worker this task arrives pickled by value,
    and a module-level flow object would travel without the names its annotations need.
    """
    from flows.process_study import process_study

    return len(process_study(study_key, site, lake_url=lake_url, backend=backend, trial=trial, threads=threads))


@task(name="record-missing-visits", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def record_missing_visits_task(lake_url: str, trial: TrialConfig, as_of: datetime | None = None) -> list[str]:
    return record_missing_visits(open_lake(lake_url), trial, as_of)


@task(name="escalate-overdue-queries", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def escalate_overdue_task(lake_url: str, trial: TrialConfig, as_of: datetime | None = None) -> list[str]:
    return escalate_overdue(open_lake(lake_url), trial, as_of)


@task(name="refresh-sites-page", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def refresh_sites_page(lake_url: str, trial: TrialConfig, as_of: datetime | None = None) -> str:
    """Write the QC pages of series judged or overridden since their page, then reports/sites.html
    (linking them); its lake path."""
    from tasks.lake.versions import corelab_version

    lake = open_lake(lake_url)
    write_qc_pages(lake, version=corelab_version(), only_changed=True)
    return write_sites_page(lake, trial, as_of, version=corelab_version())


@flow(name="nightly_reprocess")
def nightly_reprocess(lake_url: str, trial_file: str, backend: str = "local",
                      threads: int | None = None, as_of: datetime | None = None) -> dict[str, int]:
    """Process whatever is new, failed-retryable or pipeline-changed (see module docstring).

    ``threads``: the threads each pipeline run may use (default: the pipeline's own); with N
    studies side by side on C cores, C / N keeps them from competing for the same cores.
    """
    log = get_run_logger()
    trial = load_trial(trial_file)
    lake = open_lake(lake_url)
    sites = sorted({s.id for s in trial.sites})
    # 1. withdraw old verdicts of runs that never started (and their deviations and queries)
    retried = sum(clear_retryable(lake, site) for site in sites)
    # 2. exactly the studies with work left
    due = studies_due(lake, trial, [get_spec(n) for n in names()])
    for d in due:
        log.info("study %s (%s) is due: %s", d.study_key[:16], d.site, "; ".join(d.reasons))
    # 3. side by side; one study's failure does not stop the others
    futures = [process_study_run.submit(d.study_key, d.site, lake_url, backend, trial, threads) for d in due]
    processed, failed = 0, []
    for d, future in zip(due, futures):
        future.wait()
        state = future.state
        if state.is_completed():
            processed += state.result()
        else:
            failed.append(d.study_key)
            log.error("study %s: process_study %s (%s); tomorrow's run tries again", d.study_key[:16],
                      state.type.value.lower(), state.message)
    counts = {"studies_due": len(due), "series_processed": processed, "retried": retried,
              "failed": len(failed)}
    # 4. missing visits raise queries; queries past their due date are escalated (they head every list)
    missing = record_missing_visits_task(lake_url, trial, as_of)
    if missing:
        log.warning("%d visits missing (window closed, nothing received): deviations and site queries "
                    "recorded", len(missing))
    counts["missing_visits"] = len(missing)
    escalated = escalate_overdue_task(lake_url, trial, as_of)
    if escalated:
        log.warning("%d overdue site queries escalated: %s", len(escalated), ", ".join(escalated))
    # 5. the site dashboard, refreshed from tonight's tables
    page = refresh_sites_page(lake_url, trial, as_of)
    log.info("site dashboard refreshed: %s", page)
    log.info("%d series processed (%d withdrawn verdicts retried) in %d due studies, %d failed",
             processed, retried, len(due), len(failed))
    if failed:  # red in Prefect: a night with work left undone is not a success
        return Failed(message=f"{len(failed)} of {len(due)} due studies failed to process: {counts}")
    return counts
