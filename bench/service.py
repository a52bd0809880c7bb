"""Benchmark of corelab as a running service (issue 11): receiving, the site's verdict, studies/hour.

Prints one table, on the same input in one run:
  1. receive: the 150-file GE series (dcm_qa_nih 20180918GE mr_0004) sent by dcmtk's ``storescu``
     (one association, the file list on the command line, calling AE title GENIH = site ge-nih) to
     dcmtk's ``storescp`` writing into a temporary folder (the bare reference) and to corelab's
     DicomReceiver writing into a temporary lake's inbox (atomic write and fsync of every instance
     and its folder before the success status; storescp does neither), and to pynetdicom's Storage
     SCP writing nothing (the library's floor): instances/s from storescu's wall time, median of
     REPS runs after one untimed send to each (target >= 0.5x). dcmtk runs with TCP_NODELAY=1:
     with its default (Nagle's algorithm on) every instance waits for a delayed ACK and all
     receivers look alike; one send each with that default is shown apart.
  2. verdict: the receiver wired as ``corelab serve`` wires it (flows.serve: a local ``prefect
     server`` process, ``on_api(receive_here(...))``, so receive_study runs in the receiver's
     process), idle_s IDLE; seconds from storescu's exit (its last instance acknowledged and the
     association released) to the ``studies`` partition appearing in the lake, median of REPS after
     one untimed warm-up pass (the first flow run in a process pays Prefect's start-up); shown whole
     and without idle_s (target < 2 s for the 150-file GE series).
  3. studies/hour through the anat path: STUDIES copies of the Siemens XA30 T1 study (dcm_qa_xa30,
     made distinct studies of distinct subjects by new UIDs and PatientIDs written with pydicom),
     received once, then ``nightly_reprocess`` (it selects them as never processed and runs
     process_study per study through its task runner) on a copy of that lake per runner: threads
     with 1 worker (the serial reference), threads with 2, Dask on a LocalCluster of 2 one-thread
     worker processes started inside the timed run, and Dask on a standing LocalCluster started
     before it (``--dask-address``, as a core lab's cluster runs night after night; its workers
     preload corelab's flows). Every pipeline run gets threads=1: one core per study. Local
     backend; studies/hour and the ratio to the serial run (target >= 1.8x for Dask on 2 workers).
     Skipped, saying why, when the local backend would refuse the anat pipeline in this tree (its
     definition differs from containers/lock).
The load average is printed at start and end: the figures mean something only on a quiet machine.

Run: .venv/bin/python bench/service.py [--reps 3] [--idle 0.5] [--studies 6] [--only PART]   (or make bench)
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from _flowbench import DATA  # noqa: E402  (paths, PREFECT_HOME, bench keys)

GE_SERIES = DATA / "dcm_qa_nih" / "In" / "20180918GE" / "mr_0004"   # 150 instances (+ a README)
GE_SITE, GE_AET = "ge-nih", "GENIH"
XA30_T1 = DATA / "dcm_qa_xa30" / "In" / "5_anat-T1w_acq-tfl"          # one enhanced MR instance
XA30_SITE = "siemens-xa30"
RUNNERS = (("threads", 1, "threads, 1 worker (serial ref)"), ("threads", 2, "threads, 2 workers"),
           ("dask", 2, "dask, 2 workers, cluster started in the run"),
           ("dask-address", 2, "dask, 2 workers, standing cluster (preloaded)"))


# -- helpers -----------------------------------------------------------------

def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ge_files() -> list[str]:
    files = sorted(str(p) for p in GE_SERIES.iterdir() if p.suffix == ".dcm")
    if len(files) != 150:
        raise SystemExit(f"{GE_SERIES}: expected the 150-file GE series, found {len(files)} .dcm files")
    return files


def dcmtk_env(nodelay: bool = True) -> dict[str, str]:
    """dcmtk's environment: ``TCP_NODELAY=1`` turns Nagle's algorithm off (dcmtk 3.6.7 leaves it on)."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    return env | {"TCP_NODELAY": "1"} if nodelay else env


def storescu(port: int, called: str, files: list[str], nodelay: bool = True) -> float:
    """Send ``files`` in one association; seconds until storescu exits (all acknowledged, released)."""
    t = time.perf_counter()
    out = subprocess.run(["storescu", "-aet", GE_AET, "-aec", called, "127.0.0.1", str(port), *files],
                         capture_output=True, text=True, timeout=600, env=dcmtk_env(nodelay))
    seconds = time.perf_counter() - t
    if out.returncode != 0 or "Store Failed" in out.stdout + out.stderr:
        raise SystemExit(f"storescu to {called} on port {port} failed (exit {out.returncode}): "
                         f"{(out.stderr or out.stdout)[-800:]}")
    return seconds


@contextmanager
def storescp(folder: str, nodelay: bool = True) -> Iterator[int]:
    """dcmtk's storescp writing into ``folder``; yields its port once it answers a C-ECHO.

    dcmtk 3.6.7's storescp has no option to choose the address it listens on (all interfaces);
    it runs only for the seconds of one send, and is reached on 127.0.0.1.
    """
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", folder, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env(nodelay))
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["echoscu", "-aet", GE_AET, "-aec", "STORESCP", "127.0.0.1", str(port)],
                             capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"storescp did not start on port {port}")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def bare_pynetdicom() -> Iterator[int]:
    """pynetdicom's Storage SCP with the receiver's contexts, answering success and writing nothing."""
    from pynetdicom import AE, evt

    from tasks.intake.receiver import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES

    ae = AE(ae_title="CORELAB")
    for uid in STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def wait_for(check: Callable[[], bool], timeout: float, every: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def drain() -> None:
    """Send the logs and events Prefect still holds (else they are retried against a stopped server)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# -- 1. receive throughput -----------------------------------------------------

def receive_throughput(trial, tmp: Path, reps: int) -> dict:
    from tasks.intake.receiver import DicomReceiver
    from tasks.lake.storage import Lake

    files = ge_files()
    secs: dict[str, list[float]] = {"storescp": [], "corelab": [], "pynetdicom": [], "storescp nagle": [],
                                    "corelab nagle": [], "pynetdicom nagle": []}
    # rep 0: one untimed send to each; then the timed ones; last, one send each with dcmtk's defaults
    for rep, nodelay in [(i, True) for i in range(reps + 1)] + [(reps + 1, False)]:
        folder = tmp / f"storescp-{rep}"
        folder.mkdir()
        with storescp(str(folder), nodelay) as port:
            s = storescu(port, "STORESCP", files, nodelay)
        if len(list(folder.iterdir())) != len(files):
            raise SystemExit(f"storescp stored {len(list(folder.iterdir()))} of {len(files)} instances")
        lake = Lake(str(tmp / f"rx-lake-{rep}")).init()
        # receiving only: no background hand-off (that is part 2)
        rx = DicomReceiver(trial, lake, idle_s=3600, background=False).start()
        try:
            c = storescu(rx.port, "CORELAB", files, nodelay)
        finally:
            rx.stop()
        stored = [p for p in lake.find(f"inbox/{GE_SITE}") if p.endswith(".dcm")]
        if len(stored) != len(files):
            raise SystemExit(f"the DicomReceiver stored {len(stored)} of {len(files)} instances")
        with bare_pynetdicom() as port:
            b = storescu(port, "CORELAB", files, nodelay)
        if rep:
            suffix = "" if nodelay else " nagle"
            secs["storescp" + suffix].append(s)
            secs["corelab" + suffix].append(c)
            secs["pynetdicom" + suffix].append(b)
    return {k: [len(files) / x for x in v] for k, v in secs.items()}


# -- 2. verdict latency ----------------------------------------------------------

def verdict_latency(trial, tmp: Path, api_url: str, reps: int, idle_s: float) -> list[dict]:
    from flows.serve import on_api, receive_here
    from tasks.intake.receiver import DicomReceiver
    from tasks.lake.storage import Lake
    from tasks.lake.tables import partition_path, read_table

    files = ge_files()
    out = []
    for rep in range(reps + 1):            # rep 0: warm-up (Prefect client, flow imports, first run)
        lake = Lake(str(tmp / f"verdict-lake-{rep}")).init()
        callback = on_api(api_url, receive_here(trial, lake.url))
        marks: dict[str, float] = {}

        def timed_callback(site: str, folder: str, callback=callback, marks=marks) -> None:
            marks["handed"] = time.monotonic()
            try:
                callback(site, folder)
            finally:
                marks["done"] = time.monotonic()

        row = lake.path(partition_path("studies", GE_SITE))
        rx = DicomReceiver(trial, lake, idle_s=idle_s, on_study_complete=timed_callback).start()
        try:
            storescu(rx.port, "CORELAB", files)
            ack = time.monotonic()
            if not wait_for(lambda row=row: os.path.exists(row), timeout=300):
                raise SystemExit(f"no studies row 300 s after the last instance (lake {lake.url})")
            seen = time.monotonic()
            wait_for(lambda marks=marks: "done" in marks, timeout=120)
        finally:
            rx.stop()
        n = len(read_table(lake, "studies"))
        if n != 1:
            raise SystemExit(f"expected one studies row, found {n}")
        if rep:
            out.append({"total": seen - ack, "handed": marks["handed"] - ack,
                        "flow": marks.get("done", float("nan")) - marks["handed"]})
    return out


# -- 3. studies/hour through the anat path ---------------------------------------

def distinct_copies(tmp: Path, n: int) -> list[Path]:
    """``n`` copies of the XA30 T1 study, each a study of its own subject (new UIDs and PatientID)."""
    import pydicom
    from pydicom.uid import generate_uid

    (src,) = [p for p in XA30_T1.iterdir() if p.suffix == ".dcm"]
    out = []
    for i in range(n):
        ds = pydicom.dcmread(src)
        ds.PatientID = f"BENCH{i + 1:03d}"
        ds.PatientName = f"BENCH^{i + 1:03d}"
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        folder = tmp / f"xa30-copy-{i + 1}"
        folder.mkdir()
        ds.save_as(folder / "t1.dcm", enforce_file_format=True)
        out.append(folder)
    return out


def local_backend_refusal() -> str:
    """Why the local backend would refuse the anat pipeline in this tree ('' when it would run it)."""
    from pipelines.images import locked_image
    from pipelines.registry import get_spec
    from tasks.run.runner import local_mismatches

    spec = get_spec("anat")
    try:
        entry = locked_image(spec.image, spec.lock_path)
    except Exception as exc:  # no lock entry: nothing can run
        return f"{type(exc).__name__}: {exc}"
    return "; ".join(local_mismatches(spec, entry, spec.definitions, spec.definitions.parent))


@contextmanager
def running_cluster(kind: str, workers: int) -> Iterator[str | None]:
    """For ``dask-address``: a LocalCluster of ``workers`` one-thread processes started before the
    timed run, as a core lab's standing cluster is, its workers preloading corelab's flows (Dask's
    ``preload``: the imports a worker pays once when it starts, not in every night's run); its
    address. None for the other runners."""
    if kind != "dask-address":
        yield None
        return
    from distributed import LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      preload=["flows.process_study"]) as cluster:
        yield cluster.scheduler_address


def studies_per_hour(trial, trial_file: str, tmp: Path, n: int) -> list[dict]:
    from flows.nightly import nightly_reprocess
    from flows.receive_study import receive_study
    from flows.runtime import task_runner
    from tasks.lake.storage import Lake
    from tasks.lake.tables import read_table

    received = Lake(str(tmp / "anat-received")).init()
    for folder in distinct_copies(tmp, n):
        receive_study(str(folder), XA30_SITE, lake_url=received.url, trial=trial)
    if len(read_table(received, "studies")) != n:
        raise SystemExit(f"{n} XA30 copies received, {len(read_table(received, 'studies'))} studies found")
    out = []
    for kind, workers, label in RUNNERS:
        lake = tmp / f"anat-{kind}-{workers}"
        shutil.copytree(received.path(""), lake)
        with running_cluster(kind, workers) as address:
            runner = task_runner("dask" if address else kind, address=address, workers=workers)
            flow = nightly_reprocess.with_options(task_runner=runner)
            t = time.perf_counter()
            state = flow(lake_url=str(lake), trial_file=trial_file, backend="local", threads=1, return_state=True)
            seconds = time.perf_counter() - t
        counts = state.result(raise_on_failure=False) if state.is_completed() else {}
        qc = read_table(Lake(str(lake)), "qc")
        judged = qc[qc["metric"] == "verdict"] if len(qc) else qc
        verdicts = ", ".join(f"{k} {v}" for k, v in sorted(judged["verdict"].value_counts().items())) or "none"
        out.append({"label": label, "seconds": seconds, "state": state.type.value, "message": state.message,
                    "due": counts.get("studies_due"), "series": counts.get("series_processed"),
                    "verdicts": verdicts})
    return out


# -- the table -------------------------------------------------------------------

def main() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from data_contracts import example_path
    from data_contracts.trial import load_trial
    from flows.serve import start_local_server

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of parts 1 and 2 (median)")
    p.add_argument("--idle", type=float, default=0.5, help="the receiver's idle_s in part 2")
    p.add_argument("--studies", type=int, default=6, help="XA30 T1 copies in part 3")
    p.add_argument("--only", choices=("receive", "verdict", "anat"), help="run one part only")
    args = p.parse_args()
    trial_file = str(example_path())
    trial = load_trial(trial_file)
    start_load, clock = load(), time.perf_counter()
    print(f"corelab service bench: {os.cpu_count()} CPUs, load average at start {start_load}", flush=True)
    # the pipelines' BLAS/OpenMP pools: one thread each, so two side-by-side runs do not each
    # take both cores (inherited by the local backend's pipeline processes and Dask's workers)
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"

    want = {args.only} if args.only else {"receive", "verdict", "anat"}
    rx: dict = {}
    verdict: list[dict] = []
    anat: list[dict] = []
    server_s = float("nan")
    with tempfile.TemporaryDirectory(prefix="corelab-bench-service-") as tmp_name:
        tmp = Path(tmp_name)
        if "receive" in want:
            print("1/3 receive throughput ...", flush=True)
            rx = receive_throughput(trial, tmp, args.reps)
        print("starting a local prefect server (as corelab serve does) ...", flush=True)
        t = time.perf_counter()
        server = start_local_server(tmp / "prefect")
        server_s = time.perf_counter() - t
        try:
            os.environ["PREFECT_API_URL"] = server.api_url     # as serve() does; Dask workers inherit it
            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                if "verdict" in want:
                    print("2/3 verdict latency ...", flush=True)
                    verdict = verdict_latency(trial, tmp, server.api_url, args.reps, args.idle)
                refusal = local_backend_refusal() if "anat" in want else ""
                if refusal:
                    print(f"3/3 skipped: the local backend would refuse the anat pipeline here: {refusal}",
                          flush=True)
                elif "anat" in want:
                    print(f"3/3 studies/hour, {args.studies} studies x {len(RUNNERS)} runners ...", flush=True)
                    anat = studies_per_hour(trial, trial_file, tmp, args.studies)
                drain()                  # logs and events of the runs, before their server goes
        finally:
            server.stop()

    rows: list[tuple[str, ...]] = []
    if rx:
        ref_rx = median(rx["storescp"])
        rows += [
            ("1 receive", "dcmtk storescp (bare reference)", f"{ref_rx:.0f}", "instances/s", "1.00x", ""),
            ("1 receive", "corelab DicomReceiver", f"{median(rx['corelab']):.0f}", "instances/s",
             f"{median(rx['corelab']) / ref_rx:.2f}x", ">= 0.5x"),
            ("1 receive", "  pynetdicom SCP writing nothing (its floor)", f"{median(rx['pynetdicom']):.0f}",
             "instances/s", f"{median(rx['pynetdicom']) / ref_rx:.2f}x", ""),
            ("1 receive", "  dcmtk defaults (Nagle on): storescp", f"{rx['storescp nagle'][0]:.0f}",
             "instances/s", "", ""),
            ("1 receive", "  dcmtk defaults (Nagle on): corelab", f"{rx['corelab nagle'][0]:.0f}", "instances/s",
             f"{rx['corelab nagle'][0] / rx['storescp nagle'][0]:.2f}x", ""),
        ]
    if verdict:
        total = median([v["total"] for v in verdict])
        rows += [
            ("2 verdict", "receiver idle_s (configured)", f"{args.idle:.2f}", "s", "", ""),
            ("2 verdict", "last instance -> hand-off to receive_study",
             f"{median([v['handed'] for v in verdict]):.2f}", "s", "", ""),
            ("2 verdict", "receive_study in the service's process",
             f"{median([v['flow'] for v in verdict]):.2f}", "s", "", ""),
            ("2 verdict", "last instance -> studies row", f"{total:.2f}", "s", "", "< 2 s"),
            ("2 verdict", "  the same without idle_s", f"{total - args.idle:.2f}", "s", "", ""),
        ]
    if "anat" in want and not anat:
        rows.append(("3 anat", "not run: the local backend refuses anat here", "-", "studies/h", "", ""))
    ref_anat = anat[0]["seconds"] if anat and anat[0]["state"] == "COMPLETED" else None
    for r in anat:
        ok = r["state"] == "COMPLETED"
        rows.append(("3 anat", r["label"], f"{args.studies * 3600 / r['seconds']:.1f}" if ok else "FAILED",
                     "studies/h", f"{ref_anat / r['seconds']:.2f}x" if ok and ref_anat else "",
                     ">= 1.8x" if r["label"].startswith("dask") else ""))
    print(f"\n{'part':10} {'measure':45} {'value':>8} {'unit':12} {'vs ref':>7} {'target':>8}")
    for row in rows:
        print(f"{row[0]:10} {row[1]:45} {row[2]:>8} {row[3]:12} {row[4]:>7} {row[5]:>8}")
    print(f"\nload average at start {start_load}, at end {load()}; whole bench {time.perf_counter() - clock:.0f} s")
    if rx:
        print("1: storescu and storescp run with TCP_NODELAY=1: with dcmtk 3.6.7's default (Nagle's algorithm on)\n"
              "   each instance waits for a delayed ACK on each side (~90 ms an instance storescu -> storescp), and\n"
              "   the figures measure that, not the receivers (the 'dcmtk defaults' rows, one send each);\n"
              "   corelab fsyncs each instance and its folder before answering success, storescp does not")
        print(f"   medians of {args.reps} sends each after one untimed send to each; instances/s per run: "
              f"storescp {', '.join(f'{x:.0f}' for x in rx['storescp'])}; "
              f"corelab {', '.join(f'{x:.0f}' for x in rx['corelab'])}; "
              f"bare pynetdicom {', '.join(f'{x:.0f}' for x in rx['pynetdicom'])}")
    if verdict:
        print(f"2: local prefect server started in {server_s:.1f} s; one untimed warm-up pass first; per run "
              f"(hand-off / receive_study / row, s): "
              + "; ".join(f"{v['handed']:.2f} / {v['flow']:.2f} / {v['total']:.2f}" for v in verdict))
    if anat:
        print(f"3: nightly_reprocess on {args.studies} received XA30 T1 studies, local backend, threads=1 for every "
              "pipeline run in every runner (the anat pipeline's SimpleITK stages and, through "
              "OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=1, its BLAS): one core per study, so the ratio measures "
              "how the runner spreads studies, not how a study's own threads share the cores")
    for r in anat:
        print(f"   {r['label']:45} {r['seconds']:7.1f} s  {r['state']}  due {r['due']}, series {r['series']}, "
              f"qc: {r['verdicts']}" + (f"  ({r['message']})" if r["state"] != "COMPLETED" else ""))

if __name__ == "__main__":
    main()
