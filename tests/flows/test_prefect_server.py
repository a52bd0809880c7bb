"""corelab on a real ``prefect server`` (SQLite), as a core lab runs it: schedules fire and
deployments/prefect.yaml deploys unchanged.

One server per module (tests/flows/prefect_server.py), bound to 127.0.0.1 and stopped at the end.
Both tests fail when the server's scheduler cannot insert runs: with SQLAlchemy 2.1 and Prefect
3.8.8 every scheduler loop raised ``InvalidRequestError: Can't evaluate bulk DML statement`` and no
scheduled run was ever created (requirements.lock pins SQLAlchemy 2.0 for that reason).
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta

import pytest
import yaml

from tests.data import REPO
from tests.flows.prefect_server import TICK, TICK_LINE, PrefectServer, prefect_server, wait_for

pytestmark = pytest.mark.prefect

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
INTERVAL = 10           # seconds between the runs of the test schedule
SCHEDULER_WAIT = 60     # the scheduler loops every 5 s here (PREFECT_SERVER_SERVICES_SCHEDULER_*)
RUN_WAIT = 150          # a worker polls every 2 s; a flow-run process starts in a few seconds
ENV_REF = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")   # how prefect.yaml names an environment variable


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> PrefectServer:
    with prefect_server(tmp_path_factory.mktemp("prefect-server"),
                        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
                        PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="2") as s:
        yield s


def _runs_of(client, deployment_id, *, state: str | None = None):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    runs = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))) if state else None
    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                 flow_run_filter=runs)


def test_an_interval_schedule_fires_and_a_worker_completes_the_run(server):
    from prefect import flow
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    pool = "corelab-test-tick"
    server.prefect("work-pool", "create", pool, "--type", "process")
    with server.settings():
        deployment_id = flow.from_source(source=str(REPO), entrypoint=TICK).deploy(
            name="every-10s", work_pool_name=pool, interval=INTERVAL, parameters={"n": 41},
            build=False, push=False, print_next_steps=False)

    with server.client() as client:
        scheduled = wait_for(lambda: _runs_of(client, deployment_id), SCHEDULER_WAIT)
        assert scheduled, (f"the scheduler created no run of an interval deployment in {SCHEDULER_WAIT} s; "
                           f"server errors: {server.errors()}")
        assert all(r.auto_scheduled for r in scheduled)
        starts = sorted(r.expected_start_time for r in scheduled)
        assert len(starts) >= 2 and {(b - a).total_seconds() for a, b in zip(starts, starts[1:])} == {INTERVAL}

        line = TICK_LINE.format(n=41)
        with server.worker(pool):
            done = wait_for(lambda: _runs_of(client, deployment_id, state="COMPLETED"), RUN_WAIT, every=2)
            worker_log = (server.home / f"worker-{pool}.log").read_text(errors="replace")
            assert done, f"no scheduled run completed in {RUN_WAIT} s; worker log:\n{worker_log[-3000:]}"
            run = done[0]
            by_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            # awaited while the worker runs: the run's process reports COMPLETED, then ships its
            # last batch of logs as it exits; stopping the worker at COMPLETED killed it before
            # that batch left in several CI runs (the line never arrived, not even in 300 s)
            logged = wait_for(lambda: line in [m.message for m in client.read_logs(by_run)], 120)
        assert run.auto_scheduled and run.state.is_completed() and run.parameters == {"n": 41}
        assert logged, f"the run's log has no {line!r}: {[m.message for m in client.read_logs(by_run)]}"


def _refs(value) -> set[str]:
    """The environment variables prefect.yaml's values read (``{{ $VAR }}``)."""
    if isinstance(value, str):
        return set(ENV_REF.findall(value))
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return set().union(*map(_refs, items))


def _fill(value, env: dict[str, str]):
    """prefect.yaml's ``{{ $VAR }}`` references replaced by the deploying shell's values."""
    if isinstance(value, str):
        return ENV_REF.sub(lambda m: env[m.group(1)], value)
    if isinstance(value, list):
        return [_fill(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, env) for k, v in value.items()}
    return value


def test_the_deployments_file_deploys_with_its_schedules_and_triggers(server, tmp_path):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.server.schemas.schedules import CronSchedule

    text = PREFECT_YAML.read_text()
    spec = yaml.safe_load(text)
    entries = {e["name"]: e for e in spec["deployments"]}
    # every variable the file reads, as an installation sets it: CORELAB_HOME is the checkout
    env = {name: str(REPO) if name == "CORELAB_HOME" else str(tmp_path / name.lower())
           for name in sorted(_refs(spec))}
    assert "CORELAB_HOME" in env
    for pool in sorted({e["work_pool"]["name"] for e in entries.values()}):
        server.prefect("work-pool", "create", pool, "--type", "process")

    # the command the file's own comment gives, from the repository root
    assert "prefect deploy --all --prefect-file deployments/prefect.yaml" in text
    server.prefect("deploy", "--all", "--prefect-file", "deployments/prefect.yaml", env=server.env(**env))

    with server.client() as client:
        by_name = DeploymentFilter(name=DeploymentFilterName(any_=list(entries)))
        found = client.read_deployments(deployment_filter=by_name)
        assert sorted(d.name for d in found) == sorted(entries)
        for d in found:
            entry = entries[d.name]
            assert d.entrypoint == entry["entrypoint"]
            assert d.work_pool_name == entry["work_pool"]["name"]
            assert d.parameters == _fill(entry.get("parameters", {}), env)
            assert d.pull_steps == _fill(spec["pull"], env)
            assert (d.version, sorted(d.tags)) == (entry["version"], sorted(entry["tags"]))
            assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules] == \
                [(s["cron"], s.get("timezone"), s.get("active", True)) for s in entry.get("schedules", [])]

            automations = client.read_resource_related_automations(f"prefect.deployment.{d.id}")
            assert len(automations) == len(entry.get("triggers", [])), d.name
            for trigger in entry.get("triggers", []):
                (a,) = [a for a in automations if a.trigger.expect == set(trigger["expect"])]
                assert a.enabled == trigger.get("enabled", True)
                assert a.trigger.match.model_dump() == trigger["match"]
                (action,) = a.actions
                assert (action.type, action.deployment_id) == ("run-deployment", d.id)
                assert action.parameters == trigger.get("parameters", {})

        # the deployments' Upcoming runs: each cron deployment gets scheduled runs at its cron times
        for d in (d for d in found if d.schedules):
            runs = wait_for(lambda d=d: _runs_of(client, d.id, state="SCHEDULED"), SCHEDULER_WAIT)
            assert runs, (f"the scheduler created no run of {d.name} in {SCHEDULER_WAIT} s; "
                          f"server errors: {server.errors()}")
            due = set()
            for s in d.schedules:
                due |= set(asyncio.run(CronSchedule(cron=s.schedule.cron, timezone=s.schedule.timezone)
                                       .get_dates(n=20, start=d.created - timedelta(minutes=1))))
            assert all(r.auto_scheduled and r.expected_start_time in due for r in runs), d.name
