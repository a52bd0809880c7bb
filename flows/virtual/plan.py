"""The virtual trial's plan: who is scanned where, when, on which scanner, and the planted truths.

Three sites, one per vendor (``data_contracts/examples/virtual_trial.yaml``), and as many more as
``--sites`` asks for (:func:`trial_sites`: no planted event, vendors in turn), each with its own
scanner effect on volumes: a gradient-calibration error (multiplicative: every volume times
``calibration ** -3``) and a contrast (``gamma``: tissue boundaries move, an additive-like shift).
Subjects enrol ten days apart; each is scanned at baseline and then at every later visit of the
trial on its planned day. Planted, and checked by :mod:`flows.virtual.truths` at the end:

- ``site-b``'s scanner software is upgraded half-way through enrolment (its later baselines and
  every follow-up are on the new version, whose effect differs): a new scanner epoch and batch;
- ``site-c``'s technologist cuts the slab short at the top on every follow-up (coverage below
  the protocol's 160 mm: a major deviation, and a QC FAIL with a site query);
- ``site-a``'s first subject's second visit is acquired with flip angle 15 instead of 9: a
  protocol deviation;
- ``site-a``'s last subject never comes back for the last visit: a missing visit, whose query
  becomes overdue;
- every subject's head (and brain) volume scales with age by ``AGE_VOLUME_SLOPE`` a year.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from flows.virtual.scanner import SAGITTAL, TEMPLATE_ORIENTATION, Grid, Person, Scanner

TRIAL_FILE = "virtual_trial.yaml"
START = date(2025, 3, 3)
ENROL_EVERY_DAYS = 10
VISIT_DAYS = {"baseline": 0, "month06": 182, "month12": 365}
AGES = (25.0, 80.0)
CUT_SLICES = 70                 # 140 mm of a 176 mm slab: below the protocol's 160 mm
DEVIATION_HEADER = {"FlipAngle": "15"}
GE_SOFTWARE = "27\\LX\\MR Software release:DV26.0_R01_1725.a"

SCANNERS = {
    "site-a": Scanner("philips", "5.7.1\\5.7.1.1", "45053", calibration=1.04, gamma=1.0),
    "site-b": Scanner("siemens", "syngo MR E11", "66001", calibration=0.96, gamma=1.1,
                      grid=Grid(SAGITTAL), model="Prisma_fit"),
    "site-c": Scanner("ge", GE_SOFTWARE, "000301496MR3T6MR", calibration=1.0, gamma=0.92,
                      grid=Grid(TEMPLATE_ORIENTATION["ge"])),
}
EXTRA_EFFECTS = ((0.02, 0.97, 1.05), (-0.03, 1.03, 0.95), (0.015, 0.98, 1.06))  # serial step, calibration, gamma
UPGRADE_SITE, UPGRADED = "site-b", {"software_versions": "syngo MR E11E", "calibration": 1.01, "gamma": 0.95}
CUT_SITE = "site-c"
DEVIATION_SITE = MISSING_SITE = "site-a"
NAMES = ("Moreau^Claire", "Okafor^Daniel", "Lindqvist^Ingrid", "Haddad^Samir", "Novak^Petra",
         "Tanaka^Hiro", "Silva^Marta", "Brennan^Liam", "Kowalski^Anna", "Mensah^Kofi")


@dataclass(frozen=True)
class Scan:
    """One T1 acquisition of the plan."""

    site: str
    index: int                   # subject number within the site
    visit: str
    person: Person
    age: float                   # at this scan
    day: date
    scanner: Scanner
    anatomy_seed: int            # the subject's own warp: the same at every visit
    header: dict[str, object] = field(default_factory=dict)

    @property
    def visit_index(self) -> int:
        return list(VISIT_DAYS).index(self.visit)

    @property
    def key(self) -> str:
        return f"{self.site}/{self.person.patient_id}/{self.visit}"

    def folder(self, root: Path) -> Path:
        """Where its series is written: one upload folder per visit and site."""
        return root / self.visit / self.site / self.person.patient_id


def trial_sites(n: int = 3) -> dict[str, Scanner]:
    """The trial's sites: the three planted ones, then ``site-d``, ``site-e``... with no planted
    event, their vendors in turn (Philips, Siemens, GE), each with a scanner effect of its own."""
    if n < len(SCANNERS) or n > len(SCANNERS) + 23:
        raise ValueError(f"--sites {n}: from {len(SCANNERS)} (the sites with planted truths) to 26")
    sites = dict(SCANNERS)
    for k in range(n - len(SCANNERS)):
        base = list(SCANNERS.values())[k % len(SCANNERS)]
        step, calibration, gamma = EXTRA_EFFECTS[k % len(EXTRA_EFFECTS)]
        sites[f"site-{chr(ord('d') + k)}"] = replace(
            base, serial=f"{base.serial}{k + 1:02d}", calibration=round(calibration + step * (k // 3), 3),
            gamma=gamma)
    return sites


def write_trial_file(sites: dict[str, Scanner], folder: Path) -> Path:
    """The trial file of a plan: the example's when its three sites are all, else the example with
    each further site added (its vendor's entry with the site's own scanner serial), in ``folder``."""
    import yaml

    from data_contracts import example_path

    if list(sites) == list(SCANNERS):
        return example_path(TRIAL_FILE)
    config = yaml.safe_load(example_path(TRIAL_FILE).read_text())
    entries = {e["id"]: e for e in config["sites"]}
    for k, (site, scanner) in enumerate(list(sites.items())[len(SCANNERS):]):
        base = entries[list(SCANNERS)[k % len(SCANNERS)]]
        device = dict(base["scanners"][0], serial=scanner.serial, software_versions=[scanner.software_versions])
        vendor = {"philips": "Philips", "siemens": "Siemens", "ge": "GE"}[scanner.vendor]
        config["sites"].append({"id": site, "name": f"Site {site[-1].upper()} ({vendor})",
                                "ae_titles": [f"SITE{site[-1].upper()}"], "scanners": [device]})
    config["name"] += f", {len(sites)} sites"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / TRIAL_FILE
    out.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return out


@dataclass(frozen=True)
class Plan:
    scans: list[Scan]
    visits: list[str]
    subjects: int
    upgrade_day: date
    deviation: str               # key of the scan with the wrong flip angle
    missing: str                 # key of the visit never acquired
    sites: dict[str, Scanner] = field(default_factory=lambda: dict(SCANNERS))

    def uploads(self, root: Path) -> list[tuple[str, str, Path]]:
        """(visit, site, folder) in the order the uploads arrive: visit by visit, site by site."""
        return [(v, s, root / v / s) for v in self.visits for s in self.sites
                if any(x.visit == v and x.site == s for x in self.scans)]


def make_plan(subjects: int = 4, visits: int = 2, seed: int = 2026, sites: int = 3) -> Plan:
    """The virtual trial's scans: ``subjects`` per site at ``sites`` sites, each at the first
    ``visits`` visits."""
    if subjects < 4:
        raise ValueError(f"--subjects {subjects}: at least 4 per site (site-b's upgrade splits its "
                         "baselines into two batches of at least 2)")
    if not 2 <= visits <= len(VISIT_DAYS):
        raise ValueError(f"--visits {visits}: choose 2 or 3")
    names = list(VISIT_DAYS)[:visits]
    scanners = trial_sites(sites)
    rng = np.random.default_rng(seed)
    upgrade_day = START + timedelta(days=ENROL_EVERY_DAYS * (subjects // 2) - 2)
    deviation = missing = ""
    scans = []
    for s, (site, scanner) in enumerate(scanners.items()):
        for i in range(subjects):
            age0 = float(rng.uniform(*AGES))
            enrol = START + timedelta(days=ENROL_EVERY_DAYS * i + s)
            birth = enrol - timedelta(days=int(age0 * 365.25))
            person = Person(f"{site[-1].upper()}{i + 1:03d}", NAMES[(3 * s + i) % len(NAMES)],
                            "F" if (i + s) % 2 else "M", birth, round(float(rng.uniform(55, 95)), 1))
            anatomy = int(rng.integers(1, 2**31))
            for visit in names:
                day = enrol + timedelta(days=VISIT_DAYS[visit])
                scan = Scan(site, i, visit, person, age0 + VISIT_DAYS[visit] / 365.25, day,
                            _scanner_on(site, scanner, day, upgrade_day), anatomy)
                if site == CUT_SITE and visit != names[0]:
                    scan = replace(scan, scanner=replace(scan.scanner, slices_kept=CUT_SLICES))
                if site == DEVIATION_SITE and i == 0 and visit == names[1]:
                    scan, deviation = replace(scan, header=DEVIATION_HEADER), scan.key
                if site == MISSING_SITE and i == subjects - 1 and visit == names[-1]:
                    missing = scan.key
                    continue
                scans.append(scan)
    return Plan(scans, names, subjects, upgrade_day, deviation, missing, scanners)


def _scanner_on(site: str, scanner: Scanner, day: date, upgrade_day: date) -> Scanner:
    return replace(scanner, **UPGRADED) if site == UPGRADE_SITE and day >= upgrade_day else scanner
