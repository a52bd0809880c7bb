"""The demo: every site of the shared-data trial sends its study; print the verdicts.

The demo trial (data_contracts/examples/shared_data_trial.yaml) has one site per
vendor folder of ../shared/data. Keys for pseudonyms and UIDs come from the
environment; the demo sets throw-away ones when none are set, and says so.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from rich.console import Console

# Site id -> upload folder inside ../shared/data.
DEMO_UPLOADS = {
    "ge-nih": "dcm_qa_nih/In/20180918GE",
    "siemens-nih": "dcm_qa_nih/In/20180918Si",
    "siemens-trio": "dcm_qa/In",
    "philips-achieva": "dcm_qa_philips/In",
    "philips-ingenia": "dcm_qa_philips_enh/In",
    "siemens-xa30": "dcm_qa_xa30/In",
}


def demo_trial_path() -> Path:
    return Path(str(resources.files("data_contracts") / "examples" / "shared_data_trial.yaml"))


def run_demo(data: Path, lake_url: str, trial_file: Path | None, console: Console) -> None:
    from data_contracts.trial import load_trial
    from flows.cli import print_outcomes
    from flows.receive_study import receive_study
    from tasks.audit import verify_chain
    from tasks.storage import open_lake

    for env in ("CORELAB_DEID_KEY", "CORELAB_PSEUDONYM_KEY"):
        if not os.environ.get(env):
            os.environ[env] = "demo-only-key-" + env.lower()
            console.print(f"[yellow]{env} not set: using a demo-only key (never for real data)[/]")
    trial = load_trial(trial_file or demo_trial_path())
    for site, rel in DEMO_UPLOADS.items():
        console.rule(f"{site}  <-  {rel}")
        outcomes = receive_study(str(data / rel), site, lake_url=lake_url, trial=trial)
        print_outcomes(outcomes, site)
    report = verify_chain(open_lake(lake_url))
    console.rule("lake")
    console.print(f"lake: {lake_url}; audit log {'intact' if report.ok else 'BROKEN'} ({report.events} events)")
