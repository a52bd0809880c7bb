"""Pipeline specs: what a pipeline is called, which pinned image runs it, how, on what, making what.

A spec is data, not code: the runner (``tasks/container_runner.py``) turns it into a command for
one backend, and checks the outputs it promises after each run (the way fmriprep's CI compares
a run with ``ds005_outputs.txt``). The image is named by its key in ``containers/lock``; the
lock, not the spec, holds the digest, so rebuilding an image never edits a spec.

Command templates use ``str.format`` fields filled by :meth:`PipelineSpec.render`:
``{input}``, ``{output_dir}``, ``{subject}``, ``{session}`` (literal braces are doubled). Optional parameters (BIDS
entities, threads, the container digest) are appended as ``flag value`` only when given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# BIDS labels are alphanumeric (BIDS 1.9, "Entities"); run is an index (digits).
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_INDEX = re.compile(r"^[0-9]+$")
_ENTITY_ORDER = ("acq", "run")  # the entities our pipelines accept, in BIDS order


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
class PipelineSpec:
    """A versioned pipeline and the pinned image that runs it.

    Parameters
    ----------
    name, version : str
        Pipeline name and version; derivatives go to ``derivatives/<name>-<version>/``.
    image : str
        Key of the image in ``containers/lock`` (and folder ``containers/<image>/``).
    command : tuple of str
        Command template run inside the image (and by the ``local`` backend).
    options : mapping of str to str
        Optional parameter name to command-line flag, e.g. ``{"threads": "--threads"}``.
    inputs : tuple of BidsQuery
        The raw-dataset files the pipeline accepts.
    outputs : tuple of str
        Output paths relative to the output folder, as templates with ``{prefix}`` (the BIDS
        entity prefix ``sub-S_ses-V[_acq-X][_run-N]``), ``{subject}``, ``{session}``,
        ``{name}`` and ``{version}``; each must exist after a successful run.
    sources : tuple of str
        Repository folders holding the pipeline's code; their hash goes into the lock at
        build time, and the ``local`` backend compares it with the working tree.
    """

    name: str
    version: str
    image: str
    command: tuple[str, ...]
    inputs: tuple[BidsQuery, ...]
    outputs: tuple[str, ...]
    options: Mapping[str, str] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _LABEL.match(self.name.replace("-", "")) or not self.version:
            raise SpecError(f"pipeline name {self.name!r} / version {self.version!r} is not usable")
        if not self.command:
            raise SpecError(f"pipeline {self.name!r}: empty command")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def render(self, input: str, output_dir: str, subject: str, session: str,
               **optional: object) -> list[str]:
        """The command for one run, with container or host paths as given.

        Raises
        ------
        SpecError
            A label that is not BIDS-safe, or an optional parameter the spec does not know.
        """
        _check_label("subject", subject)
        _check_label("session", session)
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
        return argv

    def expected_outputs(self, subject: str, session: str,
                         entities: Mapping[str, str] | None = None) -> list[str]:
        """Output paths (relative to the output folder) a successful run must leave."""
        fields = {"prefix": bids_prefix(subject, session, entities), "subject": subject,
                  "session": session, "name": self.name, "version": self.version}
        return [pattern.format(**fields) for pattern in self.outputs]


def bids_prefix(subject: str, session: str, entities: Mapping[str, str] | None = None) -> str:
    """``sub-S_ses-V[_acq-X][_run-N]``: the entity part of a BIDS file name, in BIDS order."""
    _check_label("subject", subject)
    _check_label("session", session)
    entities = dict(entities or {})
    unknown = sorted(set(entities) - set(_ENTITY_ORDER))
    if unknown:
        raise SpecError(f"entities {unknown} are not supported (supported: {list(_ENTITY_ORDER)})")
    parts = [f"sub-{subject}", f"ses-{session}"]
    for key in _ENTITY_ORDER:
        if entities.get(key) is not None:
            value = str(entities[key])
            _check_label(key, value, index=key == "run")
            # An index is written without leading zeros, as the pipelines name their files.
            parts.append(f"{key}-{int(value) if key == 'run' else value}")
    return "_".join(parts)


def _check_label(what: str, value: str, *, index: bool = False) -> None:
    pattern = _INDEX if index else _LABEL
    if not isinstance(value, str) or not pattern.match(value):
        kind = "digits" if index else "letters and digits"
        raise SpecError(f"BIDS {what} {value!r} must be {kind} only")
