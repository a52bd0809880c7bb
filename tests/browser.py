"""What a person sees: pages rendered by headless Chromium (Debian package chromium), read back.

Shared by the tests of the site dashboard, the QC review pages and the harmonization report.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image


class Rows(HTMLParser):
    """The text of each row of the table with id ``table_id``."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.inside, self.rows, self.cell = table_id, False, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id") == self.table_id:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def table(html: str, table_id: str) -> list[list[str]]:
    p = Rows(table_id)
    p.feed(html)
    return p.rows


def chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: make services installs it (Debian package chromium)")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


def images(dom: str) -> list[np.ndarray]:
    """The PNG data-URI images of a page, decoded."""
    uris = re.findall(r'<img[^>]*? src="data:image/png;base64,([^"]+)"', dom)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(u))).convert("RGB")) for u in uris]




def ink_rows(png) -> float:
    """The share of a screenshot's pixel rows holding anything dark (a blank page has none)."""
    return float((np.asarray(Image.open(png).convert("L")) < 128).any(axis=1).mean())
