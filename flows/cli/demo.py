"""The demo, in one command (``make demo``).

By default the virtual trial (:mod:`flows.virtual`): three sites, one per vendor, subjects over
visits made from real anatomy by virtual scanners, planted truths checked at the end (a table of
``holds`` / ``broken``; exit 1 when one is broken).

With ``--shared``, the shared real data as each vendor's scanner wrote it:

1. Every site of the shared-data trial (data_contracts/examples/shared_data_trial.yaml, one
   site per vendor folder of ../shared/data) sends its study: intake verdicts are printed.
2. Each accepted study is processed: BIDS, the pinned anat pipeline on the T1s, the QC gate,
   biomarker rows; the wide biomarker table is exported.
3. ComBat harmonization runs on the real multi-site ABIDE table (20 sites, 1035 subjects),
   since two demo T1s are no cohort: a versioned model and an HTML report for statisticians.

Keys for pseudonyms and UIDs come from the environment; the demo sets throw-away ones when
none are set, and says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from flows.cli.common import LakeOpt, TrialOpt, console, fail, lake_url

# Site id -> upload folder inside ../shared/data.
DEMO_UPLOADS = {
    "ge-nih": "dcm_qa_nih/In/20180918GE",
    "siemens-nih": "dcm_qa_nih/In/20180918Si",
    "siemens-trio": "dcm_qa/In",
    "philips-achieva": "dcm_qa_philips/In",
    "philips-ingenia": "dcm_qa_philips_enh/In",
    "siemens-xa30": "dcm_qa_xa30/In",
    "philips-dwi": "dcm_qa_philips_dwi/In/cl",
}


def run_demo(data: Path, url: str, trial_file: Path | None, console: Console,
             backend: str = "local") -> None:
    from data_contracts import example_path
    from data_contracts.trial import load_trial
    from flows.cli.display import print_outcomes
    from flows.cli.study import run_processing
    from flows.receive_study import receive_study
    from tasks.lake.audit import verify_chain
    from tasks.lake.export import export_biomarkers
    from tasks.lake.storage import open_lake

    _demo_keys(console)
    trial = load_trial(trial_file or example_path())
    lake = open_lake(url)
    for site, rel in DEMO_UPLOADS.items():
        console.rule(f"{site}  <-  {rel}")
        outcomes = receive_study(str(data / rel), site, lake_url=url, trial=trial)
        print_outcomes(outcomes, site)
        for o in outcomes:
            if o.status != "rejected":
                run_processing(o.study.study_key, site, trial, url, backend, False)
    console.rule("biomarkers")
    wide = Path(lake.path("reports")) / "biomarkers_wide.csv" if lake.is_local else Path("biomarkers_wide.csv")
    n = export_biomarkers(lake, wide, "csv", as_wide=True)
    console.print(f"{n} rows (one per subject and session) -> {wide}")
    harmonize_abide(data, lake, console)
    report = verify_chain(lake)
    console.rule("lake")
    console.print(f"lake: {url}; audit log {'intact' if report.ok else 'BROKEN'} ({report.events} events)")


def _demo_keys(console: Console) -> None:
    """Throw-away de-identification and pseudonym keys when none are set, said out loud."""
    for env in ("CORELAB_DEID_KEY", "CORELAB_PSEUDONYM_KEY"):
        if not os.environ.get(env):
            os.environ[env] = "demo-only-key-" + env.lower()
            console.print(f"[yellow]{env} not set: using a demo-only key (never for real data)[/]")


def harmonize_abide(data: Path, lake, console: Console) -> None:
    """ComBat on ABIDE (aseg volumes), age, sex and diagnosis kept; the table, its harmonized copy
    and the report in the lake (the report names its input by what it is, not by a file that a
    temporary directory held)."""
    import tempfile

    from data_contracts.harmonization_settings import HarmonizationSettings
    from harmonization.abide import DX_NAMES, SEX_NAMES, constant_columns, load_abide
    from harmonization.service import fit_table

    console.rule("harmonization (ABIDE, 20 sites)")
    table = load_abide(data, tables=("aseg",))
    work = Path(lake.path("exports")) if lake.is_local else Path(tempfile.mkdtemp(prefix="corelab-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "abide_aseg.csv"
    table.to_csv(src, index=False)
    settings = HarmonizationSettings(batch="site", covariates=["AGE", "SEX", "DX"],
                                     covariate_levels={"SEX": SEX_NAMES, "DX": DX_NAMES})
    reports = Path(lake.path("reports")) if lake.is_local else work
    # four aseg hypointensity volumes are 0 in every subject: nothing to harmonize there
    outcome = fit_table(lake, str(src), "SITE", settings, str(work / "abide_aseg_harmonized.csv"),
                        report_path=str(reports / "harmonization_abide.html"),
                        exclude=constant_columns(table),
                        source=f"ABIDE I aseg volumes ({len(table)} subjects, {table['SITE'].nunique()} sites; "
                               "the shared data's pcp_abide and FreeSurfer 6 stats)")
    console.print(f"model {outcome.model_id}: {outcome.harmonized} subjects harmonized; "
                  f"report {outcome.outputs['report']}")


def demo(data: Path = typer.Option(Path("../shared/data"), help="the shared real data"),
         lake: Optional[str] = LakeOpt,
         trial: Optional[Path] = TrialOpt,
         subjects: int = typer.Option(4, help="virtual trial: subjects per site (at least 4)"),
         visits: int = typer.Option(2, help="virtual trial: visits per subject (2 or 3)"),
         sites: int = typer.Option(3, help="virtual trial: sites (3 carry the planted truths; more have none)"),
         shared: bool = typer.Option(False, "--shared",
                                     help="the shared real series instead of the virtual trial")) -> None:
    """Run corelab end to end: the virtual trial (default) or the shared real series (--shared)."""
    if not data.exists():
        fail(f"{data}: the shared data folder is missing")
    if shared:
        run_demo(data, lake_url(lake), trial, console)
        return
    if trial is not None:
        fail("--trial: the virtual trial has its own trial file (data_contracts/examples/virtual_trial.yaml)")
    from flows.virtual.scanner import TEMPLATES
    from flows.virtual.trial import HEAD

    needed = [data.joinpath(*HEAD)] + [data.joinpath(*t) for t in TEMPLATES.values()]
    absent = [str(p) for p in needed if not p.exists()]
    if absent:
        fail(f"{data}: the virtual trial's real head and vendor headers are missing: {', '.join(absent)}")
    if subjects < 4 or visits not in (2, 3) or not 3 <= sites <= 26:
        fail(f"--subjects {subjects} --visits {visits} --sites {sites}: at least 4 subjects per site, "
             "2 or 3 visits, and 3 to 26 sites")
    run_virtual(data, lake_url(lake), subjects, visits, sites)


def run_virtual(data: Path, url: str, subjects: int, visits: int, sites: int = 3) -> None:
    from data_contracts import example_path
    from data_contracts.trial import load_trial
    from flows.virtual.plan import TRIAL_FILE
    from flows.virtual.trial import VirtualTrialError, run_virtual_trial
    from tasks.lake.storage import open_lake
    from tasks.lake.tables import read_table

    studies = read_table(open_lake(url), "studies")
    if len(studies) and (studies["trial_id"] == load_trial(example_path(TRIAL_FILE)).trial_id).any():
        fail(f"{url} already holds the virtual trial: its subjects would arrive twice. "
             "Remove it or give another --lake")
    _demo_keys(console)
    try:
        ok, made = run_virtual_trial(data, url, console, subjects, visits, sites=sites)
    except VirtualTrialError as exc:
        fail(str(exc), 1)
    times = made["times"]
    console.rule("stage times")
    for stage, sec in times.items():
        console.print(f"{stage:<24} {sec:6.1f} s")
    console.print(f"{'total':<24} {sum(times.values()):6.1f} s")
    console.rule("outputs")
    reports = url.rstrip("/") + "/reports"
    h = made["harmonization"]["fit"]
    for what, where in (("lake", url), ("trial file", made["trial_file"] or example_path(TRIAL_FILE)),
                        ("site dashboard", f"{reports}/sites.html"),
                        ("QC review pages", f"{reports}/qc/"),
                        ("harmonization report", f"{url.rstrip('/')}/{h['outputs']['report']}"),
                        ("harmonized biomarkers", f"{url.rstrip('/')}/tables/biomarkers_harmonized/")):
        console.print(f"{what:<24} {where}")
    if not ok:
        fail("a planted truth is broken (see the table above)", 1)
