"""Vendor private elements kept under the Retain Safe Private Option.

Only what dcm2niix reads to convert correctly (slice timing, mosaic slice
count, phase-encoding polarity, echo spacing, Philips scaling, b-values, table
position ...), taken from dcm2niix's DICOM reader (console/nii_dicom.cpp and
the v1.0.20260724 binary) and checked on ../shared/data: keeping exactly
these gives dcm2niix output identical to the untouched files (voxels, header,
sidecar). Elements that hold identifiers (GE scanner study UID and ID, Siemens
CSA header versions that equal the study date, Philips exam card names) are
deliberately not here. Keys: (private creator, group, element offset in the
block). Private blocks are never renumbered, because dcm2niix looks several
of them up by fixed element number.
"""

from __future__ import annotations


def _block(creator: str, group: int, offsets: list[int]) -> set[tuple[str, int, int]]:
    return {(creator, group, o) for o in offsets}


SIEMENS = (
    _block("SIEMENS MR HEADER", 0x0019, [0x0A, 0x0C, 0x0E, 0x14, 0x18, 0x28, 0x29])
    | _block("SIEMENS CSA HEADER", 0x0029, [0x10, 0x20])  # CSA image and series headers
    | _block("SIEMENS MR HEADER", 0x0051, [0x0B, 0x0E, 0x0F, 0x11])
    # XA enhanced: containers in the shared and per-frame functional groups, and what dcm2niix reads in them
    | _block("SIEMENS MR SDS 01", 0x0021, [0x05, 0x09, 0x19, 0x3F, 0x5A, 0x5B, 0x5C, 0xFE])
    | _block("SIEMENS MR SDI 02", 0x0021, [0x04, 0x06, 0x1C, 0x42, 0x4F, 0x53, 0x58, 0x75, 0x76,
                                           0x8A, 0x8E, 0xFE])
    | _block("SIEMENS CSA NON-IMAGE", 0x7FE1, [0x10])
)

GE = (
    _block("GEMS_ACQU_01", 0x0019, [0x17, 0x1B, 0x5A, 0x7F, 0x9C, 0x9E, 0xA2, 0xA9, 0xB2, 0xB3,
                                    0xB6, 0xBB, 0xBC, 0xBD, 0xDF, 0xE0, 0xE2])
    | _block("GEMS_RELA_01", 0x0021, [0x4F, 0x5A, 0x5E])
    | _block("GEMS_SERS_01", 0x0025, [0x1B])   # protocol data block: slice order, multiband
    | _block("GEMS_IMAG_01", 0x0027, [0x60, 0x61, 0x62])
    | _block("GEMS_PARM_01", 0x0043, [0x02, 0x03, 0x04, 0x2A, 0x2C, 0x2F, 0x30, 0x39, 0x7C, 0x83,
                                      0x95, 0xA3, 0xA4, 0xA5, 0xB2, 0xB6, 0xB7, 0xCA])
    | _block("GEMS_PETD_01", 0x0009, [0x3A, 0x8F])
)

PHILIPS = (
    _block("Philips Imaging DD 001", 0x2001, [0x03, 0x08, 0x0A, 0x0B, 0x13, 0x18, 0x19, 0x1B, 0x1C,
                                              0x22, 0x5F, 0x81])
    | _block("Philips MR Imaging DD 001", 0x2005, [0x0E, 0x30, 0x63, 0x6F, 0x71, 0x72, 0x73, 0x78,
                                                   0x79, 0x7A, 0xA0, 0xB0, 0xB1, 0xB2])
    | _block("Philips MR Imaging DD 002", 0x2005, [0x10])
    | _block("Philips MR Imaging DD 005", 0x2005, [0x0F, 0x12, 0x13, 0x29, 0x3C])
    | _block("Philips MR Imaging DD 006", 0x2005, [0x96])
)

UNITED = _block("Image Private Header", 0x0065, [0x05, 0x09, 0x0D, 0x37, 0x50, 0x58])

SAFE_PRIVATE: dict[str, frozenset[tuple[str, int, int]]] = {
    "siemens": frozenset(SIEMENS),
    "ge": frozenset(GE),
    "philips": frozenset(PHILIPS),
    "united": frozenset(UNITED),
}
