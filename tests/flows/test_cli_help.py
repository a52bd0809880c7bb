"""`corelab --help` answers at once: it loads none of the heavy libraries a command needs.

Issue 12 asks for help in under a second; timings are measured in bench/, so the test checks
the cause instead: in a fresh interpreter, printing the help of the command and of each command
group imports no Prefect, statsmodels, matplotlib, pandas, numpy or imaging library (these took
3.3 s together when the CLI imported them at the top), and each help names its commands.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.data import REPO

HEAVY = ("prefect", "statsmodels", "matplotlib", "pandas", "numpy", "SimpleITK", "nibabel", "pydicom",
         "pyarrow", "neuroHarmonize")
PROBE = """
import json, sys
args, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["corelab", *args]
from flows.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in heavy if m in sys.modules]}))
"""


@pytest.mark.parametrize("args", [["--help"], ["harmonize", "--help"], ["containers", "--help"],
                                  ["qc", "--help"], ["ingest", "--help"], ["serve", "--help"],
                                  ["report", "--help"], ["queries", "--help"], ["status", "--help"]])
def test_help_loads_no_heavy_library(args):
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args), json.dumps(HEAVY)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    *help_lines, last = done.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["code"] == 0
    assert result["heavy"] == [], f"corelab {' '.join(args)} imported {result['heavy']}"
    assert "Usage: corelab" in "\n".join(help_lines)


def test_a_command_still_finds_its_libraries(tmp_path):
    """The deferred imports are real: `harmonize models` on an empty lake runs (and so imports them)."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", "harmonize", "models", "--lake", str(tmp_path / "lake")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stderr[-2000:]
    assert "ModuleNotFoundError" not in done.stdout + done.stderr and "NameError" not in done.stderr
