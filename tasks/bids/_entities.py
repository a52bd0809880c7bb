"""BIDS entity order, from the BIDS Specification 1.10.0, Appendix "Entity table".

Written by hand (a list of 31 keys); update with the spec version below.
"""

BIDS_VERSION = "1.10.0"

ENTITY_ORDER = (
    "sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec",
    "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split",
    "recording", "chunk", "seg", "res", "den", "label", "desc",
)
