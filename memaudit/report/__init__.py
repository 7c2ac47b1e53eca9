"""`memaudit report DB`: one self-contained HTML page (and a PDF) from an audit database.

One module per concept: `context` (the data, read from the database), `images` (generated
and training images as data URIs, only from the files the report may open), `render` (the
Jinja2 page, written atomically), `chromium` (PDF export, screenshots); the template and the
SVG plots are in `template` and `plots`, the quality table's rows in `quality`.
Images are inlined as base64 data URIs; prompts and captions are escaped (Jinja2
autoescape) and the page carries a Content-Security-Policy that forbids scripts.
"""

from __future__ import annotations

from memaudit.report.chromium import (
    CHROMIUM_NAMES,
    dump_dom,
    find_chromium,
    render_pdf,
    screenshot,
    unfold,
)
from memaudit.report.context import build_context
from memaudit.report.images import image_file_uri, png_data_uri, training_image_bytes
from memaudit.report.render import _num, _pct, _ratio, _ts, render_html, write_report

__all__ = ["CHROMIUM_NAMES", "build_context", "dump_dom", "find_chromium", "image_file_uri",
           "png_data_uri", "render_html", "render_pdf", "screenshot", "training_image_bytes",
           "unfold", "write_report", "_num", "_pct", "_ratio", "_ts"]
