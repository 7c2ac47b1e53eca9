"""Headless chromium for the report: the PDF export, screenshots and the browser test's DOM."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from memaudit.common import UserError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """Path of a chromium/chrome binary, or None (MEMAUDIT_CHROMIUM overrides)."""
    env = os.environ.get("MEMAUDIT_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in CHROMIUM_NAMES:
        p = shutil.which(name)
        if p:
            return p
    return None


def _chromium(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise UserError("chromium not found: install Debian's chromium (apt-get install "
                        "chromium) or set MEMAUDIT_CHROMIUM to a chrome binary")
    with tempfile.TemporaryDirectory(prefix="memaudit-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--hide-scrollbars",
               f"--user-data-dir={profile}", *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired as e:
            raise UserError(f"chromium timed out after {timeout:.0f} s") from e


def render_pdf(html: str | Path, pdf: str | Path) -> Path:
    """Print the report to PDF with headless chromium (`--print-to-pdf`), in the page's order,
    its folded sections (`<details>`) unfolded: a printed page cannot be clicked. The page
    is self-contained, so a copy with `open` added is what chromium prints. The PDF's
    bookmarks are the page's headings, in the page's order (chromium ignores the flag where
    it does not know it)."""
    pdf = Path(pdf).resolve()
    with tempfile.TemporaryDirectory(prefix="memaudit-pdf-") as tmp:
        page = Path(tmp) / "report.html"
        page.write_bytes(unfold(Path(html).read_bytes()))
        p = _chromium([f"--print-to-pdf={pdf}", "--no-pdf-header-footer",
                       "--generate-pdf-document-outline", page.as_uri()])
    if not pdf.exists() or pdf.stat().st_size == 0:
        raise UserError(f"chromium did not write {pdf}: {p.stderr.strip()[-300:]}")
    return pdf


def unfold(html: bytes) -> bytes:
    """Every `<details>` element of the page open (prompts and captions are escaped, so
    `<details` in the page is the template's own markup)."""
    return re.sub(rb"<details(?![^>]*\bopen\b)", b"<details open", html)


def screenshot(html: str | Path, png: str | Path, width: int = 1280,
               height: int = 2000) -> Path:
    """A PNG screenshot of the rendered page (headless chromium `--screenshot`)."""
    png = Path(png).resolve()
    p = _chromium([f"--screenshot={png}", f"--window-size={width},{height}",
                   Path(html).resolve().as_uri()])
    if not png.exists() or png.stat().st_size == 0:
        raise UserError(f"chromium did not write {png}: {p.stderr.strip()[-300:]}")
    return png


def dump_dom(html: str | Path) -> str:
    """The DOM after chromium loaded the page and ran whatever it would run."""
    return _chromium(["--dump-dom", Path(html).resolve().as_uri()]).stdout
