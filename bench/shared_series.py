"""Every DICOM series of ../shared/data through intake and conversion, against its Ref (issue: every vendor's data).

Prints one row per series: the folder, series number and description, the intake verdict (with
the series type the example trial gives it), whether corelab's BIDS conversion made an image
(only series of a type the trial knows are converted), whether dcm2niix on the de-identified
series gives a NIfTI equal to one of the folder's ``Ref/`` NIfTIs (voxels, affine to 1e-4, and
bval/bvec when the Ref has them; "no ref" when the Ref snapshot has no NIfTI of that series),
and the seconds intake and conversion took. Each upload goes into a fresh lake, so the same
study in two folders (dcm_qa and dcm_qa_ts) is not refused as seen before.

Run: .venv/bin/python bench/shared_series.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import nibabel as nib  # noqa: E402
import numpy as np
from _flowbench import DATA  # noqa: E402  (paths, bench keys)

from data_contracts import example_path  # noqa: E402
from data_contracts.trial import load_trial  # noqa: E402
from tasks.bids.convert import ConversionError, convert_study, run_dcm2niix  # noqa: E402
from tasks.intake.inventory import inventory_upload  # noqa: E402
from tasks.lake.storage import Lake  # noqa: E402
from tasks.receive.record import record_study  # noqa: E402
from tasks.receive.study import Upload, receive_one_study  # noqa: E402

# upload folder (under ../shared/data), the example trial's site for it, the Ref folder
UPLOADS = [
    ("dcm_qa_nih/In/20180918GE", "ge-nih", "dcm_qa_nih/Ref"),
    ("dcm_qa_nih/In/20180918Si", "siemens-nih", "dcm_qa_nih/Ref"),
    ("dcm_qa/In", "siemens-trio", "dcm_qa/Ref"),
    ("dcm_qa_philips/In", "philips-achieva", "dcm_qa_philips/Ref"),
    ("dcm_qa_philips_enh/In", "philips-ingenia", "dcm_qa_philips_enh/Ref"),
    ("dcm_qa_xa30/In", "siemens-xa30", "dcm_qa_xa30/Ref"),
    *[(f"dcm_qa_ts/In/{n}.dcm", "siemens-ts", "dcm_qa_ts/Ref") for n in range(1, 10)],
    ("dcm_qa_agfa/Siemens", "siemens-vida", None),
    ("dcm_qa_agfa/Agfa", "agfa-pacs", None),
    *[(f"dcm_qa_12bit/In/{n}", "siemens-12bit", "dcm_qa_12bit/Ref")
      for n in ("12bitUnsigned.dcm", "12bitUnsigned_0x0F0F.dcm", "12bitSigned_0x0F0F.dcm")],
    ("dcm_qa_philips_dwi/In/cl", "philips-ingenia", "dcm_qa_philips_dwi/Ref"),
    ("dcm_qa_xa60/In", "siemens-xa30", "dcm_qa_xa60/Ref"),
]


def _refs(folder: str | None) -> list[tuple[Path, nib.Nifti1Image]]:
    if not folder:
        return []
    return [(p, nib.load(p)) for p in sorted((DATA / folder).glob("*.nii"))]


def _equal_ref(image: Path, refs: list[tuple[Path, nib.Nifti1Image]]) -> str:
    if not refs:
        return "no ref"
    ours = nib.load(image)
    data = np.asanyarray(ours.dataobj)
    for path, ref in refs:
        if ref.shape == ours.shape and np.allclose(ref.affine, ours.affine, atol=1e-4) \
                and np.array_equal(np.asanyarray(ref.dataobj), data):
            for ext in (".bval", ".bvec"):
                theirs, mine = path.with_suffix(ext), image.with_name(image.name.replace(".nii.gz", ext))
                if theirs.exists() and not (mine.exists() and np.allclose(
                        np.loadtxt(theirs), np.loadtxt(mine), atol=1e-4)):
                    return f"no ({ext} differs from {path.name})"
            return f"yes ({path.stem[:40]})"
    return "no ref" if not any(r.shape == ours.shape for _, r in refs) else "no (voxels differ)"


def _equal_gradients(image: Path, ref_folder: str | None) -> str:
    """For a Ref snapshot without NIfTIs: the bval/bvec of the series, against the Ref's."""
    mine = image.with_name(image.name.replace(".nii.gz", ".bval"))
    if not ref_folder or not mine.exists():
        return "no ref"
    ours_b, ours_v = np.loadtxt(mine), np.loadtxt(mine.with_suffix(".bvec"))
    for bval in sorted((DATA / ref_folder).glob("*.bval")):
        theirs_b, theirs_v = np.loadtxt(bval), np.loadtxt(bval.with_suffix(".bvec"))
        if theirs_b.shape == ours_b.shape and np.allclose(theirs_b, ours_b, atol=1e-4) \
                and np.allclose(theirs_v, ours_v, atol=1e-4):
            return f"bval/bvec yes ({bval.stem[:30]}; no Ref NIfTI)"
    return "no ref"


def main() -> None:
    trial = load_trial(example_path())
    rows = []
    with tempfile.TemporaryDirectory(prefix="corelab-shared-series-") as tmp:
        for k, (rel, site, ref_folder) in enumerate(UPLOADS):
            src = DATA / rel
            if not src.exists():
                rows.append((rel, "-", "-", "missing from ../shared/data", "-", "-", "-"))
                continue
            refs = _refs(ref_folder)
            lake = Lake(str(Path(tmp) / f"lake{k}")).init()
            t0 = time.perf_counter()
            inv = inventory_upload(src)
            studies: dict[str, list] = {}
            for f in inv.accepted:
                studies.setdefault(str(f.header.StudyInstanceUID), []).append(f)
            for files in studies.values():
                try:
                    o = receive_one_study(Upload(trial, site, f"u{k}", lake), files)
                except Exception as exc:  # attribution refusals are a verdict here, printed
                    rows.append((rel, "-", "-", f"refused: {getattr(exc, 'code', type(exc).__name__)}", "-", "-",
                                 f"{time.perf_counter() - t0:.1f}"))
                    continue
                record_study(lake, o, o.matcher)
                t_in = time.perf_counter() - t0
                t1 = time.perf_counter()
                images, _ = convert_study(lake, trial, o.study)
                t_bids = time.perf_counter() - t1
                for s in o.series:
                    bids = "yes" if s.series_uid in images else "no"
                    equal = "-"
                    if s.deid_path:
                        work = Path(tempfile.mkdtemp(dir=tmp, prefix=f"nii{k}-{s.series_number}-"))
                        try:
                            made = [p for p in run_dcm2niix(Path(lake.path(s.deid_path)), work, "img")
                                    if p.name.endswith(".nii.gz")]
                            equal = _equal_ref(made[0], refs)
                            if equal == "no ref":
                                equal = _equal_gradients(made[0], ref_folder)
                        except ConversionError as exc:
                            equal = f"no ({exc.code})"
                    rows.append((rel, str(s.series_number), (s.description or "")[:28],
                                 f"{s.verdict}{' as ' + s.series_type if s.series_type else ''}", bids, equal,
                                 f"{t_in:.1f}+{t_bids:.1f}"))
            if inv.rejected:
                codes: dict[str, int] = {}
                for r in inv.rejected:
                    codes[r.code] = codes.get(r.code, 0) + 1
                rows.append((rel, "-", f"{len(inv.rejected)} other files", "refused: " + ", ".join(
                    f"{c} x{n}" for c, n in sorted(codes.items())), "-", "-", "-"))
    head = ("upload", "series", "description", "intake verdict", "BIDS", "dcm2niix of deid == Ref", "s (in+bids)")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
