"""Values that stand where an identifier was left out, and identify no one.

Scanners and upstream tools write ``***``, ``ANONYMOUS``, ``UNKNOWN``, an empty value, or one
character repeated where a name, an ID or a date was suppressed. Such a value attributes a
study to no one (:func:`tasks.intake.identify.subject_label`), and it is not collected as an
identifying value, by the de-identification profile (nothing to cut out of descriptors) nor by
the verification (searching for ``***`` would "find" the ``***`` of another element, PatientAge
say, and refuse a clean series).
"""

from __future__ import annotations

WORDS = frozenset({
    "anonymous", "anonymized", "anonymised", "anon", "unknown", "removed", "deleted", "none", "null",
    "n/a", "na", "redacted", "deidentified", "de-identified", "not available", "no name", "noname",
})
_FILLERS = frozenset(" ^=,.-_")   # separators of names and addresses, and padding


def is_placeholder(value: object) -> bool:
    """True for an empty value, a placeholder word, or one character repeated (``***``, ``0000``)."""
    text = str(value).strip().lower()
    core = set(text) - _FILLERS
    return not core or text in WORDS or len(core) == 1
