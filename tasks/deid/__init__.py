"""Stage 2, de-identification: DICOM PS3.15 Annex E, and proof that nothing identifying is left.

profile      the Basic Profile and its options on one data set (actions from _annex_e)
series       one series de-identified in worker processes, verified, then written to deid/
verify       independent PHI verification (shares no code with profile), PHILeakError
fingerprint  a study's identifying values as keyed hashes, to verify later stages' outputs
walk         a cheap walk over a data set that converts only the elements asked for
_annex_e     GENERATED from PS3.15 Table E.1-1 by _gen_annex_e (never edited by hand)
_safe_private  the vendor private elements kept under the Retain Safe Private option
"""
