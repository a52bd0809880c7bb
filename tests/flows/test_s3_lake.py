"""The whole path, receive_study then process_study, on moto's S3 server gives what it gives on disk.

The same two real studies, the Siemens XA30 T1 (through the anat pipeline, backend local) and the
GE EPI series (through the bold QC pipeline, which needs its JSON sidecar staged beside it), are
received and processed into a lake on local disk, then
into ``s3://<bucket>/lake`` on moto's real S3 API server (ThreadedMotoServer on 127.0.0.1, stopped
at the end), in the same process. The trial is the demo trial with one change: the GE series is
held to a flip angle it does not have, as a major deviation, so that a site query is raised and the
``queries`` table has rows to compare too.

How a flow reaches S3: the flows take a lake URL only (``open_lake(url)``, no storage options), and
s3fs leaves credentials and endpoint to botocore, which reads the standard AWS environment each
time it makes a client: ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (or any other source
of botocore's chain), and ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for a store that is not
AWS. That is what a worker needs, and all this test sets. The audit log is keyed (the session's
``CORELAB_AUDIT_KEY``) and anchored in a folder outside both lakes (``CORELAB_AUDIT_ANCHOR``).

Compared:

* every table, row for row and value for value (floats exactly: no tolerance), after leaving out
  :data:`RUN_COLUMNS`, which say when and in which flow run a row was written;
* the relative paths and sha256 of every file under ``bids/``, ``deid/`` and ``derivatives/``.
  A pipeline run's provenance record differs in :data:`PROVENANCE_RUN_KEYS` (when, which run) and
  :data:`PROVENANCE_PATH_KEYS` (the local paths the pipeline was run on: the lake's own folder on
  disk, a temporary copy for S3), and is compared without them;
* ``corelab audit verify --require-anchor`` on each lake, and the sequence of audit actions.
"""

from __future__ import annotations

import hashlib
import json
import time

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from data_contracts import example_path
from data_contracts.schemas import TABLES
from data_contracts.trial import load_trial
from flows.cli import app
from flows.process_study import process_study
from flows.receive_study import receive_study
from tasks.lake.audit import read_events
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tests.data import shared_path

pytestmark = [pytest.mark.prefect, pytest.mark.pipeline]

BUCKET = "corelab-s3-path"       # moto keeps one store per process: a bucket of this module's own
INPUTS = {"siemens-xa30": ("dcm_qa_xa30", "In"), "ge-nih": ("dcm_qa_nih", "In", "20180918GE", "mr_0004")}
COMPARED = ("studies", "series", "deviations", "queries", "qc", "biomarkers")
STORES = ("bids", "deid", "derivatives")

# Columns that differ between any two runs of the same input, wherever the lake is:
# created_at and received_at are the UTC time the row was written; flow_run_id is the Prefect
# flow run that wrote it (a new UUID per run). No column holds a lake location: series.deid_path
# is relative to the lake root and is compared like every other column.
RUN_COLUMNS = {"created_at", "received_at", "flow_run_id"}
# A pipeline run's provenance: when it ran, and which local paths it was given. On disk the
# pipeline reads and writes the lake's own folders; on S3 it works on a temporary local copy
# that is uploaded afterwards, so the command, its output (which echoes the output paths) and
# the inputs' keys (paths) differ; the inputs' sha256 and the measures it printed do not.
PROVENANCE_RUN_KEYS = {"run_id", "started_at", "finished_at", "duration_s"}
PROVENANCE_PATH_KEYS = {"command", "command_line", "stdout_tail", "inputs"}
# The anat sidecars name their raw image as a BIDS URI ("bids:raw:sub-.../anat/..._T1w.nii.gz"): on
# S3 too, because the image is staged inside its dataset (found by this test: it was a bare name).
RAW_SOURCES = "RawSources"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _trial(folder):
    """The demo trial, with the GE EPI series held to a flip angle of 90 (it has 60) as a major deviation."""
    raw = yaml.safe_load(example_path().read_text())
    (bold,) = [t for t in raw["protocol"]["series_types"] if t["name"] == "bold"]
    bold["vendor_tolerances"]["ge"]["flip_angle"] = {"value": 90, "abs": 2, "severity": "major"}
    path = folder / "trial.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_trial(path)


def _run(lake_url: str, trial) -> dict:
    """Receive and process both studies into ``lake_url``; the outcomes and the wall time of each step."""
    outcomes, seconds = {}, {}
    for site, parts in INPUTS.items():
        start = time.perf_counter()
        (o,) = receive_study(str(shared_path(*parts)), site, lake_url=lake_url, trial=trial)
        seconds[f"receive {site}"] = time.perf_counter() - start
        start = time.perf_counter()
        done = process_study(o.study.study_key, site, lake_url=lake_url, trial=trial, backend="local")
        seconds[f"process {site}"] = time.perf_counter() - start
        outcomes[site] = (o, done)
    return {"seconds": seconds, "outcomes": outcomes}


@pytest.fixture(scope="module")
def lakes(prefect_harness, tmp_path_factory):
    """The same input through the same flows into a local lake and into an S3 lake on moto."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    trial = _trial(tmp_path_factory.mktemp("trial"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with pytest.MonkeyPatch.context() as env:
            # what a worker needs for an S3 lake: the standard AWS environment, read by botocore
            env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                env.delenv(name, raising=False)
            env.setenv("CORELAB_AUDIT_ANCHOR", str(tmp_path_factory.mktemp("anchor")))
            S3FileSystem.clear_instance_cache()      # an s3fs made before this environment is not reused
            S3FileSystem().mkdir(BUCKET)              # no region: moto refuses us-east-1 as a constraint
            disk_url, s3_url = str(tmp_path_factory.mktemp("lake")), f"s3://{BUCKET}/lake"
            runs = {"disk": _run(disk_url, trial), "s3": _run(s3_url, trial)}
            disk, s3 = Lake(disk_url), Lake(s3_url)
            verify = {name: CliRunner().invoke(app, ["audit", "verify", "--lake", lake.url, "--require-anchor"])
                      for name, lake in (("disk", disk), ("s3", s3))}
            files = {name: {p: lake.read_bytes(p) for store in STORES for p in lake.find(store)}
                     for name, lake in (("disk", disk), ("s3", s3))}
            yield {"disk": disk, "s3": s3, "runs": runs, "verify": verify, "files": files}
    finally:
        S3FileSystem.clear_instance_cache()
        server.stop()


def test_both_runs_went_the_same_way(lakes):
    assert not lakes["s3"].is_local and lakes["s3"].find("tables")     # the S3 lake really is on S3
    for name in ("disk", "s3"):
        outcomes = lakes["runs"][name]["outcomes"]
        (xa,) = outcomes["siemens-xa30"][1]
        assert xa.verdict.status == "PASS", (name, xa.verdict.reasons)
        (ge,) = outcomes["ge-nih"][1]            # the bold QC pipeline, its volunteer moving: FAIL
        assert ge.run.pipeline == "bold" and ge.verdict.status == "FAIL", (name, ge.verdict.reasons)
        assert outcomes["siemens-xa30"][0].status in ("accepted", "accepted_with_deviations"), name
        assert outcomes["ge-nih"][0].status == "accepted_with_deviations", name
    for name, run in lakes["runs"].items():
        steps = run["seconds"]
        print(f"{name}: {sum(steps.values()):.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()) + ")")


@pytest.mark.parametrize("table", COMPARED)
def test_every_table_is_the_same_on_s3_as_on_disk(lakes, table):
    disk, s3 = read_table(lakes["disk"], table), read_table(lakes["s3"], table)
    assert len(disk) > 0, f"{table}: no rows on disk, nothing would be compared"
    assert list(disk.columns) == list(s3.columns) == ["site", *TABLES[table].columns]
    dropped = sorted(RUN_COLUMNS & set(disk.columns))
    for col in dropped:   # they are what they are said to be: set on every row, and per run
        assert disk[col].notna().all() and s3[col].notna().all(), (table, col)
    if "flow_run_id" in dropped:
        assert not set(disk.flow_run_id) & set(s3.flow_run_id), table
    key = ["site", *TABLES[table].primary_key]
    a = disk.drop(columns=dropped).sort_values(key).reset_index(drop=True)
    b = s3.drop(columns=dropped).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=True)   # floats too: the same bits, no tolerance
    print(f"{table}: {len(a)} rows x {a.shape[1]} columns equal (exactly); left out {dropped}")


def _provenance(data: bytes, drop: set[str]) -> dict:
    record = json.loads(data)
    tail = json.loads(record["stdout_tail"])
    out = {k: v for k, v in record.items() if k not in drop}
    out["input_sha256"] = sorted(record["inputs"].values())
    out["printed_measures"] = tail["measures"]      # floats as printed, compared exactly
    return out


def test_bids_deid_and_derivatives_hold_the_same_files(lakes):
    disk, s3 = lakes["files"]["disk"], lakes["files"]["s3"]
    assert sorted(disk) == sorted(s3)
    for store in STORES:
        assert any(p.startswith(store + "/") for p in disk), f"nothing under {store}/"
    differ = sorted(p for p in disk if disk[p] != s3[p])
    # two pipeline runs: the XA30 T1 through anat, the GE EPI through bold
    assert len(differ) == 2 and all(p.endswith("_provenance.json") for p in differ), differ
    drop = PROVENANCE_RUN_KEYS | PROVENANCE_PATH_KEYS
    for p in differ:
        assert _provenance(disk[p], drop) == _provenance(s3[p], drop)
    # everything else is byte-identical (the anat sidecars' RawSources included: the image is staged
    # inside its dataset on S3 too)
    images = [p for p in disk if p.endswith(".nii.gz")]
    assert images and all(disk[p] == s3[p] for p in images)
    print(f"{len(disk)} files under {', '.join(STORES)}: same paths; {len(disk) - len(differ)} byte-identical "
          f"({len(images)} NIfTI), 2 provenance records only in {sorted(drop)}")


def test_derivative_sidecars_name_the_raw_image_as_on_disk(lakes):
    disk, s3 = lakes["files"]["disk"], lakes["files"]["s3"]
    sidecars = [p for p in disk if p.endswith(".json") and RAW_SOURCES in json.loads(disk[p])]
    assert sidecars and all(json.loads(disk[p])[RAW_SOURCES][0].startswith("bids:raw:sub-") for p in sidecars)
    assert {p: json.loads(s3[p])[RAW_SOURCES] for p in sidecars} == \
           {p: json.loads(disk[p])[RAW_SOURCES] for p in sidecars}


def test_audit_verify_passes_on_both_and_the_logs_tell_the_same_story(lakes):
    for name in ("disk", "s3"):
        res = lakes["verify"][name]
        assert res.exit_code == 0, (name, res.output)
        assert "audit log intact:" in res.output and "anchored:" in res.output, (name, res.output)
    # an event's time differs per run, and with it its hash, its HMAC and the next event's link
    events = {name: [{k: v for k, v in e.items() if k not in ("at", "hash", "hmac", "prev_hash")}
                     for e in read_events(lakes[name])] for name in ("disk", "s3")}
    assert len(events["disk"]) >= 4 and events["disk"] == events["s3"]
    print(f"audit: {len(events['disk'])} events on each lake, equal but for their time and hashes; "
          "audit verify --require-anchor passes on both")
