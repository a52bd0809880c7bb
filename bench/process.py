"""Benchmark of process_study: end-to-end seconds per study (BIDS -> pipeline -> QC -> tables)
and the share spent outside the pipeline itself (orchestration and I/O; target <= 10 %).

For each real T1 study of ../shared/data (Siemens XA30 2 mm, Philips MPRAGE 1 mm) the study is
received once, then process_study runs warm (in a running process, embedded Prefect). The
pipeline's own time is the duration the runner records in the provenance; the rest is
conversion, QC metrics, table writes and Prefect.

Run: .venv/bin/python bench/process.py [--backend local|podman]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _flowbench import DATA  # noqa: E402  (paths, PREFECT_HOME, bench keys)

STUDIES = {"siemens-xa30": "dcm_qa_xa30/In", "philips-ingenia": "dcm_qa_philips_enh/In"}


def main() -> None:
    from data_contracts import example_path as demo_trial_path
    from data_contracts.trial import load_trial
    from flows.process_study import process_study
    from flows.receive_study import receive_study
    from flows.runtime import embedded_runs

    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="local")
    args = p.parse_args()
    trial = load_trial(demo_trial_path())
    print(f"process_study, backend {args.backend}, {os.cpu_count()} CPUs")
    print(f"{'study':18} {'total s':>8} {'pipeline s':>10} {'outside s':>9} {'outside %':>9}  verdict")
    with embedded_runs():
        warm = tempfile.mkdtemp(prefix="bench-lake-")
        receive_study(str(DATA / "dcm_qa_nih/In/20180918Si/mr_0003"), "siemens-nih", lake_url=warm, trial=trial)
        for site, rel in STUDIES.items():
            lake = tempfile.mkdtemp(prefix="bench-lake-")
            (o,) = receive_study(str(DATA / rel), site, lake_url=lake, trial=trial)
            t = time.perf_counter()
            (sq,) = process_study(o.study.study_key, site, lake_url=lake, backend=args.backend, trial=trial)
            total = time.perf_counter() - t
            inside = float(sq.run.record.get("duration_s", 0.0))
            print(f"{site:18} {total:8.1f} {inside:10.1f} {total - inside:9.1f} "
                  f"{100 * (total - inside) / total:8.1f}%  {sq.verdict.status}")


if __name__ == "__main__":
    main()
