"""The HTML report: content from a real audit DB, escaping of untrusted text, the SVG plots,
training images re-read from Parquet, and a real headless-chromium render."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from audit_fixtures import PLANTED_CAPTION, copying_audit, planted_image
from PIL import Image

from memaudit.report import dump_dom, find_chromium, render_pdf, screenshot, write_report
from memaudit.report.plots import distribution_svg, histogram_counts
from memaudit.store import SCHEMA_VERSION


@pytest.fixture(scope="module")
def audit_db(tmp_path_factory):
    return copying_audit(tmp_path_factory.mktemp("audit"))


@pytest.fixture(scope="module")
def report(audit_db):
    return write_report(audit_db, audit_db.parent / "report.html")


def _data_uris(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"',
                                                    html)]


def test_report_content(report):
    html = report.read_text()
    # summary: both methods; cfg copies every planted generation (2 prompts
    # x 2 seeds of 8) -> 50.0% under nl2; static copies nothing
    assert "<td>cfg</td><td>nl2</td>" in html and "<td>static</td><td>nl2</td>" in html
    assert re.search(r"<td>cfg</td><td>nl2</td><td class=\"num\">8</td>\s*"
                     r"<td class=\"num copy\">50.0%", html)
    assert re.search(r"<td>static</td><td>nl2</td><td class=\"num\">8</td>\s*"
                     r"<td class=\"num \">0.0%", html)
    # copy rate by prompt label: cfg copies every trigger generation (4 of 4)
    assert "Copy rate by prompt label: nl2, calibrated (fixed)" in html
    assert re.search(r"<tr><td>cfg</td>\s*<td class=\"num copy\">100.0% \(100.0%\) "
                     r"<span class=\"note\">n=4</span></td><td class=\"num \">0.0% \(0.0%\)",
                     html)
    # flagged cards: the generated image and the training image re-read from the Parquet
    assert "4 generation(s) flagged" in html and "Showing 4 of 4 generation(s)" in html
    assert html.count('alt="generated image"') == 4
    imgs = [np.asarray(Image.open(io.BytesIO(b)).convert("L")) for b in _data_uris(html)]
    planted = planted_image()
    assert sum(np.array_equal(a, planted) for a in imgs) >= 8  # generated + training, x4
    assert "<code>item0-0</code>" in html  # neighbour key, duplicate count 4
    assert "<tr><th>duplicates</th><td>4</td></tr>" in html
    # plots, screening, provenance
    assert html.count("<svg") == 1 and "nl2 score per method (lower = more similar)" in html
    assert "Pre-generation screening" in html
    assert "content hash" in html and f"schema version {SCHEMA_VERSION}" in html


def test_report_quality_table(audit_db, report):
    """Quality beside the copy rate: the run's KID / FD per method with feature space and n,
    FD and copy rate as ratios to cfg (cfg copies 50%, static none)."""
    from memaudit.report import _num
    from memaudit.store import AuditStore

    html = report.read_text()
    assert "Quality and alignment beside the copy rate" in html
    with AuditStore(audit_db, read_only=True) as s:
        q = {r["method"]: r for r in s.query("SELECT * FROM method_quality")}
    assert set(q) == {"cfg", "static"}
    for m, copy in (("cfg", "50.0% (1.00×)"), ("static", "0.0% (0.00×)")):
        r = q[m]
        assert r["features"] == "digits-logits-16px" and r["n"] == 8
        row = re.search(rf'<td rowspan="1">{m}</td>(.*?)</tr>', html, re.S).group(1)
        assert copy in row and "<code>digits-logits-16px</code>" in row
        assert f"8 / {r['n_reference']}" in row
        assert f"{_num(r['kid'])} ± {_num(r['kid_std'])} ({r['kid_subset_size']})" in row
        assert f"{_num(r['fd'])} ({r['fd_ratio_to_cfg']:.2f}×)" in row


def test_untrusted_text_is_escaped(report):
    html = report.read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; planted" in html
    assert html.count("&lt;script&gt;") >= 3  # prompt tables, cards, caption, plan JSON
    assert "script-src" not in html and "default-src 'none'" in html  # CSP: no scripts


def test_svg_histogram_hand_counts():
    assert histogram_counts(np.array([0.0, 0.1, 0.5, 0.99, 2.0]), 0.0, 1.0, 2).tolist() == [2, 3]
    svg = distribution_svg({"a<b": np.array([0.0, 1.0]), "c": np.array([0.5])}, "x&y",
                           threshold=0.25, calibrated=0.75, bins=2)
    assert "a&lt;b (n=2)" in svg and "x&amp;y score" in svg and "a<b" not in svg
    assert svg.count("<rect") == 3  # bins with counts: a: [0, 1] both, c: one
    assert "fixed threshold 0.25" in svg and "calibrated threshold 0.75" in svg


chromium = pytest.mark.skipif(find_chromium() is None,
                              reason="chromium not installed (CI installs Debian's chromium)")


@chromium
def test_browser_render(report, tmp_path):
    dom = dump_dom(report)
    assert "Memorization audit" in dom
    assert "<script" not in dom.lower()  # the prompt stayed text, nothing became a script
    assert "&lt;script&gt;alert(1)&lt;/script&gt; planted" in dom
    png = screenshot(report, tmp_path / "page.png", width=1000, height=800)
    im = Image.open(png)
    assert im.size == (1000, 800)
    assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something was drawn
    pdf = render_pdf(report, tmp_path / "report.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_report_cli(audit_db, tmp_path):
    from memaudit.cli import main

    out = tmp_path / "r.html"
    with pytest.raises(SystemExit) as e:
        main(["report", str(audit_db), "--out", str(out), "--run", "7"])
    assert e.value.code == 2
    try:  # success returns normally (or exits 0, depending on the CLI shell)
        main(["report", str(audit_db), "--out", str(out)])
    except SystemExit as ok:
        assert ok.code in (0, None)
    assert PLANTED_CAPTION not in out.read_text() and out.stat().st_size > 1000


def _secret_png(path):
    a = np.zeros((16, 16), np.uint8)
    a[::2, ::2] = 255  # a checkerboard no audit image looks like
    Image.fromarray(a).save(path)
    return a


def test_foreign_database_and_index_cannot_pull_local_files_in(audit_db, tmp_path):
    """issue 11: the report inlined any image path stored in the database and any Parquet
    an index named; now only files under the database's folder and the index's recorded
    sources, and it says what it left out."""
    import shutil

    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    secret = _secret_png(tmp_path / "secret.png")
    buf = io.BytesIO()
    Image.fromarray(secret).save(buf, format="PNG")
    pq.write_table(pa.table({"png": [buf.getvalue()] * 4}), tmp_path / "private.parquet")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(audit_db, foreign / "audit.duckdb")
    shutil.copytree(audit_db.parent / "images", foreign / "images")
    index = shutil.copytree(audit_db.parent / "index", foreign / "index")
    items = pq.read_table(index / "items.parquet")
    i = items.column_names.index("source_file")
    items = items.set_column(i, "source_file", pa.array(
        [str(tmp_path / "private.parquet")] * items.num_rows, pa.string()))
    pq.write_table(items, index / "items.parquet")
    con = duckdb.connect(str(foreign / "audit.duckdb"))
    gids = [r[0] for r in con.execute("SELECT DISTINCT generation_id FROM matches "
                                      "WHERE is_copy ORDER BY 1").fetchall()]
    con.execute("UPDATE generations SET image_path = ? WHERE id = ?",
                ["../secret.png", gids[0]])
    con.execute("UPDATE generations SET image_path = ? WHERE id = ?",
                [str(tmp_path / "secret.png"), gids[1]])
    con.execute("UPDATE runs SET index_path = ?", [str(index)])
    con.close()
    html = write_report(foreign / "audit.duckdb", foreign / "report.html").read_text()
    shown = [np.asarray(Image.open(io.BytesIO(b)).convert("L")) for b in _data_uris(html)]
    assert not any(np.array_equal(a, secret) for a in shown)
    assert sum(np.array_equal(a, planted_image()) for a in shown) == 2  # the untouched two
    assert "Files not shown" in html
    assert "2 generated image path(s) outside" in html
    assert "training images from 1 file(s) the index does not record as its sources" in html


def test_report_never_overwrites_its_input_and_names_the_real_problem(audit_db, tmp_path,
                                                                       capsys):
    """issue 11: `report DB --out DB` overwrote the database with HTML; `--out
    /proc/x.html` said "file not found: ...tmp"."""
    from memaudit.cli import main

    before = audit_db.read_bytes()
    for out, message in ((audit_db, "is one of this command's inputs"),
                         (tmp_path, "is a folder; give a file name"),
                         (Path("/proc/x.html"), "the folder /proc does not accept new files")):
        with pytest.raises(SystemExit) as e:
            main(["report", str(audit_db), "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert ".tmp" not in err
    assert audit_db.read_bytes() == before
    mine = tmp_path / "notes.html"
    mine.write_text("<p>my notes</p>")
    with pytest.raises(SystemExit):
        main(["report", str(audit_db), "--out", str(mine)])
    assert "not a memaudit report; use --overwrite" in capsys.readouterr().err
    assert mine.read_text() == "<p>my notes</p>"
    main(["report", str(audit_db), "--out", str(mine), "--overwrite"])
    main(["report", str(audit_db), "--out", str(mine)])  # its own report: replaced
    assert "Memorization audit" in mine.read_text()
    assert not list(tmp_path.glob(".*tmp*"))
