"""Benchmark of intake (issue: receive_study) on the shared real DICOM.

Prints, for all DICOM of ../shared/data:
  * receive_study (the Prefect flow, warm) files/s and MB/s,
  * the same intake without Prefect (the tasks called as functions),
  * bare pydicom read + write of the same files (the floor),
  * dicognito doing only de-identification (read + anonymize + write),
and upload-to-verdict seconds for the 150-file GE series: warm (flow called in a
running process, as the receiver service will) and a cold CLI start apart.

Run: .venv/bin/python bench/ingest.py   (or make bench)
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom  # noqa: E402
from _flowbench import DATA  # noqa: E402  (paths, PREFECT_HOME, bench keys)

from data_contracts import example_path as demo_trial_path  # noqa: E402
from data_contracts.trial import load_trial  # noqa: E402
from flows.cli.demo import DEMO_UPLOADS  # noqa: E402

GE_150 = DATA / "dcm_qa_nih" / "In" / "20180918GE" / "mr_0004"


def dicom_bytes() -> list[bytes]:
    out = []
    for rel in DEMO_UPLOADS.values():
        for p in sorted((DATA / rel).rglob("*")):
            if p.is_file() and not p.name.endswith(".txt"):
                raw = p.read_bytes()
                out.append(gzip.decompress(raw) if p.suffix == ".gz" else raw)
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def floor(blobs: list[bytes]) -> None:
    for b in blobs:
        ds = pydicom.dcmread(io.BytesIO(b))
        ds.save_as(io.BytesIO(), enforce_file_format=True)


def dicognito_only(blobs: list[bytes]) -> None:
    from dicognito.anonymizer import Anonymizer

    anon = Anonymizer(seed="bench")
    for b in blobs:
        ds = pydicom.dcmread(io.BytesIO(b))
        anon.anonymize(ds)
        ds.save_as(io.BytesIO(), enforce_file_format=True)


def intake_without_prefect(trial) -> None:
    from tasks.intake.inventory import inventory_upload
    from tasks.lake.storage import Lake
    from tasks.receive.record import record_study
    from tasks.receive.study import Upload, receive_one_study

    lake = Lake(tempfile.mkdtemp(prefix="bench-lake-")).init()
    for site, rel in DEMO_UPLOADS.items():
        files = inventory_upload(DATA / rel).accepted
        outcome = receive_one_study(Upload(trial, site, "bench", lake), files)
        record_study(lake, outcome, outcome.matcher)


def flow_all(trial) -> None:
    from flows.receive_study import receive_study

    lake = tempfile.mkdtemp(prefix="bench-lake-")
    for site, rel in DEMO_UPLOADS.items():
        receive_study(str(DATA / rel), site, lake_url=lake, trial=trial)


def flow_ge(trial) -> None:
    from flows.receive_study import receive_study

    receive_study(str(GE_150), "ge-nih", lake_url=tempfile.mkdtemp(prefix="bench-lake-"), trial=trial)


def cold_cli(prefect_home: str) -> float:
    env = dict(os.environ, PREFECT_HOME=prefect_home)
    cmd = [str(Path(sys.executable).parent / "corelab"), "ingest", str(GE_150), "--site", "ge-nih",
           "--trial", str(demo_trial_path()), "--lake", tempfile.mkdtemp(prefix="bench-lake-")]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    from flows.runtime import embedded_runs

    with embedded_runs():
        run(load_trial(demo_trial_path()))


def run(trial) -> None:
    blobs = dicom_bytes()
    n, mb = len(blobs), sum(map(len, blobs)) / 1e6
    flow_ge(trial)  # warm-up: starts the embedded Prefect server once, as a service would
    rows = [
        ("bare pydicom read+write (floor)", timed(lambda: floor(blobs))),
        ("dicognito de-id only", timed(lambda: dicognito_only(blobs))),
        ("intake tasks, no Prefect", timed(lambda: intake_without_prefect(trial))),
        ("receive_study flow (warm)", timed(lambda: flow_all(trial))),
    ]
    print(f"\nshared DICOM: {n} files, {mb:.1f} MB (decompressed)\n")
    print(f"{'what':36} {'seconds':>8} {'files/s':>8} {'MB/s':>7} {'x floor':>8}")
    base = rows[0][1]
    for name, sec in rows:
        print(f"{name:36} {sec:8.2f} {n / sec:8.1f} {mb / sec:7.2f} {base / sec:8.2f}")
    warm = [timed(lambda: flow_ge(trial)) for _ in range(3)]
    fresh_home = tempfile.mkdtemp(prefix="corelab-bench-cold-")
    cold_fresh = cold_cli(fresh_home)
    cold_reused = cold_cli(fresh_home)
    print(f"\nupload-to-verdict, GE series of 150 files ({GE_150.name}):")
    print(f"  warm flow in a running process: {min(warm):.2f} s (best of 3; all: "
          + ", ".join(f"{w:.2f}" for w in warm) + ")")
    print(f"  cold CLI, fresh PREFECT_HOME:   {cold_fresh:.2f} s")
    print(f"  cold CLI, reused PREFECT_HOME:  {cold_reused:.2f} s")


if __name__ == "__main__":
    main()
