"""``corelab harmonize``: fit and apply ComBat models from the command line.

Table mode (any CSV/TSV/Parquet a statistician has)::

    corelab harmonize fit --table abide.csv --batch SITE --covariates AGE,SEX,DX \\
        [--smooth AGE] [--min-site-n 20] --out abide_harmonized.csv [--report report.html]
    corelab harmonize apply MODEL_ID --table new.csv --out new_harmonized.csv

Lake mode (the trial's QC-passed ``biomarkers``; runs the Prefect flow ``harmonize``)::

    corelab harmonize fit --lake LAKE --trial trial.yaml --covariates-table covariates.tsv
    corelab harmonize apply MODEL_ID --lake LAKE --trial trial.yaml --covariates-table covariates.tsv

The trial's promoted model (what the nightly ``harmonize-nightly-apply`` applies, and
``apply`` in lake mode without a MODEL_ID)::

    corelab harmonize promote MODEL_ID [--trial trial.yaml] [--lake LAKE]   (as the authenticated user)
    corelab harmonize current [--trial trial.yaml] [--lake LAKE]    (or: promote --show)

Models are stored in the lake (``--lake``, else $CORELAB_LAKE, else ./corelab-lake)
under ``models/harmonization/<model_id>/``. Exit status 2 means the input was
refused; the message says why and what to change.
"""

from __future__ import annotations

# harmonization's model store and service are imported where a command uses them: they load
# statsmodels, matplotlib and Prefect (2-3 s), and `corelab --help` must answer in under a second
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from pydantic import ValidationError

from data_contracts.harmonization_settings import HarmonizationSettings
from data_contracts.trial import TrialConfigError, load_trial
from flows.cli.common import TrialOpt, authenticated_user, fail, trial_path
from harmonization.errors import HarmonizationError
from tasks.lake.storage import open_lake

if TYPE_CHECKING:
    from harmonization import service

COVARIATES_HELP = "covariates keyed by subject (lake mode; default: the studies table's age, sex, weight, height)"
app = typer.Typer(help="ComBat harmonization across sites (neuroHarmonize): fit, apply, promote, "
                       "list models.",
                  no_args_is_help=True)


def _split(text: Optional[str]) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _levels(texts: Optional[list[str]]) -> dict[str, dict[str, str]]:
    """``--levels SEX:1=male,2=female`` (repeatable) as {covariate: {code: name}}."""
    out: dict[str, dict[str, str]] = {}
    for text in texts or []:
        name, sep, pairs = text.partition(":")
        codes = [p.split("=", 1) for p in _split(pairs)]
        if not sep or not name.strip() or not codes or any(len(c) != 2 or not c[0].strip() for c in codes):
            fail(f"--levels {text!r}: write COVARIATE:CODE=NAME,CODE=NAME, e.g. SEX:1=male,2=female")
        out[name.strip()] = {c.strip(): n.strip() for c, n in codes}
    return out


def _report(outcome: service.Outcome, verb: str) -> None:
    for f in outcome.findings:
        typer.secho(f"{f.level}: {f.message}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"{verb} {outcome.harmonized} of {outcome.rows} rows with model {outcome.model_id}")
    for kind, where in outcome.outputs.items():
        typer.echo(f"  {kind}: {where}")


def _lake_flow(lake: Optional[str], trial: Optional[str], covariates_table: Optional[str],
               mode: str, model_id: Optional[str] = None, only_new: bool = True) -> None:
    if not trial:
        fail("lake mode needs --trial FILE (and --covariates-table FILE unless the covariates are the "
             "headers' age and sex the studies table keeps), or give --table FILE for table mode")
    from flows.harmonize import harmonize  # the flow starts Prefect; only lake mode needs it
    from harmonization import service

    try:
        summary = harmonize(lake_url=open_lake(lake).url, trial_file=trial,
                            covariates_file=covariates_table, mode=mode, model_id=model_id,
                            only_new=only_new)
    except (HarmonizationError, TrialConfigError) as exc:
        fail(str(exc))
    typer.echo(service.summary_markdown(summary))


@app.command()
def fit(
    table: Optional[str] = typer.Option(None, help="CSV/TSV/Parquet, one row per scan (table mode)"),
    batch: Optional[str] = typer.Option(None, help="batch (site) column of --table"),
    covariates: Optional[str] = typer.Option(None, help="biological covariates to keep, e.g. AGE,SEX,DX"),
    smooth: Optional[str] = typer.Option(None, help="covariates modelled as smooth (ComBat-GAM), e.g. AGE"),
    categorical: Optional[str] = typer.Option(None, help="numeric covariates to treat as categories"),
    levels: Optional[list[str]] = typer.Option(None, "--levels", help="names of a coded covariate's levels for the "
                                                                      "report (makes it categorical), e.g. "
                                                                      "SEX:1=male,2=female; repeatable"),
    features: Optional[str] = typer.Option(None, help="feature columns or globs (default: every other numeric column)"),
    exclude: Optional[str] = typer.Option(None, help="columns or globs never harmonized (ids, constants)"),
    min_site_n: int = typer.Option(20, help="smallest batch ComBat may estimate"),
    small_site: str = typer.Option("refuse", help="refuse | pool batches below --min-site-n"),
    max_confounding: float = typer.Option(0.8, help="refuse above this covariate-site association"),
    seed: int = typer.Option(0, help="seed of the smooth-term penalty search"),
    subject: Optional[str] = typer.Option(None, help="subject column (default: one named subject, participant_id, "
                                                     "SUB_ID ...): names rows in messages, finds repeated scans"),
    repeated: str = typer.Option("refuse", help="subjects with several scans: refuse | independent | "
                                                "longitudinal (a random intercept per subject, Beer 2020)"),
    eb: bool = typer.Option(True, "--eb/--no-eb", help="empirical Bayes shrinkage of the site estimates"),
    parametric: bool = typer.Option(True, "--parametric/--non-parametric",
                                    help="parametric or non-parametric empirical Bayes priors"),
    mean_only: bool = typer.Option(False, "--mean-only", help="adjust site means only, never the scale"),
    covbat: bool = typer.Option(False, "--covbat", help="harmonize the features' covariance across sites too "
                                                      "(CovBat, Chen et al. 2022)"),
    covbat_variance: float = typer.Option(0.95, help="CovBat: share of the residual variance whose principal "
                                                     "components are harmonized"),
    missing: str = typer.Option("available-case", help="missing values: available-case (each feature on the "
                                                       "rows that have it; missing stays missing) | "
                                                       "complete-scans (refuse them)"),
    ref_batch: Optional[str] = typer.Option(None, "--ref-batch",
                                            help="reference site: its values stay as measured, the others "
                                                 "are brought onto it"),
    out: Optional[str] = typer.Option(None, help="harmonized table (.csv/.tsv/.parquet)"),
    report: Optional[str] = typer.Option(None, help="HTML report (a .json of it is written beside)"),
    lake: Optional[str] = typer.Option(None, help="lake holding the models (and biomarkers in lake mode)"),
    trial: Optional[str] = typer.Option(None, help="trial YAML (lake mode)"),
    covariates_table: Optional[str] = typer.Option(None, help=COVARIATES_HELP),
) -> None:
    """Fit a ComBat model, store it, and harmonize the rows it was fitted on."""
    if table is None:
        _lake_flow(lake, trial, covariates_table, "fit")
        return
    if not batch or not out:
        fail("table mode needs --batch COL and --out FILE (and --covariates A,B,C to keep their effects)")
    from harmonization import service
    try:
        settings = HarmonizationSettings(
            batch="site", covariates=_split(covariates), smooth_terms=_split(smooth),
            categorical_covariates=_split(categorical), min_site_n=min_site_n,
            small_site=small_site, max_confounding=max_confounding, seed=seed, eb=eb,
            parametric=parametric, mean_only=mean_only, ref_batch=ref_batch, repeated=repeated,
            missing=missing.replace("-", "_"), covariate_levels=_levels(levels), covbat=covbat,
            covbat_variance=covbat_variance)
    except ValidationError as exc:
        fail("invalid options: " + "; ".join(e["msg"] for e in exc.errors()))
    try:
        outcome = service.fit_table(open_lake(lake), table, batch, settings, out, report,
                                    _split(features) or None, _split(exclude), subject)
    except HarmonizationError as exc:
        fail(str(exc) + (f"\n(report of the refusal: {report})" if report else ""))
    _report(outcome, "harmonized")


@app.command()
def apply(
    model_id: Optional[str] = typer.Argument(
        None, help="id of a stored model (hm-...); lake mode without it: the trial's promoted model"),
    table: Optional[str] = typer.Option(None, help="CSV/TSV/Parquet to harmonize (table mode)"),
    batch: Optional[str] = typer.Option(None, help="batch column (default: the one the model was fitted with)"),
    out: Optional[str] = typer.Option(None, help="harmonized table (.csv/.tsv/.parquet)"),
    report: Optional[str] = typer.Option(None, help="HTML report of the apply"),
    lake: Optional[str] = typer.Option(None, help="lake holding the model"),
    trial: Optional[str] = typer.Option(None, help="trial YAML (lake mode)"),
    covariates_table: Optional[str] = typer.Option(None, help=COVARIATES_HELP),
    all_rows: bool = typer.Option(False, "--all", help="lake mode: redo scans already harmonized"),
) -> None:
    """Apply a frozen model; rows from unseen sites are reported as needing a refit."""
    if table is None:
        _lake_flow(lake, trial, covariates_table, "apply", model_id, only_new=not all_rows)
        return
    if not model_id or not out:
        fail("table mode needs MODEL_ID and --out FILE")
    from harmonization import service
    try:
        outcome = service.apply_table(open_lake(lake), model_id, table, out, batch, report)
    except HarmonizationError as exc:
        fail(str(exc))
    _report(outcome, "harmonized")


@app.command()
def extend(
    model_id: str = typer.Argument(..., help="id of the stored model to extend (hm-...)"),
    table: str = typer.Option(..., help="CSV/TSV/Parquet with the new batches' rows (old batches' too, if wished)"),
    batch: Optional[str] = typer.Option(None, help="batch column (default: the one the model was fitted with)"),
    out: str = typer.Option(..., help="the table harmonized with the extended model (.csv/.tsv/.parquet)"),
    report: Optional[str] = typer.Option(None, help="HTML report (a .json of it is written beside)"),
    lake: Optional[str] = typer.Option(None, help="lake holding the model"),
) -> None:
    """Add new sites or scanner epochs to a model without refitting it: nothing harmonized before changes."""
    from harmonization import service
    try:
        outcome = service.extend_table(open_lake(lake), model_id, table, out, batch, report)
    except HarmonizationError as exc:
        fail(str(exc))
    typer.echo(f"model {outcome.model_id} extends {model_id}")
    _report(outcome, "harmonized")


def _trial_id(trial: Optional[Path]) -> str:
    try:
        return load_trial(trial_path(trial)).trial_id
    except TrialConfigError as exc:
        fail(str(exc))


def _show(lake: Optional[str], trial: Optional[Path]) -> None:
    from harmonization import model_store

    store, trial_id = open_lake(lake), _trial_id(trial)
    try:
        promoted = model_store.current(store, trial_id)
    except HarmonizationError as exc:
        fail(str(exc))
    if promoted is None:
        typer.echo(model_store.nothing_promoted(store, trial_id))
    else:
        typer.echo(promoted.describe())


@app.command()
def promote(
    model_id: Optional[str] = typer.Argument(None, help="id of a stored model of the trial (hm-...)"),
    show: bool = typer.Option(False, "--show", help="only print the trial's promoted model"),
    trial: Optional[Path] = TrialOpt,
    lake: Optional[str] = typer.Option(None, help="lake holding the models"),
) -> None:
    """Make a model the trial's promoted one: the model the nightly apply uses (audited)."""
    if show:
        _show(lake, trial)
        return
    if not model_id:
        fail("promote needs MODEL_ID (or --show); `corelab harmonize models` lists them")
    from harmonization import model_store

    store, trial_id = open_lake(lake), _trial_id(trial)
    try:
        promotion, changed = model_store.promote(store, model_id, trial_id, authenticated_user())
    except HarmonizationError as exc:
        fail(f"not promoted: {exc}")
    if changed:
        typer.echo(f"promoted: {promotion.describe()}")
    else:
        typer.echo(f"already promoted, nothing changed: {promotion.describe()}")


@app.command()
def current(trial: Optional[Path] = TrialOpt,
            lake: Optional[str] = typer.Option(None, help="lake holding the models")) -> None:
    """Print the trial's promoted model (the one the nightly apply uses)."""
    _show(lake, trial)


@app.command("models")
def list_models(lake: Optional[str] = typer.Option(None, help="lake holding the models")) -> None:
    """List the stored harmonization models."""
    from harmonization import model_store

    for m in model_store.list_models(open_lake(lake)):
        typer.echo(f"{m['model_id']}  {m['trial_id'] or '(table)':<12}  {m['method']:<10}  {m['created_at']}  "
                   f"{m['batches']} batches  {m['features']} features  {m['rows']} rows")
