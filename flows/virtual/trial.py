"""The virtual trial run end to end through corelab's own flows (``corelab demo``).

Stages, each with a progress bar: the virtual scanners write every planned series
(:mod:`flows.virtual.plan`, two processes); the sites' uploads arrive by drop intake
(``receive_study``, visit by visit); the nightly run processes every study side by side
(``nightly_reprocess``: BIDS, the pinned anat pipeline, the QC gate, biomarkers, missing-visit
queries, escalation, the dashboard and QC pages) with the trial's clock set after the last
visit window closed; harmonization fits ComBat on the baseline visits and applies the frozen model
to every QC-passed follow-up (``harmonize``), and the model is promoted; then each planted truth
is checked (:mod:`flows.virtual.truths`).

The trial's clock: visit windows are counted from the real time a subject's baseline was
received (the tables keep only shifted scan dates), and every upload of the virtual trial
arrives within minutes; so the nightly run is told the date (``as_of``) at which the trial's
last window has closed and a week has passed, as a real night would be months later.
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows.virtual.plan import Plan, Scan, make_plan, write_trial_file

HEAD = ("niivue-images", "chris_t1.nii.gz")


class VirtualTrialError(RuntimeError):
    """A stage of the virtual trial could not run: the trial's truths cannot be checked.

    Not a stage error (tasks' CorelabError with a reason code): the demo itself failed, and the
    stage's own error is already in the run's log with its code."""
CLOCK_MARGIN_DAYS = 10          # after the last window closed: past the 5 working days of a query


@dataclass
class StageTimes:
    seconds: dict[str, float]

    def add(self, stage: str, start: float) -> None:
        self.seconds[stage] = time.perf_counter() - start


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


_SOURCE = None


def _write_scan(data: str, scan: Scan, root: str, study_uid: str) -> str:
    """One planned series (in a worker process): the subject's head on this scanner, as DICOM."""
    import SimpleITK as sitk

    from flows.virtual.scanner import read_template, subject_head, write_t1_series

    global _SOURCE
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    if _SOURCE is None:
        _SOURCE = sitk.ReadImage(str(Path(data).joinpath(*HEAD)))
    head = subject_head(_SOURCE, scan.age, scan.anatomy_seed, scan.scanner.grid)
    write_t1_series(scan.folder(Path(root)), read_template(Path(data), scan.scanner.vendor), head,
                    scan.scanner, scan.person, study_uid, scan.day, scan.anatomy_seed + 1 + scan.visit_index,
                    header=scan.header)
    return scan.key


def write_scans(plan: Plan, data: Path, root: Path, progress: Progress, workers: int = 2) -> None:
    from pydicom.uid import generate_uid

    task = progress.add_task("virtual scanners: series", total=len(plan.scans))
    # spawned, not forked: this process runs threads (the progress display, Prefect's), and a fork
    # copies their locks in whatever state they are
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_write_scan, str(data), s, str(root), generate_uid()) for s in plan.scans]
        for f in as_completed(futures):
            f.result()
            progress.advance(task)


def receive_uploads(plan: Plan, root: Path, lake_url: str, trial, progress: Progress,
                    workers: int = 2) -> list:
    """Drop intake of every upload: the sites send side by side, each visit after the one before
    (a follow-up is dated from its subject's baseline, which must be in the lake first)."""
    from concurrent.futures import ThreadPoolExecutor

    from flows.receive_study import receive_study
    from flows.runtime import start_api

    start_api()   # once, before two threads start their first flows
    uploads = plan.uploads(root)
    task = progress.add_task("intake: uploads", total=len(uploads))
    outcomes = []
    with ThreadPoolExecutor(workers) as pool:
        for visit in plan.visits:
            futures = [pool.submit(receive_study, str(folder), site, lake_url=lake_url, trial=trial)
                       for v, site, folder in uploads if v == visit]
            for f in as_completed(futures):
                outcomes += f.result()
                progress.advance(task)
    return outcomes


def process_all(lake_url: str, trial_file: str, n_series: int, as_of: datetime, progress: Progress,
                workers: int = 2) -> dict:
    """The nightly run over everything received, with a bar fed by the qc table as verdicts land."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.nightly import nightly_reprocess
    from tasks.lake.storage import open_lake
    from tasks.lake.tables import read_table

    task = progress.add_task("processing: series judged", total=n_series)
    done = threading.Event()

    def watch() -> None:
        lake = open_lake(lake_url)
        while not done.wait(2.0):
            try:
                progress.update(task, completed=_judged(read_table(lake, "qc")))
            except Exception:   # a table being written: the next look sees it
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        flow = nightly_reprocess.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))
        state = flow(lake_url, trial_file, backend="local", threads=1, as_of=as_of, return_state=True)
    finally:
        done.set()
        watcher.join()
    progress.update(task, completed=_judged(read_table(open_lake(lake_url), "qc")))
    if not state.is_completed():
        raise VirtualTrialError(f"the nightly run ended {state.type.value.lower()}: {state.message}; the "
                                "truths were not checked (the run's log says which study failed and why)")
    return state.result()


def _judged(qc) -> int:
    return int(qc.loc[qc["metric"] == "verdict", "series_uid"].nunique()) if len(qc) else 0


def harmonize_trial(lake_url: str, trial_file: str, trial_id: str, progress: Progress) -> dict:
    from flows.harmonize import harmonize
    from harmonization import model_store
    from tasks.lake.storage import open_lake

    task = progress.add_task("harmonization: fit + apply", total=2)
    summary = harmonize(lake_url, trial_file, mode="fit")
    progress.advance(task)
    model_store.promote(open_lake(lake_url), summary["fit"]["model_id"], trial_id, "corelab demo")
    progress.advance(task)
    return summary


def run_virtual_trial(data: Path, lake_url: str, console: Console, subjects: int = 4, visits: int = 2,
                      workers: int = 2, work: Path | None = None, sites: int = 3) -> tuple[bool, dict]:
    """Run the whole virtual trial; (every planted truth holds, what was made and where).

    The series are written under ``work`` (a new temporary folder by default), which is
    removed at the end, whether the run succeeded or not. With more than three sites the trial
    file names them all; it is kept in the lake as ``trial.yaml`` (``made["trial_file"]``).
    """
    from data_contracts.trial import load_trial
    from flows.virtual.truths import check_truths, truths_table
    from tasks.lake.storage import open_lake

    plan = make_plan(subjects, visits, sites=sites)
    times = StageTimes({})
    root = work or Path(tempfile.mkdtemp(prefix="corelab-virtual-"))
    trial_path = write_trial_file(plan.sites, root / "trial")
    trial_file, trial = str(trial_path), load_trial(trial_path)
    kept = None
    if sites > 3:   # the work folder goes: the lake keeps the trial file its tables were made with
        open_lake(lake_url).write_bytes("trial.yaml", trial_path.read_bytes())
        kept = f"{lake_url.rstrip('/')}/trial.yaml"
    last = trial.visits[len(plan.visits) - 1]
    as_of = datetime.now(timezone.utc) + timedelta(days=last.day + last.window_after + CLOCK_MARGIN_DAYS)
    try:
        with _progress(console) as progress:
            made = _run_stages(plan, data, root, lake_url, trial, trial_file, as_of, progress, times, workers)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    truths = check_truths(plan, trial, lake_url, made["harmonization"], as_of)
    times.add("truths", t)
    console.print(truths_table(truths))
    made.update(plan=plan, times=times.seconds, as_of=as_of, truths=truths, trial_file=kept)
    return all(t.holds for t in truths), made


def _run_stages(plan: Plan, data: Path, root: Path, lake_url: str, trial, trial_file: str, as_of: datetime,
                progress: Progress, times: StageTimes, workers: int) -> dict:
    t = time.perf_counter()
    write_scans(plan, data, root, progress, workers)
    times.add("virtual scanners", t)
    t = time.perf_counter()
    outcomes = receive_uploads(plan, root, lake_url, trial, progress, workers)
    times.add("intake", t)
    t = time.perf_counter()
    counts = process_all(lake_url, trial_file, len(plan.scans), as_of, progress, workers)
    times.add("processing (nightly)", t)
    t = time.perf_counter()
    harmonized = harmonize_trial(lake_url, trial_file, trial.trial_id, progress)
    times.add("harmonization", t)
    return {"outcomes": outcomes, "counts": counts, "harmonization": harmonized}
