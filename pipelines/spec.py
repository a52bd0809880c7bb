"""Pipeline specs: the whole contract between a pipeline and the stages that run and judge it.

A spec is data, not code: the runner (``tasks/run/runner.py``) turns it into a command for one
backend and checks the outputs it promises after each run (the way fmriprep's CI compares a run
with ``ds005_outputs.txt``); the QC stage (``tasks/qc``) reads those outputs by their keys, the
measures the spec declares with their units, and the QC values the pipeline reports in a
sidecar. Nothing under ``tasks/`` knows a pipeline's file names, so adding a pipeline touches
``pipelines/`` and ``containers/`` only.

The image is named by its key in the lock (``containers/lock`` unless the spec says where its
definitions live); the lock, not the spec, holds the digest, so rebuilding an image never edits
a spec.

Command templates use ``str.format`` fields filled by :meth:`PipelineSpec.render`:
``{input}``, ``{output_dir}``, ``{subject}``, ``{session}`` (literal braces are doubled). Optional
parameters (BIDS entities, threads, the container digest) are appended as ``flag value`` only
when given.

Output keys the stages after the run understand
    ``measures``              TSV with ``measure``, ``value``, ``unit`` columns (the biomarkers)
    ``brain_mask``            the brain mask on the input's grid
    ``preproc``               the bias-corrected input
    ``probseg_GM``/``_WM``/``_CSF``  tissue probability maps on the input's grid
Any other key (figures, dataset_description, a dseg) is checked after the run and kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from data_contracts.bids import ENTITY_ORDER, LABEL, EntityError, entity_prefix
from data_contracts.qc_settings import IMAGE_QC_GROUPS
from pipelines.images import CONTAINERS

_NAME = re.compile(LABEL)   # a pipeline name is a BIDS label, hyphens allowed


class SpecError(ValueError):
    """A pipeline spec, or the values given to render it, are not usable."""


@dataclass(frozen=True)
class BidsQuery:
    """Which files of a BIDS raw dataset a pipeline takes as input.

    Parameters
    ----------
    datatype : str
        BIDS datatype folder, e.g. ``"anat"``.
    suffix : str
        BIDS suffix, e.g. ``"T1w"``.
    extensions : tuple of str
        Accepted file extensions, most preferred first.
    """

    datatype: str
    suffix: str
    extensions: tuple[str, ...] = (".nii.gz", ".nii")

    def matches(self, relpath: str) -> bool:
        """Whether a dataset-relative path (``sub-*/[ses-*/]<datatype>/<name>``) is an input."""
        parts = relpath.replace("\\", "/").split("/")
        if len(parts) < 3 or parts[-2] != self.datatype or not parts[0].startswith("sub-"):
            return False
        name = parts[-1]
        for ext in self.extensions:
            if name.endswith(ext):
                return name[: -len(ext)].split("_")[-1] == self.suffix
        return False


@dataclass(frozen=True)
class Measure:
    """One value the pipeline reports in its ``measures`` table, and its unit.

    An ``optional`` measure is reported only when the run had what it needs (the dwi pipeline's
    T1-based white-matter means, when the session has a T1); its absence is not an incomplete run.
    """

    name: str
    unit: str
    description: str = ""
    optional: bool = False


@dataclass(frozen=True)
class Upstream:
    """An output of another pipeline's run on the same session that this pipeline takes when it exists.

    The flow runs ``pipeline`` first and passes its ``output`` (an output key of that spec) of a
    series it judged usable as ``flag <path>``; the runner mounts the file read-only beside the
    input and records its hash with the run's inputs. ``key`` names it in :meth:`PipelineSpec.render`.
    """

    key: str
    pipeline: str
    output: str
    flag: str


@dataclass(frozen=True)
class SidecarMetric:
    """A QC metric the pipeline reports itself, read from the ``QC`` object of a sidecar.

    ``path`` is dotted (``bias_field.p95``); with ``minus`` the metric is the difference of
    the two values (a spread such as p95 - p05).
    """

    metric: str
    path: str
    minus: str | None = None


@dataclass(frozen=True)
class PipelineSpec:
    """A versioned pipeline and the pinned image that runs it.

    Parameters
    ----------
    name, version : str
        Pipeline name and version; derivatives go to ``derivatives/<name>-<version>/``.
    image : str
        Key of the image in the lock (and folder ``<definitions>/<image>/``).
    command : tuple of str
        Command template run inside the image (and by the ``local`` backend).
    inputs : tuple of BidsQuery
        The raw-dataset files the pipeline accepts.
    outputs : mapping of str to str
        Output key -> path relative to the output folder, as a template with ``{prefix}`` (the
        BIDS entity prefix ``sub-S_ses-V[_acq-X][_run-N]``), ``{subject}``, ``{session}``,
        ``{name}`` and ``{version}``; each must exist after a successful run.
    measures : tuple of Measure
        What the ``measures`` output reports, with units; a run reporting anything else is
        incomplete.
    image_qc : tuple of str
        Which groups of image QC metrics the QC stage computes
        (``data_contracts.qc_settings.IMAGE_QC_GROUPS``; the spec must declare their outputs).
    qc_sidecar : str or None
        Output key whose JSON sidecar (same name, ``.json``) holds the pipeline's own QC values.
    qc_metrics : tuple of SidecarMetric
        The QC metrics read from that sidecar.
    options : mapping of str to str
        Optional parameter name to command-line flag, e.g. ``{"threads": "--threads"}``. Those
        named like BIDS entities are the entities the pipeline takes from its input's name.
    bids_ignore : tuple of str
        Outputs no BIDS rule covers (reviewer figures, measure tables), as ``.bidsignore``
        patterns; corelab writes them, and its own provenance files, into the derivatives'
        ``.bidsignore`` so the BIDS validator checks everything else.
    upstream : tuple of Upstream
        Outputs of other pipelines on the same session this one takes when they exist (the
        dwi pipeline's white matter from the session's T1 segmentation).
    sources : tuple of str
        Folders (relative to the definitions' parent) holding the pipeline's code; their hash
        goes into the lock at build time, and the ``local`` backend compares it with the tree.
    definitions : Path
        Folder of the image definitions and their lock (``containers/`` of this repository).
    """

    name: str
    version: str
    image: str
    command: tuple[str, ...]
    inputs: tuple[BidsQuery, ...]
    outputs: Mapping[str, str]
    measures: tuple[Measure, ...] = ()
    image_qc: tuple[str, ...] = ()
    qc_sidecar: str | None = None
    qc_metrics: tuple[SidecarMetric, ...] = ()
    options: Mapping[str, str] = field(default_factory=dict)
    bids_ignore: tuple[str, ...] = ()
    upstream: tuple[Upstream, ...] = ()
    sources: tuple[str, ...] = ()
    definitions: Path = CONTAINERS

    def __post_init__(self) -> None:
        if not _NAME.match(self.name.replace("-", "")) or not self.version:
            raise SpecError(f"pipeline name {self.name!r} / version {self.version!r} is not usable")
        if not self.command:
            raise SpecError(f"pipeline {self.name!r}: empty command")
        unknown = sorted(set(self.image_qc) - set(IMAGE_QC_GROUPS))
        if unknown:
            raise SpecError(f"pipeline {self.name!r}: unknown image QC groups {unknown}; known: "
                            f"{list(IMAGE_QC_GROUPS)}")
        for group in self.image_qc:
            lacking = [k for k in IMAGE_QC_GROUPS[group][1] if k not in self.outputs]
            if lacking:
                raise SpecError(f"pipeline {self.name!r}: image QC group {group!r} is computed from outputs "
                                f"{lacking}, which the spec does not declare")
        if self.measures and "measures" not in self.outputs:
            raise SpecError(f"pipeline {self.name!r} declares measures but no 'measures' output")
        if self.qc_sidecar is not None and self.qc_sidecar not in self.outputs:
            raise SpecError(f"pipeline {self.name!r}: qc_sidecar {self.qc_sidecar!r} is not an output key")
        clash = sorted({u.key for u in self.upstream} & set(self.options))
        if clash or len({u.key for u in self.upstream}) != len(self.upstream):
            raise SpecError(f"pipeline {self.name!r}: upstream keys must be unique and not options ({clash})")
        if any(u.pipeline == self.name for u in self.upstream):
            raise SpecError(f"pipeline {self.name!r} cannot take its own outputs as upstream")
        object.__setattr__(self, "outputs", MappingProxyType(dict(self.outputs)))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def entities(self) -> tuple[str, ...]:
        """The BIDS entities the pipeline takes from its input's name (in entity-table order)."""
        return tuple(k for k in ENTITY_ORDER if k in self.options)

    @property
    def lock_path(self) -> Path:
        return self.definitions / "lock"

    def render(self, input: str, output_dir: str, subject: str, session: str,
               upstream: Mapping[str, str] | None = None, **optional: object) -> list[str]:
        """The command for one run, with container or host paths as given (``upstream``: key of
        an :class:`Upstream` -> the path of that file, appended as its flag).

        Raises
        ------
        SpecError
            A label that is not BIDS-safe, or an optional parameter the spec does not know.
        """
        bids_prefix(subject, session)  # checks both labels
        unknown = sorted(k for k, v in optional.items() if v is not None and k not in self.options)
        if unknown:
            raise SpecError(f"pipeline {self.name!r} takes no option(s) {unknown}; "
                            f"known: {sorted(self.options)}")
        values = {"input": input, "output_dir": output_dir, "subject": subject, "session": session}
        try:
            argv = [tok.format(**values) for tok in self.command]
        except KeyError as err:
            raise SpecError(f"pipeline {self.name!r}: command uses unknown field {err}") from None
        for key, flag in self.options.items():
            value = optional.get(key)
            if value is not None:
                argv += [flag, str(value)]
        upstream = dict(upstream or {})
        known = {u.key: u.flag for u in self.upstream}
        if set(upstream) - set(known):
            raise SpecError(f"pipeline {self.name!r} takes no upstream input(s) {sorted(set(upstream) - set(known))}; "
                            f"known: {sorted(known)}")
        for key, flag in known.items():
            if upstream.get(key) is not None:
                argv += [flag, str(upstream[key])]
        return argv

    def expected_outputs(self, subject: str, session: str,
                         entities: Mapping[str, str] | None = None) -> dict[str, str]:
        """Output key -> path (relative to the output folder) a successful run must leave."""
        fields = {"prefix": bids_prefix(subject, session, entities), "subject": subject,
                  "session": session, "name": self.name, "version": self.version}
        return {key: pattern.format(**fields) for key, pattern in self.outputs.items()}


def sidecar_of(path: str) -> str:
    """The JSON sidecar of a BIDS file: the same name with ``.json`` for its extension."""
    name = path.rsplit("/", 1)[-1]
    return path[: len(path) - len(name)] + name.split(".", 1)[0] + ".json"


def bids_prefix(subject: str, session: str, entities: Mapping[str, str] | None = None) -> str:
    """``sub-S_ses-V[_acq-X][_run-N]``: the entity part of a BIDS file name, in BIDS order."""
    try:
        return entity_prefix(subject, session, entities)
    except EntityError as err:
        raise SpecError(str(err)) from None
