"""BIDS derivatives of ``anat``: names, sidecars, and an all-or-nothing write.

Follows BIDS 1.9 "BIDS Derivatives" (common data types: preprocessed images,
masks, discrete and probabilistic segmentations) and fMRIPrep's conventions
(``dseg`` labels 1 GM, 2 WM, 3 CSF; reviewer figures under ``sub-<S>/figures``).

All files of one T1 are written into a staging folder next to the target and
renamed into place only when every one exists, the measures TSV last: a run
that fails leaves no output of its own behind.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines.anat.errors import AnatArgumentError, AnatOutputError

BIDS_VERSION = "1.10.0"   # as the raw dataset corelab writes (data_contracts.bids)
#: Entities a caller may add, in the BIDS order for anatomical files.
OPTIONAL_ENTITIES = ("acq", "ce", "rec", "run")
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
#: dseg.tsv rows: index, name, abbreviation (order of template.TISSUES).
DSEG_LOOKUP = ((1, "Gray Matter", "GM"), (2, "White Matter", "WM"), (3, "Cerebrospinal Fluid", "CSF"))


def check_label(name: str, value: str) -> str:
    """A BIDS label (letters and digits only), else :class:`AnatArgumentError`."""
    if not isinstance(value, str) or not _LABEL.match(value):
        raise AnatArgumentError(f"{name} {value!r} is not a BIDS label (letters and digits only)")
    return value


def check_digest(digest: str | None) -> str | None:
    """``sha256:<64 hex>`` or ``None``."""
    if digest is not None and not _DIGEST.match(digest):
        raise AnatArgumentError(f"container digest {digest!r} is not 'sha256:' and 64 hex digits")
    return digest


def file_prefix(subject: str, session: str, entities: Mapping[str, Any] | None = None) -> str:
    """``sub-S_ses-V[_acq-X][_ce-..][_rec-..][_run-N]`` with every label checked."""
    entities = dict(entities or {})
    unknown = set(entities) - set(OPTIONAL_ENTITIES)
    if unknown:
        raise AnatArgumentError(
            f"unknown BIDS entities {sorted(unknown)}; anat accepts {list(OPTIONAL_ENTITIES)}"
        )
    parts = [f"sub-{check_label('subject', subject)}", f"ses-{check_label('session', session)}"]
    for key in OPTIONAL_ENTITIES:
        value = entities.get(key)
        if value is None:
            continue
        if key == "run":
            if not str(value).isdigit() or int(value) < 1:
                raise AnatArgumentError(f"run {value!r} is not a positive integer")
            value = str(int(value))
        parts.append(f"{key}-{check_label(key, str(value))}")
    return "_".join(parts)


def output_names(prefix: str, tissues: tuple[str, ...]) -> dict[str, str]:
    """Relative path (from the derivatives root) of every output, by key."""
    sub, ses = prefix.split("_")[:2]
    anat = f"{sub}/{ses}/anat/{prefix}"
    names = {
        "preproc": f"{anat}_desc-preproc_T1w.nii.gz",
        "bias_field": f"{anat}_desc-biasfield_T1w.nii.gz",
        "brain_mask": f"{anat}_desc-brain_mask.nii.gz",
        "dseg": f"{anat}_dseg.nii.gz",
    }
    names.update({f"probseg_{t}": f"{anat}_label-{t}_probseg.nii.gz" for t in tissues})
    names["figure"] = f"{sub}/figures/{prefix}_desc-dseg_T1w.png"
    names["measures"] = f"{anat}_desc-volumes_measures.tsv"  # last: marks completion
    return names


def sidecar_name(name: str) -> str:
    """The JSON sidecar's path for an output path."""
    for ext in (".nii.gz", ".tsv", ".png", ".svg"):
        if name.endswith(ext):
            return name[: -len(ext)] + ".json"
    raise ValueError(f"no sidecar rule for {name}")


def software_versions(packages: Iterable[str]) -> dict[str, str]:
    """Versions of Python and of the installed ``packages`` that shape the outputs."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def raw_source(path: Path) -> str:
    """A BIDS URI when ``path`` sits in a BIDS dataset, else the file name."""
    for parent in list(path.parents)[:6]:
        if (parent / "dataset_description.json").is_file():
            return f"bids:raw:{path.relative_to(parent).as_posix()}"
    return path.name


def generated_by(name: str, version: str, container_digest: str | None) -> list[dict[str, Any]]:
    """BIDS ``GeneratedBy`` for the pipeline (with its container when there is one)."""
    entry: dict[str, Any] = {"Name": name, "Version": version}
    if container_digest:
        entry["Container"] = {"Type": "oci", "Tag": container_digest}
    return [entry]


def dataset_description(name: str, version: str, container_digest: str | None) -> dict[str, Any]:
    """The derivatives root's ``dataset_description.json`` content."""
    return {
        "Name": f"{name} {version}: bias-corrected T1w, brain mask, GM/WM/CSF segmentation, volumes",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated_by(name, version, container_digest),
    }


def check_dataset(root: Path, description: dict[str, Any]) -> None:
    """Refuse a derivatives root made by another pipeline version or container (reads only).

    Raises
    ------
    AnatOutputError
        Mixing outputs of different versions or images in one dataset would
        break the provenance of every file there.
    """
    path = root / "dataset_description.json"
    if not path.exists():
        return
    try:
        existing = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AnatOutputError(f"{path}: unreadable ({exc})") from exc
    if existing.get("GeneratedBy") != description["GeneratedBy"]:
        raise AnatOutputError(
            f"{path}: made by {existing.get('GeneratedBy')}, not "
            f"{description['GeneratedBy']}; write to a folder of its own"
        )


def ensure_dataset(root: Path, description: dict[str, Any], files: Mapping[str, str] | None = None,
                   readme: str | None = None) -> None:
    """Create the derivatives root files, or check that the existing ones agree.

    ``files`` are further root files (name -> text, e.g. anat's ``dseg.tsv``), written once;
    ``readme`` is the README's text after the dataset's name (anat's by default).
    """
    check_dataset(root, description)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dataset_description.json"
    if not path.exists():
        atomic_write_text(path, json.dumps(description, indent=2) + "\n")
    for name, text in (files or {}).items():
        if not (root / name).exists():
            atomic_write_text(root / name, text)
    if not (root / "README").exists():
        text = readme or ("Made by the built-in anatomical pipeline of corelab. Reviewer figures (sub-*/figures) "
                          "and the volumes tables (*_measures.tsv) are not BIDS files; the derivatives' "
                          ".bidsignore lists them.")
        atomic_write_text(root / "README", f"{description['Name']}\n\n{text}\n")


def dseg_tsv() -> str:
    """The ``dseg.tsv`` lookup table (applies to every ``*_dseg.nii.gz`` below the root)."""
    rows = ["index\tname\tabbreviation"] + [f"{i}\t{n}\t{a}" for i, n, a in DSEG_LOOKUP]
    return "\n".join(rows) + "\n"


def measures_tsv(measures: Mapping[str, float], units: Mapping[str, str]) -> str:
    """Measures as ``measure``/``value``/``unit`` rows; values in full (round-trip) precision."""
    rows = ["measure\tvalue\tunit"] + [f"{k}\t{float(v)!r}\t{units[k]}" for k, v in measures.items()]
    return "\n".join(rows) + "\n"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name in the same folder."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


class Staging:
    """A staging folder under ``root``; :meth:`commit` renames its files into place.

    Use as a context manager: on an exception the staging folder is removed and
    nothing reaches ``root``.
    """

    def __init__(self, root: Path, prefix: str):
        self.root = Path(root)
        self.dir = self.root / f".anat-staging-{prefix}-{uuid.uuid4().hex[:12]}"

    def __enter__(self) -> "Staging":
        self.dir.mkdir(parents=True)
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, relative: str) -> Path:
        """Where to write ``relative`` (a path from the derivatives root) while staging."""
        p = self.dir / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, order: list[str]) -> dict[str, Path]:
        """Rename staged files into place in ``order``; undo all of them on failure."""
        missing = [r for r in order if not (self.dir / r).is_file()]
        if missing:
            raise AnatOutputError(f"staging {self.dir}: outputs missing before commit: {missing}")
        done: list[Path] = []
        try:
            for rel in order:
                target = self.root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.dir / rel, target)
                done.append(target)
        except OSError as exc:
            for target in done:
                target.unlink(missing_ok=True)
            raise AnatOutputError(f"could not move outputs into {self.root}: {exc}") from exc
        return {rel: self.root / rel for rel in order}
