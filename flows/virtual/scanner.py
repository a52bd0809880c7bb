"""A virtual scanner: real anatomy made into new subjects and written as a vendor's scanner writes a T1.

The virtual trial (issue 12) needs many subjects over several visits at several sites from the few
real heads in ../shared/data. :func:`subject_head` makes a subject from a real head: a known scaling
of the whole head with age (``AGE_VOLUME_SLOPE`` per year of volume about ``AGE_REF``; the planted
age effect) and a small smooth random warp (a B-spline of ``WARP_MM`` displacement; the subject's
own anatomy), resampled with SimpleITK onto the scanner's slice grid. :func:`write_t1_series` then
writes it as classic single-frame MR slices the way the vendor's real series in ../shared/data is
written: that series' own header (its private blocks included) is the template, and only what
an acquisition changes is set per series and per slice (UIDs, geometry, pixel data and scaling,
patient, dates, scanner software). A :class:`Scanner` carries what a site's scanner adds: a
gradient-calibration error (the true voxel is ``calibration`` times the one the header states: a
multiplicative effect on every volume), its contrast (``gamma`` on intensities: tissue boundaries
move, an additive-like effect on tissue volumes), a bias field and a noise level.

Written by hand because no kept library writes vendor-faithful DICOM from an array; pydicom writes
each file, SimpleITK resamples.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

AGE_REF = 50.0
AGE_VOLUME_SLOPE = -0.004      # head (and brain) volume: -0.4 % a year about AGE_REF
WARP_MM = 1.5                  # standard deviation of the subject's B-spline displacements
MESH = (4, 4, 4)               # B-spline mesh of the subject's warp
# The real heads are stored with a compressed range (chris_t1 is uint8): resampled to 2 mm as they
# are, the anat gate WARNs on tissue order (0.061, measured); intensities ** 1.6 give a 3 T MPRAGE's
# GM/WM contrast (tissue order 0.29, every metric PASS, measured). A scanner's own gamma multiplies it.
BASE_GAMMA = 1.6


@dataclass(frozen=True)
class Grid:
    """The slice grid of an acquisition: sagittal or axial slices of square pixels."""

    orientation: tuple[float, ...]      # ImageOrientationPatient (row, column direction cosines, LPS)
    spacing_mm: float = 2.0
    matrix: int = 128                   # rows = columns
    slices: int = 88

    def directions(self) -> np.ndarray:
        row, col = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
        return np.column_stack([row, col, np.cross(row, col)])

    def image(self, center: np.ndarray) -> sitk.Image:
        """An empty SimpleITK image of this grid centred on ``center`` (LPS, mm)."""
        d = self.directions()
        size = np.array([self.matrix, self.matrix, self.slices])
        origin = center - d @ (self.spacing_mm * (size - 1) / 2)
        img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
        img.SetSpacing([self.spacing_mm] * 3)
        img.SetDirection(d.flatten().tolist())
        img.SetOrigin(origin.tolist())
        return img


@dataclass(frozen=True)
class Scanner:
    """A site's scanner: its vendor template and what it adds to every image it writes."""

    vendor: str                          # key of TEMPLATES
    software_versions: str
    serial: str
    calibration: float = 1.0             # true voxel / stated voxel (gradient calibration)
    gamma: float = 1.0                   # contrast: intensities ** gamma
    bias: float = 0.15                   # amplitude of the smooth multiplicative bias field
    noise: float = 0.02                  # noise sd as a fraction of the brightest tissue
    grid: Grid = field(default_factory=lambda: Grid(TEMPLATE_ORIENTATION["philips"]))
    model: str | None = None             # ManufacturerModelName (the template's when None)
    slices_kept: int | None = None       # a technologist cutting the slab short: the first n slices


@dataclass(frozen=True)
class Person:
    """Who is scanned: the PHI a real header would carry (de-identification must remove it)."""

    patient_id: str
    name: str
    sex: str                             # M or F
    birth_date: date
    weight_kg: float = 75.0


#: vendor -> a real classic single-frame file of ../shared/data whose header is the template. Only
#: Philips' is a T1 there; Siemens' (a Trio EPI mosaic) and GE's (a DISCOVERY MR750 EPI slice) are
#: made T1s by :data:`T1_PROTOCOL`: what the vendor's own T1 header states instead of the EPI's.
TEMPLATES = {
    "philips": ("dcm_qa_philips_enh", "In", "cl", "1301_0001.dcm.gz"),
    "siemens": ("dcm_qa", "In", "Orientation", "ax", "axasc35",
                "MR.1.3.12.2.1107.5.2.32.35131.2014031012493950715786673"),
    "ge": ("dcm_qa_nih", "In", "20180918GE", "mr_0004", "axial_epi_fmri_interleaved_i_to_s-00001.dcm"),
}
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
TEMPLATE_ORIENTATION = {"philips": (-0.0386, 0.99925, -0.00235, 0.06086, 0.0, -0.99815),
                        "siemens": SAGITTAL, "ge": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)}   # GE: axial BRAVO
#: vendor -> the standard elements of its 3D T1 (Siemens MPRAGE, GE BRAVO) set over the EPI template
T1_PROTOCOL: dict[str, dict[str, object]] = {
    "siemens": {"SeriesDescription": "t1_mprage_sag_p2_iso", "ProtocolName": "t1_mprage_sag_p2_iso",
                "SequenceName": "*tfl3d1_16ns", "ScanningSequence": "GR\\IR", "SequenceVariant": "SK\\SP\\MP",
                "ScanOptions": "IR", "MRAcquisitionType": "3D", "RepetitionTime": "2300", "EchoTime": "2.98",
                "InversionTime": "900", "FlipAngle": "9", "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
                "EchoTrainLength": "1", "PixelBandwidth": "240"},
    "ge": {"SeriesDescription": "Ax 3D T1 BRAVO", "ProtocolName": "Ax 3D T1 BRAVO",
           "ScanningSequence": "GR", "SequenceVariant": "SS\\SK", "ScanOptions": "FAST_GEMS\\EDR_GEMS\\ACC_GEMS",
           "MRAcquisitionType": "3D", "RepetitionTime": "8.2", "EchoTime": "3.2", "InversionTime": "450",
           "FlipAngle": "12", "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"], "EchoTrainLength": "1",
           "PixelBandwidth": "244.141"},
}
#: private elements of the EPI templates that describe an EPI time series, not a T1 (dcm2niix reads
#: them: Siemens' mosaic count, slice times and CSA image header; GE's slice-timing and EPI fields)
EPI_ONLY = {"siemens": [(0x0019, 0x100A), (0x0019, 0x1029), (0x0029, 0x1010)],
            "ge": [(0x0019, 0x10A2), (0x0021, 0x105E), (0x0043, 0x102C), (0x0043, 0x102D),
                   (0x0043, 0x1083), (0x0043, 0x1088)]}
#: vendor -> private elements its T1 states differently from the EPI template (GE: pulse sequence
#: names, which dcm2niix reads to name the sequence)
T1_PRIVATE = {"ge": {(0x0019, 0x109C): "efgre3d", (0x0019, 0x109E): "EFGRE3D"}}
EPI_STANDARD = ("NumberOfTemporalPositions", "TemporalPositionIdentifier", "TriggerTime", "TemporalResolution")


def read_template(data: Path, vendor: str) -> Dataset:
    """The vendor's real header, made a 3D T1 where the real file is an EPI (:data:`T1_PROTOCOL`)."""
    path = data.joinpath(*TEMPLATES[vendor])
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.decode()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian        # written as the scanner's own
    for tag in EPI_ONLY.get(vendor, []):
        if tag in ds:
            del ds[tag]
    for kw in EPI_STANDARD:
        if kw in ds:
            delattr(ds, kw)
    for kw, value in T1_PROTOCOL.get(vendor, {}).items():
        setattr(ds, kw, value)
    for tag, value in T1_PRIVATE.get(vendor, {}).items():
        if tag in ds:
            ds[tag].value = value
    return ds


def subject_head(source: sitk.Image, age: float, seed: int, grid: Grid) -> sitk.Image:
    """A new subject from a real head: scaled for ``age``, warped by ``seed``, on ``grid``."""
    src = sitk.Cast(source, sitk.sitkFloat32)
    size = np.array(src.GetSize())
    center = np.array(src.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    linear = (1.0 + AGE_VOLUME_SLOPE * (age - AGE_REF)) ** (1 / 3)
    scale = sitk.ScaleTransform(3, [1.0 / linear] * 3)     # output point -> input point: anatomy * linear
    scale.SetCenter(center.tolist())
    warp = sitk.BSplineTransformInitializer(src, list(MESH))
    rng = np.random.default_rng(seed)
    warp.SetParameters(rng.normal(0.0, WARP_MM, len(warp.GetParameters())).tolist())
    composite = sitk.CompositeTransform([scale, warp])
    return sitk.Resample(src, grid.image(center), composite, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def scanner_image(head: sitk.Image, scanner: Scanner, seed: int) -> np.ndarray:
    """The voxel values the scanner stores: contrast, bias field, noise; array [slice, row, col], >= 0."""
    a = sitk.GetArrayFromImage(head).astype(np.float64)
    top = np.percentile(a[a > 0], 99) if (a > 0).any() else 1.0
    a = np.clip(a / top, 0, None) ** (BASE_GAMMA * scanner.gamma)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in a.shape], indexing="ij")
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 1, 6)
    field = np.exp(scanner.bias * (c[0] * x + c[1] * y + c[2] * z + 0.5 * (c[3] * x * y + c[4] * y * z + c[5] * x * z)))
    a = a * field
    n1, n2 = rng.normal(0, scanner.noise, a.shape), rng.normal(0, scanner.noise, a.shape)
    return np.sqrt((a + n1) ** 2 + n2 ** 2)                  # Rician, as magnitude images are


def write_t1_series(out: Path, template: Dataset, head: sitk.Image, scanner: Scanner, person: Person,
                    study_uid: str, scan_date: date, seed: int, series_number: int = 301,
                    header: dict[str, object] | None = None) -> list[Path]:
    """Write ``head`` as the vendor writes a T1: one classic MR file per slice in ``out``.

    ``header``: standard elements this one series states differently (a protocol deviation).
    """
    out.mkdir(parents=True, exist_ok=True)
    values = scanner_image(head, scanner, seed)[:scanner.slices_kept]
    bits = int(template.BitsStored)
    slope = float(template.get("RescaleSlope", 1.0) or 1.0)
    stored = np.clip(np.round(values / values.max() * (2 ** bits - 1) * 0.9), 0, 2 ** bits - 1).astype(np.uint16)
    d = np.array(head.GetDirection()).reshape(3, 3)
    origin = np.array(head.GetOrigin())
    stated = scanner.grid.spacing_mm / scanner.calibration   # what the header says one voxel is
    series_uid, frame_uid = generate_uid(), generate_uid()
    day = scan_date.strftime("%Y%m%d")
    age = scan_date.year - person.birth_date.year - ((scan_date.month, scan_date.day)
                                                       < (person.birth_date.month, person.birth_date.day))
    files = []
    for k in range(stored.shape[0]):
        ds = copy.deepcopy(template)
        position = origin + d[:, 2] * stated * k
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientID, ds.PatientName, ds.PatientSex = person.patient_id, person.name, person.sex
        ds.PatientBirthDate, ds.PatientAge = person.birth_date.strftime("%Y%m%d"), f"{age:03d}Y"
        ds.PatientWeight = f"{person.weight_kg:.1f}"
        for el in ds:                                      # every date of the template is this scan's day
            if el.VR == "DA" and el.tag != 0x00100030 and not el.tag.is_private:   # (the birth date below)
                el.value = day
        ds.AccessionNumber = "A" + hashlib.sha256(f"{person.patient_id}|{day}".encode()).hexdigest()[:10].upper()
        ds.SoftwareVersions, ds.DeviceSerialNumber = scanner.software_versions, scanner.serial
        if scanner.model:
            ds.ManufacturerModelName = scanner.model
        for kw, value in (header or {}).items():
            setattr(ds, kw, value)
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.PixelSpacing = [f"{stated:.6g}", f"{stated:.6g}"]
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{stated:.6g}"
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.SliceLocation = f"{float(position @ d[:, 2]):.6f}"
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", "0"
        for kw in ("LargestImagePixelValue", "SmallestImagePixelValue", "WindowCenter", "WindowWidth"):
            if kw in ds:
                delattr(ds, kw)
        if (0x2001, 0x100A) in ds:                         # Philips: slice number (private)
            ds[0x2001, 0x100A].value = k + 1
        if (0x0021, 0x104F) in ds:                         # GE: locations in acquisition (private)
            ds[0x0021, 0x104F].value = stored.shape[0]
        for kw in ("ImagesInAcquisition", "NumberOfSlices"):
            if kw in ds:
                setattr(ds, kw, stored.shape[0])
        ds.PixelData = stored[k].tobytes()
        path = out / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files
