"""A study's identifying values as keyed hashes: PHI verification after the originals are gone.

Intake releases the raw upload once its de-identified copy is verified, but later stages
(BIDS sidecars, derivatives, tables) must be checked too. Each received study leaves a
fingerprint beside its de-identified files in ``deid/<site>/<subject>/<session>/``; it holds
no PHI (only keyed hashes); ``tasks.deid.verify.check_no_phi`` refuses to write what matches it.
"""

from __future__ import annotations

import hashlib
import json

from data_contracts.trial import TrialConfig
from tasks.deid.verify import DIGIT_RUN, LONG, UID_TOKEN, Leak, Matcher, decoded, excused, masked_spans
from tasks.lake.storage import Lake


class Fingerprint:
    """A study's identifying values as keyed hashes: verification after the originals are gone.

    Intake releases the raw upload once its de-identified copy is verified, but
    later stages (BIDS sidecars, derivatives, tables) must be checked too. The
    fingerprint keeps, for each identifying value, only a keyed BLAKE2b hash
    (the trial's de-identification key), so it holds no PHI and can live in
    ``deid/``. Searching hashes every candidate of the right shape and length:
    dotted-number tokens, digit runs and their windows, and text windows of
    each identifier's length, with the same word and number boundaries as
    :class:`Matcher`, and the same spans excused (our own words, kept values). That is
    slow for megabytes, fine for sidecars and tables.

    The values the trial retains (the device identity and class) are kept as keyed hashes
    too: an identifier that is not the patient's found inside one of them is that value, not
    a leak (as in :class:`Matcher`). Version 1 fingerprints (without them) still read.
    """

    VERSION = 2

    def __init__(self, key: bytes, hashes: dict[str, str], text_lengths: list[int],
                 number_windows: list[int], not_verifiable: list[str],
                 retained: list[str] | None = None, retained_lengths: list[int] | None = None):
        self.key, self.hashes = key, hashes
        self.text_lengths, self.number_windows = sorted(set(text_lengths)), sorted(set(number_windows))
        self.not_verifiable = not_verifiable
        self.retained = set(retained or ())
        self.retained_lengths = sorted(set(retained_lengths or ()))

    def _h(self, value: bytes) -> str:
        return hashlib.blake2b(value, key=self.key[:64], digest_size=16).hexdigest()

    @classmethod
    def from_matcher(cls, matcher: "Matcher", key: bytes) -> "Fingerprint":
        fp = cls(key, {}, [], [], matcher.not_verifiable)
        for value, source in matcher.source.items():
            fp.hashes[fp._h(value)] = source
            if value in matcher.numbers:
                if len(value) >= 8:
                    fp.number_windows.append(len(value))
            elif value not in matcher.uids:
                fp.text_lengths.append(len(value))
        fp.text_lengths, fp.number_windows = sorted(set(fp.text_lengths)), sorted(set(fp.number_windows))
        fp.retained = {fp._h(v) for v in matcher.retained}
        fp.retained_lengths = sorted({len(v) for v in matcher.retained})
        return fp

    def to_json(self) -> str:
        return json.dumps({"version": self.VERSION, "hashes": self.hashes, "text_lengths": self.text_lengths,
                           "number_windows": self.number_windows, "not_verifiable": self.not_verifiable,
                           "retained": sorted(self.retained), "retained_lengths": self.retained_lengths},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str, key: bytes) -> "Fingerprint":
        d = json.loads(text)
        return cls(key, d["hashes"], d["text_lengths"], d["number_windows"], d["not_verifiable"],
                   d.get("retained"), d.get("retained_lengths"))

    def _hit(self, value: bytes) -> str | None:
        return self.hashes.get(self._h(value))

    def in_content(self, data: bytes, keep_retained: bool = True) -> list[tuple[str, int]]:
        low = data.lower()
        hits: list[tuple[str, int, int]] = []      # source, start, length
        for m in UID_TOKEN.finditer(low):
            parts = m.group(0).split(b".")
            for a in range(len(parts)):
                for b in range(a + 2, len(parts) + 1):
                    src = self._hit(b".".join(parts[a:b]))
                    if src:
                        hits.append((src, m.start(), len(m.group(0))))
        for m in DIGIT_RUN.finditer(low):
            run = m.group(0)
            src = self._hit(run)
            if src:
                hits.append((src, m.start(), len(run)))
            for w in self.number_windows:
                for k in range(len(run) - w + 1):
                    src = self._hit(run[k:k + w]) if w != len(run) else None
                    if src:
                        hits.append((src, m.start() + k, w))
        for w in self.text_lengths:
            for k in range(len(low) - w + 1):
                src = self._hit(low[k:k + w])
                if src and (w >= LONG or _word_bounded(low, k, w)):
                    hits.append((src, k, w))
        if not hits:
            return []
        own, kept = masked_spans(low), (self._retained_spans(low) if keep_retained else [])
        return [(src, pos) for src, pos, n in hits if not excused(src, pos, n, own, kept)]

    def _retained_spans(self, low: bytes) -> list[tuple[int, int]]:
        """Where a value the trial retains stands in ``low``."""
        return [(k, k + w) for w in self.retained_lengths for k in range(len(low) - w + 1)
                if self._h(low[k:k + w]) in self.retained]

    def find_leaks(self, name: str, data: bytes) -> list[Leak]:
        content, _ = decoded(name, data)
        leaks = [Leak(name, src, "file name") for src, _ in self.in_content(name.encode(), keep_retained=False)]
        return leaks + [Leak(name, src, f"content at byte {pos}") for src, pos in self.in_content(content)]


def _word_bounded(low: bytes, k: int, w: int) -> bool:
    before = low[k - 1:k] if k else b""
    after = low[k + w:k + w + 1]
    return not (before.isalnum() or after.isalnum())


def fingerprint_path(site: str, subject: str, session: str, study_key: str) -> str:
    return f"deid/{site}/{subject}/{session}/phi-fingerprint-{study_key[:16]}.json"


def load_fingerprints(lake: Lake, trial: TrialConfig, site: str, subject: str, session: str) -> list[Fingerprint]:
    """Every fingerprint of a subject's session (one per study received for it)."""
    key = trial.secret(trial.deidentification.secret_env)
    folder = f"deid/{site}/{subject}/{session}"
    return [Fingerprint.from_json(lake.read_text(p), key) for p in lake.find(folder)
            if p.rsplit("/", 1)[-1].startswith("phi-fingerprint-")]
