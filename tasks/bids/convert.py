"""DICOM to BIDS: dcm2niix on each accepted series, BIDS names, and the dataset's tables.

Every series whose type the protocol knows is converted with the dcm2niix
binary of the PyPI package into
``bids/sub-<subject>/ses-<session>/<datatype>/sub-..._ses-..._[entities]_<suffix>.nii.gz``
plus its sidecar. Each decision is logged as ``dst <- src`` (as Dcm2Bids does);
an unclassified or ambiguous series is not converted. Names are checked with
the BIDS validator's rules before anything is written, and every sidecar and
NIfTI header is checked against the study's PHI fingerprint.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.bids import EntityError, entity_prefix
from data_contracts.trial import SeriesType, TrialConfig
from tasks.bids.dataset import write_dataset_description, write_participants, write_scans, write_sessions
from tasks.conformance.findings import Finding
from tasks.deid.fingerprint import Fingerprint, load_fingerprints
from tasks.errors import TRANSIENT_RETRIES, CorelabError
from tasks.lake import tables
from tasks.lake.storage import Lake
from tasks.lake.studies import Study

log = logging.getLogger("corelab.bids")
DCM2NIIX_ARGS = ("-b", "y", "-ba", "y", "-z", "y", "-w", "1")
OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


class ConversionError(CorelabError, RuntimeError):
    """dcm2niix could not turn a series into exactly one BIDS image."""

    code = "conversion_failed"


def dcm2niix_binary() -> str:
    """The binary shipped inside the dcm2niix PyPI package (not whatever is on PATH)."""
    import dcm2niix

    return str(dcm2niix.bin)


def bids_stem(subject: str, session: str, entities: dict[str, str], suffix: str) -> str:
    """``sub-<s>_ses-<v>_<entities in the entity table's order>_<suffix>``."""
    return f"{entity_prefix(subject, session, entities)}_{suffix}"


@functools.lru_cache(maxsize=1)
def _validator():
    from bids_validator import BIDSValidator

    return BIDSValidator()  # loads its rule files once per process


def check_bids_name(rel_path: str) -> None:
    if not _validator().is_bids("/" + rel_path):
        raise ConversionError(f"{rel_path} is not a valid BIDS name (BIDS validator rules)", "bids_name_invalid")


@dataclass
class SeriesToConvert:
    """One accepted series and where it goes."""

    series_uid: str
    series_number: int
    deid_path: str                 # lake folder of its de-identified DICOM
    series_type: SeriesType
    scanner_epoch: str
    run: int | None = None
    # what intake read from the headers: columns, rows, slices, volumes (None where unknown)
    geometry: tuple[int | None, int | None, int | None, int | None] = (None, None, None, None)


class GeometryError(ConversionError):
    """The converted image does not have the size the DICOM headers say."""

    code = "geometry_mismatch"


def check_geometry(shape: tuple[int, ...], expected: tuple[int | None, ...], label: str) -> None:
    """Refuse an image whose matrix, slices or volumes differ from the headers'.

    The in-plane matrix and the slice count are compared as a set (a converter may write the
    axes in another order for a 3D acquisition); volumes as they are.
    """
    columns, rows, slices, volumes = expected
    dims = list(shape[:3]) + [1] * (3 - len(shape[:3]))
    n_vol = int(shape[3]) if len(shape) > 3 else 1
    want = [d for d in (columns, rows, slices) if d]
    if len(want) == 3 and sorted(dims) != sorted(want):
        raise GeometryError(f"{label}: the converted image is {'x'.join(map(str, shape))}, the DICOM headers say "
                            f"{columns}x{rows} in plane, {slices} slices; not written (a vendor layout the "
                            "converter did not unpack?)")
    if volumes and n_vol != volumes:
        raise GeometryError(f"{label}: the converted image has {n_vol} volume(s), the DICOM headers "
                            f"{volumes}; not written")


def assign_runs(series: list[SeriesToConvert]) -> list[SeriesToConvert]:
    """run-<n> in series-number order when a session holds a series type more than once."""
    by_type: dict[str, list[SeriesToConvert]] = {}
    for s in sorted(series, key=lambda s: s.series_number):
        by_type.setdefault(s.series_type.name, []).append(s)
    for group in by_type.values():
        for i, s in enumerate(group, start=1):
            s.run = i if len(group) > 1 else None
    return series


def direction_label(nifti: nib.Nifti1Image, pe: str | None) -> str | None:
    """BIDS ``dir`` label (e.g. AP) from PhaseEncodingDirection and the image orientation."""
    if not pe:
        return None
    axis = "ijk".index(pe[0])
    code = nib.aff2axcodes(nifti.affine)[axis]
    return OPPOSITE[code] + code if not pe.endswith("-") else code + OPPOSITE[code]


@dataclass
class Converted:
    series_uid: str
    files: dict[str, str] = field(default_factory=dict)   # lake path -> sha256
    image: str | None = None                               # lake path of the NIfTI
    sidecar: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def run_dcm2niix(src: Path, out: Path, stem: str) -> list[Path]:
    cmd = [dcm2niix_binary(), *DCM2NIIX_ARGS, "-f", stem, "-o", str(out), str(src)]
    log.info("run: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    images = sorted(out.glob("*.nii.gz"))
    if proc.returncode not in (0,) or not images:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ConversionError(f"dcm2niix failed on {src.name} (exit {proc.returncode}): {' | '.join(tail)}")
    if len(images) != 1:
        raise ConversionError(f"dcm2niix made {len(images)} images from one series "
                              f"({', '.join(p.name for p in images)}); not converted", "conversion_ambiguous")
    return sorted(out.iterdir())


def convert_series(lake: Lake, s: SeriesToConvert, subject: str, session: str,
                   fingerprints: list[Fingerprint]) -> Converted:
    """Convert one series into the lake's BIDS dataset; nothing is written on any failure."""
    import hashlib

    t0 = time.perf_counter()
    st = s.series_type
    entities = dict(st.entities)
    if s.run:
        entities["run"] = str(s.run)
    with tempfile.TemporaryDirectory(prefix="corelab-bids-") as tmp:
        tmp_path = Path(tmp)
        out = tmp_path / "out"
        out.mkdir()
        produced = run_dcm2niix(Path(lake.local_folder(s.deid_path, tmp_path)), out, "img")
        image = next(p for p in produced if p.name.endswith(".nii.gz"))
        check_geometry(nib.load(image).shape, s.geometry, f"series {s.series_number}")
        sidecar = json.loads(image.with_name("img.json").read_text())
        if st.datatype == "fmap" and st.suffix == "epi" and "dir" not in entities:
            label = direction_label(nib.load(image), sidecar.get("PhaseEncodingDirection"))
            if label:
                entities["dir"] = label
        try:
            stem = bids_stem(subject, session, entities, st.suffix)
        except EntityError as exc:  # a value no BIDS name may hold: this series is not converted
            raise ConversionError(f"series {s.series_number}: {exc}", "bids_name_invalid") from exc
        folder = f"bids/sub-{subject}/ses-{session}/{st.datatype}"
        sidecar.update({"SeriesInstanceUID": s.series_uid, "CorelabSeriesType": st.name,
                        "ScannerEpoch": s.scanner_epoch})
        if "task" in entities:  # BIDS requires TaskName wherever the task entity is (bold, events...)
            sidecar.setdefault("TaskName", entities["task"])
        staged: dict[str, bytes] = {}
        for p in produced:
            ext = p.name[len("img"):]
            data = json.dumps(sidecar, indent=2).encode() if ext == ".json" else p.read_bytes()
            staged[f"{folder}/{stem}{ext}"] = data
        for rel, data in staged.items():
            check_bids_name(rel.removeprefix("bids/"))
            # a NIfTI is checked by its header (voxels are not text); named .nii so it is not gunzipped
            name, probe = ((rel.removesuffix(".gz"), nib.load(image).header.binaryblock)
                           if rel.endswith(".nii.gz") else (rel, data))
            for fp in fingerprints:
                leaks = fp.find_leaks(name, probe)
                if leaks:
                    raise ConversionError(f"{rel}: identifying value in the output ({leaks[0].source}); "
                                          "not written", "phi_in_output")
        result = Converted(s.series_uid, sidecar=sidecar)
        for rel, data in sorted(staged.items()):
            lake.write_bytes(rel, data)
            result.files[rel] = hashlib.sha256(data).hexdigest()
            if rel.endswith(".nii.gz"):
                result.image = rel
    log.info("%s <- %s", result.image, s.deid_path)
    result.seconds = time.perf_counter() - t0
    return result


def plan_session(series_rows: Any, trial: Any) -> list[SeriesToConvert]:
    """The series of one session that become BIDS images (``series`` table rows in).

    Accepted series of a known type are converted, deviations included (the
    deviation is recorded; QC decides later). Unclassified, ambiguous and
    rejected series are not, and are logged as ``No pairing <- series N``.
    """
    types = {st.name: st for st in trial.protocol.series_types}
    out = []
    for row in series_rows.itertuples():
        if row.verdict not in ("conform", "deviation") or row.series_type not in types:
            log.info("No pairing <- series %s (%s)", row.series_number, row.verdict)
            continue
        out.append(SeriesToConvert(row.series_uid, int(row.series_number), row.deid_path,
                                   types[row.series_type], row.scanner_epoch,
                                   geometry=tuple(_count(getattr(row, k, None))
                                                  for k in ("columns", "rows", "n_slices", "n_volumes"))))
    return assign_runs(out)


def _count(v: Any) -> int | None:
    try:
        return int(v) if v is not None and int(v) > 0 else None
    except (TypeError, ValueError):  # NaN or NA from a table
        return None


def existing_images(lake: Lake, subject: str, session: str) -> dict[str, str]:
    """series UID -> BIDS image already converted for this session."""
    out = {}
    for rel in lake.find(f"bids/sub-{subject}/ses-{session}"):
        if rel.endswith(".json") and not rel.endswith("_scans.json"):
            uid = json.loads(lake.read_text(rel)).get("SeriesInstanceUID")
            image = rel[: -len(".json")] + ".nii.gz"
            if uid and lake.exists(image):
                out[uid] = image
    return out


def convert_study(lake: Lake, trial: TrialConfig, study: Study) -> tuple[dict[str, str], list[Finding]]:
    """BIDS images of the study's accepted series (converting what is not there yet).

    Returns the images by series UID, and a finding for each series that could not be converted.
    """
    series = tables.read_table(lake, "series", [study.site])
    series = series[series.study_key == study.study_key]
    done = existing_images(lake, study.subject, study.session)
    fingerprints = load_fingerprints(lake, trial, study.site, study.subject, study.session)
    images, findings = {}, []
    for s in plan_session(series, trial):
        if s.series_uid in done:
            log.info("found %s, skipping conversion of series %s", done[s.series_uid], s.series_number)
            images[s.series_uid] = done[s.series_uid]
            continue
        try:
            images[s.series_uid] = convert_series(lake, s, study.subject, study.session, fingerprints).image
        except ConversionError as exc:
            findings.append(Finding(kind="processing_failed", severity="major", series_key=s.series_uid,
                                    observed="conversion", message=f"series {s.series_number}: {exc}",
                                    reason_code=exc.code))
    write_dataset_description(lake, trial)
    write_scans(lake, study.subject, study.session, str(study.acquisition_date))
    write_sessions(lake, study.subject)  # after scans: a session's acq_time is its first scan's
    write_participants(lake, trial)
    return images, findings


@task(name="convert-study", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def convert_study_task(lake: Lake, trial: TrialConfig, study: Study) -> tuple[dict[str, str], list[Finding]]:
    return convert_study(lake, trial, study)
