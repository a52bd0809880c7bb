"""Reason codes: the machine-readable vocabulary of why something was refused, failed or flagged.

The tables store these codes (``reason_code`` in ``qc`` and ``deviations``; ``code`` in each
quarantine ``reason.json``), so they are part of the contract between corelab and whoever reads
its lake: a nightly job picks what to retry by code, a dashboard counts failures by code, a
statistician filters by code. Every error a stage raises carries one (``tasks.errors``).

Categories
    infrastructure  the work did not happen; nothing is known to be wrong with the data
    input           the data as received cannot be used (a site must correct or re-send it)
    phi             an identifying value is, or may be, left: fail closed
    pipeline        a pipeline or conversion ran on the data and could not produce its outputs
    qc              the outputs exist and a quality metric is beyond the trial's limits
    contract        a value does not meet a table's or a path's contract (a bug or a bad call)

``retryable`` marks transient failures only: the same call may succeed in seconds (storage or
network down for a moment, a container engine that did not answer). Prefect retries exactly
these (``tasks.errors.transient``); nothing else is retried by Prefect, and a transient failure
that outlasts the retries fails the run instead of becoming a verdict. The nightly reprocessing
re-runs work whose recorded verdict carries a code of the ``infrastructure`` category.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Category = Literal["infrastructure", "input", "phi", "pipeline", "qc", "contract"]


@dataclass(frozen=True)
class Reason:
    code: str
    category: Category
    retryable: bool
    description: str


REASONS: dict[str, Reason] = {r.code: r for r in (
    # infrastructure
    Reason("storage_unavailable", "infrastructure", True, "the lake could not be read or written (disk, network, S3)"),
    Reason("engine_unavailable", "infrastructure", True, "the container engine did not answer"),
    Reason("engine_missing", "infrastructure", False, "the backend's container engine is not installed on this worker"),
    Reason("image_missing", "infrastructure", False, "the locked image is not in the engine's storage"),
    Reason("digest_mismatch", "infrastructure", False, "the engine's image is not the digest containers/lock pins"),
    Reason("stale_lock", "infrastructure", False, "the image definition changed after the locked image was built"),
    Reason("version_mismatch", "infrastructure", False,
           "local backend: this environment differs from the image's lock"),
    Reason("deface_template_missing", "infrastructure", False,
           "pydeface's face template is not installed on this worker (make setup installs it)"),
    Reason("run_refused", "infrastructure", False,
           "the run could not be attempted (unknown backend, unmountable path)"),
    Reason("audit_chain_broken", "infrastructure", False,
           "the lake's audit log is behind its anchor, left the anchored history or fails its key: "
           "nothing is appended until an operator has run `corelab audit verify`"),
    Reason("audit_anchor_invalid", "infrastructure", False,
           "the audit anchor store is inside the lake, or its record of the lake is unreadable"),
    Reason("receiver_failed", "infrastructure", False,
           "the DICOM receiver could not start (address in use, TLS without client certificates)"),
    Reason("watcher_failed", "infrastructure", False,
           "the upload drop watcher cannot list its drop root, or cannot stage an upload locally"),
    # input
    Reason("upload_not_found", "input", False, "the upload path does not exist"),
    Reason("bad_archive", "input", False, "a zip archive cannot be opened"),
    Reason("corrupt_gzip", "input", False, "a gzip-compressed file cannot be decompressed"),
    Reason("not_dicom", "input", False, "a file is not DICOM"),
    Reason("unreadable", "input", False, "a DICOM file cannot be parsed (truncated?)"),
    Reason("bad_value", "input", False, "an element corelab reads holds a value that cannot be decoded"),
    Reason("symlink", "input", False, "a symbolic link in an upload (never followed)"),
    Reason("missing_uid", "input", False, "a DICOM file lacks a required UID"),
    Reason("no_pixel_data", "input", False, "a DICOM image holds no pixel data (truncated)"),
    Reason("not_an_image", "input", False,
           "a DICOM object that is no image (a structured report, a protocol report, raw data), kept apart"),
    Reason("dicomdir", "input", False, "a DICOMDIR (the media's index), kept apart and read for completeness"),
    Reason("incomplete_series", "input", False,
           "a series lacks files or volumes its headers or the media's DICOMDIR promise; not converted"),
    Reason("incomplete_header", "input", False, "an image header lacks its size elements"),
    Reason("pixel_size", "input", False, "the pixel data is shorter or longer than the header promises"),
    Reason("duplicate_uid", "input", False, "a SOPInstanceUID repeats with other content"),
    Reason("unattributable", "input", False, "the study cannot be attributed to a trial subject or visit"),
    Reason("date_unreadable", "input", False, "no date element of the study holds a valid date"),
    Reason("derived_image", "input", False,
           "a derived image (ADC, trace, MPR...) in an acquired series, kept apart from the acquisition"),
    Reason("study_elsewhere", "input", False, "the study is already in the lake under another site, subject or trial"),
    Reason("unknown_study", "input", False, "no received study has that key"),
    Reason("refused", "input", False, "refused for a reason without a code of its own"),
    Reason("association_refused", "input", False,
           "a DICOM association was refused: its calling AE title, from its source address, is not a site's"),
    Reason("upload_site_unknown", "input", False,
           "an upload was dropped under a folder (uploads/<folder>/) that is no site of the trial"),
    # phi
    Reason("burned_in", "phi", False, "the pixel data may hold identifying text"),
    Reason("deid_failed", "phi", False, "a data set could not be de-identified"),
    Reason("phi_left", "phi", False, "an identifying value is left after de-identification"),
    Reason("phi_in_output", "phi", False, "an output about to be written holds an identifying value"),
    Reason("deface_failed", "phi", False,
           "defacing could not be verified (a face may be left, or brain voxels were removed): "
           "the defaced image is withheld"),
    # pipeline
    Reason("conversion_failed", "pipeline", False, "dcm2niix could not convert a series"),
    Reason("conversion_ambiguous", "pipeline", False, "dcm2niix made more than one image from one series"),
    Reason("geometry_mismatch", "pipeline", False,
           "the converted image's matrix, slices or volumes differ from the DICOM headers'"),
    Reason("bids_name_invalid", "pipeline", False, "an output name is not valid BIDS"),
    Reason("input_unsupported", "pipeline", False, "the pipeline does not take an entity of the input's name"),
    Reason("pipeline_failed", "pipeline", False, "the pipeline exited with an error"),
    Reason("pipeline_timeout", "pipeline", False, "the pipeline ran out of time and was stopped"),
    Reason("pipeline_incomplete", "pipeline", False, "the pipeline exited 0 but left a promised output out"),
    Reason("derivatives_unreadable", "pipeline", False, "the pipeline's outputs cannot be read for QC"),
    # qc
    Reason("metric_missing", "qc", False, "a QC metric could not be computed"),
    Reason("qc_limit", "qc", False, "a QC metric is beyond the trial's limit"),
    Reason("qc_site_outlier", "qc", False, "a QC metric is far from the site's own distribution"),
    Reason("not_a_head", "qc", False,
           "the image does not look like a T1-weighted head (template agreement, tissue contrast order, "
           "scalp around the brain): a phantom, another object, another contrast or a misoriented image"),
    # contract
    Reason("schema_violation", "contract", False, "rows do not meet their table's schema"),
    Reason("lake_path_invalid", "contract", False, "a lake path is absolute or leaves the lake"),
    Reason("export_refused", "contract", False, "the export cannot be made as asked"),
    Reason("override_invalid", "contract", False, "a reviewer override names no processed series or is incomplete"),
    Reason("query_invalid", "contract", False,
           "a query step names no query or several, lacks its text, or the query's state does not allow it"),
)}

CODES = frozenset(REASONS)


def codes_in(category: Category) -> frozenset[str]:
    """Every reason code of one category."""
    return frozenset(code for code, r in REASONS.items() if r.category == category)
