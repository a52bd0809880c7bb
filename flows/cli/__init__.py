"""The ``corelab`` command line: one package for every command.

common      defaults ($CORELAB_TRIAL, $CORELAB_LAKE), shared options, the exit on error
display     the tables printed after an ingest and after processing
study       ingest, process, protocol infer
tables      qc override, export biomarkers, audit verify
harmonize   harmonize fit | apply | models
containers  containers build | verify | list | sif | lock-requirements | check-reproducible | export | load
demo        the demo on the shared real data (``make demo``)
service     serve: the receiver, the upload watcher and the flows on a Prefect server
report      status, studies, qc list, queries list|answer|resolve; report sites (dashboard), report qc (pages)

Exit codes: 0 when the study was accepted (with or without deviations), 1 when nothing was
accepted (or an audit chain is broken), 2 for a bad command, trial file, site or path.
``-v`` shows each decision corelab logs (pairings, skips, exact commands, gate verdicts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import typer
from rich.markup import escape

from flows import runtime
from flows.cli import containers, demo, harmonize, report, service, study, tables

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="corelab: an imaging core lab in a box for multi-site MRI trials.")


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v",
                                          help="show each decision on the console as it is made")) -> None:
    runtime.configure_console(verbose)


app.command()(study.ingest)
app.command()(study.process)
app.command()(demo.demo)
app.command()(service.serve)
app.command()(report.status)
app.command()(report.studies)
tables.qc_app.command("list")(report.qc_list)
app.add_typer(report.report_app, name="report")
app.add_typer(report.queries_app, name="queries")
app.add_typer(study.protocol_app, name="protocol")
app.add_typer(tables.audit_app, name="audit")
app.add_typer(tables.qc_app, name="qc")
app.add_typer(tables.export_app, name="export")
app.add_typer(harmonize.app, name="harmonize")
app.add_typer(containers.app, name="containers")


def _service_api() -> contextlib.AbstractContextManager:
    """Settings pointing at a running `corelab serve`'s Prefect server, when one answers on this machine."""
    if os.environ.get("PREFECT_API_URL") or sys.argv[1:2] == ["serve"]:
        return contextlib.nullcontext()
    from flows.serve import running_api_url

    url = running_api_url()
    if not url:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = url   # for the subprocesses too
    return temporary_settings(updates={PREFECT_API_URL: url})


def _help_only(args: list[str]) -> bool:
    """Nothing will run: only help is printed (no Prefect settings, no server lookup: it answers at once)."""
    return not args or "--help" in args


def main() -> None:
    try:
        quick = _help_only(sys.argv[1:])
        with (contextlib.nullcontext() if quick else _service_api()), \
                (contextlib.nullcontext() if quick else runtime.embedded_runs()):
            app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # no traceback reaches a user: one line, and where the details are
        from flows.cli.common import err

        logging.getLogger("corelab.cli").error("corelab %s failed", " ".join(sys.argv[1:2]), exc_info=exc)
        code = getattr(exc, "code", None)
        err.print(f"[bold red]error:[/] {type(exc).__name__}{f' ({code})' if isinstance(code, str) else ''}: "
                  f"{escape(str(exc))}\nNothing received was lost; `corelab -v` shows the details (a flow's "
                  "are in its run log too).", highlight=False, soft_wrap=True)
        sys.exit(1)

