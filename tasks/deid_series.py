"""De-identify one series, prove it clean, and only then let it into ``deid/``.

The series is de-identified in memory, every output (bytes and file name) is
searched for the original identifying values by :mod:`tasks.phi_verify`, and
the series is written to ``deid/<site>/<subject>/<session>/<series>/`` only
when no value is found. Otherwise nothing is written and the caller
quarantines the series: fail closed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from tasks.deid import DeidContext, DeidError, deidentify, to_bytes
from tasks.dicom_params import SECONDARY_CAPTURE_PREFIX
from tasks.inventory import ReceivedFile
from tasks.phi_verify import Leak, Matcher, find_leaks
from tasks.storage import Lake


@dataclass
class DeidSeries:
    """The verified, de-identified series (or why it was refused)."""

    series_uid: str                      # new SeriesInstanceUID
    folder: str                          # lake folder under deid/
    files: dict[str, bytes] = field(default_factory=dict, repr=False)  # file name -> bytes
    sources: dict[str, str] = field(default_factory=dict)  # file name -> upload rel path
    description: str = ""
    leaks: list[Leak] = field(default_factory=list)
    refused: str | None = None           # reason when not accepted
    refused_code: str | None = None

    @property
    def ok(self) -> bool:
        return self.refused is None

    @property
    def content_sha256(self) -> str:
        digests = sorted(hashlib.sha256(b).hexdigest() for b in self.files.values())
        return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def burned_in(files: list[ReceivedFile]) -> str | None:
    """Why the pixels may carry text (PHI we cannot search), or None."""
    first = files[0].header
    if str(first.get("BurnedInAnnotation", "")).upper() == "YES":
        return "BurnedInAnnotation is YES"
    if str(first.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE_PREFIX):
        return "secondary capture (screenshots often carry burned-in text)"
    return None


def series_folder(site: str, subject: str, session: str, series_number: int, series_uid: str) -> str:
    tag = hashlib.sha256(series_uid.encode()).hexdigest()[:8]
    return f"deid/{site}/{subject}/{session}/series-{series_number:04d}-{tag}"


def deidentify_series(files: list[ReceivedFile], ctx: DeidContext, matcher: Matcher,
                      series_number: int) -> DeidSeries:
    """De-identify and verify every file of one series, in memory."""
    new_series_uid = ctx.new_uid(str(files[0].header.SeriesInstanceUID))
    out = DeidSeries(new_series_uid, series_folder(ctx.site, ctx.subject, ctx.session,
                                                   series_number, new_series_uid))
    why = burned_in(files)
    if why:
        out.refused, out.refused_code = f"pixel data may hold identifying text: {why}", "burned_in"
        return out
    for f in files:
        try:
            ds = f.dataset
            deidentify(ds, ctx)
            data = to_bytes(ds)
        except (DeidError, ValueError, TypeError, AttributeError, OverflowError) as exc:
            out.refused = f"{f.rel}: de-identification failed ({type(exc).__name__}: {exc})"
            out.refused_code = "deid_failed"
            return out
        name = f"{int(ds.get('InstanceNumber', 0) or 0):05d}-{hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:12]}.dcm"
        out.files[name] = data
        out.sources[name] = f.rel
        out.description = str(ds.get("SeriesDescription", "") or "")
    for name, data in out.files.items():
        out.leaks += find_leaks(f"{out.folder}/{name}", data, matcher)
    if out.leaks:
        kinds = sorted({leak.source for leak in out.leaks})
        out.refused = (f"de-identification could not be verified: {len(out.leaks)} identifying "
                       f"value(s) left ({', '.join(kinds)})")
        out.refused_code = "phi_left"
    return out


def write_series(lake: Lake, series: DeidSeries) -> list[str]:
    """Write a verified series to deid/ (refuses an unverified one)."""
    if not series.ok:
        raise ValueError(f"refusing to write an unverified series to deid/: {series.refused}")
    return [lake.write_bytes(f"{series.folder}/{name}", data) for name, data in sorted(series.files.items())]
