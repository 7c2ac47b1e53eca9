"""The HTML report: content from a real audit DB, escaping of untrusted text, the SVG plots,
training images re-read from Parquet, and a real headless-chromium render."""

from __future__ import annotations

import base64
import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from audit_fixtures import PLANTED_CAPTION, copying_audit, planted_image
from PIL import Image
from report_outline import SECTIONS, Outline

from memaudit.report import dump_dom, find_chromium, render_pdf, screenshot, unfold, write_report
from memaudit.report.plots import distribution_svg, histogram_counts
from memaudit.store import SCHEMA_VERSION


@pytest.fixture(scope="module")
def audit_db(tmp_path_factory):
    return copying_audit(tmp_path_factory.mktemp("audit"))


@pytest.fixture(scope="module")
def report(audit_db):
    return write_report(audit_db, audit_db.parent / "report.html",
                        sources=[audit_db.parent.parent / "train.parquet"])


def _data_uris(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"',
                                                    html)]


def _pixels(png: bytes, res: int = 16) -> np.ndarray:
    """The `res` x `res` image a data URI shows: inlined images are enlarged by a whole
    factor with nearest-neighbour sampling (blocks of equal pixels), checked here."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    k = a.shape[0] // res
    assert a.shape == (res * k, res * k)
    small = a[::k, ::k]
    assert np.array_equal(a, np.kron(small, np.ones((k, k), np.uint8)))
    return small


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
    imgs = [_pixels(b) for b in _data_uris(html)]
    planted = planted_image()
    assert sum(np.array_equal(a, planted) for a in imgs) >= 8  # generated + training, x4
    assert "<code>item0-0</code>" in html  # neighbour key, duplicate count 4
    assert "<tr><th>duplicates</th><td>4</td></tr>" in html
    # plots, screening, provenance
    assert html.count("<svg") == 1 and "nl2 score per method (lower = more similar)" in html
    assert "Pre-generation screening" in html
    assert "content hash" in html and f"schema version {SCHEMA_VERSION}" in html


def test_report_reads_from_the_top(audit_db, report):
    """issue 22: verdict, flagged outputs, per-method and per-group tables, quality, per
    prompt, diagnostics (folded), provenance; the flagged section precedes every plot."""
    from memaudit.gate import gate_db

    html = report.read_text()
    page = Outline(html)
    assert page.sections == SECTIONS
    assert page.plots and all(i > page.at("flagged") for i, _ in page.plots)
    assert all(page.at("diagnostics") < i < page.at("provenance") and folded
               for i, folded in page.plots)
    assert len(page.ids) == len(set(page.ids))
    # the verdict is the default gate's, one sentence per check, with the database's figures
    gate = gate_db(audit_db, max_copy_rate=0.0)
    assert gate.verdict == "FAIL" and "<b>Gate: FAIL.</b>" in html
    verdict = html.split('<h2 id="verdict">')[1].split("<h2 ")[0]
    thr = next(c.facts["threshold"] for c in gate.checks)
    assert re.search(rf"FAIL</b>\s*<b>cfg</b>: 4 of its 8 generations \(50.0%\) copy a "
                     rf"training image \(by nl2 at the calibrated threshold {thr:.4g}\)", verdict)
    assert re.search(rf"pass</b>\s*<b>static</b>: none of its 8 generations copies a training "
                     rf"image \(by nl2 at the calibrated threshold {thr:.4g}\)", verdict)
    assert "1 of 2 method(s)\n produce copies of training images: cfg." in verdict
    # the screening sentence names the score the database records (the default, anisotropy)
    assert "Screening before generation (anisotropy score, Asthana &amp; Belagiannis, ICLR " \
        "2026):" in verdict and "Wen et al." not in verdict


def test_screening_words_name_the_recorded_score():
    from memaudit.report.verdict import screening_words

    row = {"flagged": True, "threshold": 0.5, "score_name": "update-norm",
           "score_paper": "after Huang et al., KDD 2026"}
    assert screening_words([row, {**row, "flagged": False}]) == (
        "Screening before generation (update-norm score, after Huang et al., KDD 2026): 1 of 2 "
        "prompts score above the threshold 0.5 and are predicted to be memorized.")
    old = {"flagged": False, "threshold": None, "score_name": None, "score_paper": ""}
    assert screening_words([old]).startswith(  # before scores had names: Wen's was the only one
        "Screening before generation (wen score, Wen et al., ICLR 2024): 0 of 1 prompts score "
        "and")
    assert screening_words([]) is None


def _prompt_row(html: str, text: str) -> str:
    anchor = "prompt-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return html.split(f'<div class="prow" id="{anchor}">')[1].split('class="prow"')[0]


def test_per_prompt_rows_have_stable_anchors(report):
    """One row per prompt with a flagged output: each method's generations (every seed) and
    the training image, under #prompt-<sha256 of the text>; every prompt is addressable."""
    html = report.read_text()
    planted = planted_image()
    for text in (PLANTED_CAPTION, "another planted one"):
        row = _prompt_row(html, text)
        train = re.search(r'<img src="data:image/png;base64,([^"]+)" width="64" height="64"\s+'
                          r'alt="training image item0-0"', row).group(1)
        assert np.array_equal(_pixels(base64.b64decode(train)), planted)
        for method, copies in (("cfg", True), ("static", False)):
            thumbs = re.findall(rf'src="data:image/png;base64,([^"]+)" width="48" height="48" '
                                rf'class="([a-z]*)" alt="{method} seed (\d)"', row)
            assert [s for _, _, s in thumbs] == ["0", "1"]
            assert all((c == "copy") == copies for _, c, _ in thumbs)
            assert all(np.array_equal(_pixels(base64.b64decode(u)), planted) == copies
                       for u, _, _ in thumbs)
        assert "2\n  of 4 generation(s) copy (calibrated)" in row
    # the prompt table links to the rows; prompts without a row carry the anchor themselves
    for text in (PLANTED_CAPTION, "another planted one", "a generic item", "something else"):
        anchor = "prompt-" + hashlib.sha256(text.encode()).hexdigest()[:12]
        assert html.count(f'id="{anchor}"') == 1
        if "planted" in text:
            assert f'<a href="#{anchor}">' in html
    assert html.count('all outputs of this prompt</a>') == 4  # from each flagged card


def test_fixed_threshold_only_matches_are_folded_after_the_copies(audit_db, tmp_path):
    """Calibrated copies first; generations only the fixed threshold flags are counted and
    folded away (a real database whose fixed verdicts were made looser)."""
    import shutil

    import duckdb

    db = tmp_path / "audit.duckdb"
    shutil.copy(audit_db, db)
    shutil.copytree(audit_db.parent / "images", tmp_path / "images")
    con = duckdb.connect(str(db))
    con.execute("UPDATE matches SET is_copy = true WHERE generation_id IN (SELECT g.id FROM "
                "generations g JOIN prompts p ON p.id = g.prompt_id WHERE g.method = 'static' "
                "AND p.text = 'something else')")
    con.close()
    html = write_report(db, tmp_path / "report.html").read_text()
    assert "4 generation(s) flagged" in html  # the verdict in use is the calibrated one
    flagged = html.split('<h2 id="flagged">')[1].split("<h2 ")[0]
    shown, folded = flagged.split('<details class="fold" id="fixed-only">')
    assert "Showing 4 of 4 generation(s)" in shown and shown.count('class="card"') == 4
    assert "Folded away: 2\ngeneration(s) that only the fixed (published) threshold" in folded
    assert folded.count('class="card"') == 2 and "something else" in folded
    assert "something else" not in shown
    row = _prompt_row(html, "something else")
    assert re.findall(r'class="([a-z]*)" alt="static seed', row) == ["fixed", "fixed"]


def test_flagged_outputs_worst_first(audit_db, tmp_path):
    """The flagged cards run from the match furthest past its threshold to the nearest one
    (nl2: lower = more similar), whatever order the generations were made in."""
    import shutil

    import duckdb

    db = tmp_path / "audit.duckdb"
    shutil.copy(audit_db, db)
    shutil.copytree(audit_db.parent / "images", tmp_path / "images")
    con = duckdb.connect(str(db))
    gids = [r[0] for r in con.execute("SELECT DISTINCT generation_id FROM matches WHERE "
                                      "is_copy ORDER BY 1").fetchall()]
    scores = [0.04, 0.01, 0.03, 0.02]  # every one still a copy at either threshold
    for gid, score in zip(gids, scores, strict=True):
        con.execute("UPDATE matches SET score = ?, similarity = ? WHERE generation_id = ?",
                    [score, -score, gid])
    con.close()
    html = write_report(db, tmp_path / "report.html").read_text()
    flagged = html.split('<h2 id="flagged">')[1].split("<h2 ")[0]
    shown = [float(x) for x in re.findall(r"nl2: score ([\d.]+)", flagged)]
    assert shown == sorted(scores) and flagged.count('class="card"') == 4


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


def test_inlined_image_sizes():
    """Small images are enlarged by whole factors, nearest-neighbour (sharp in the PDF);
    thumbnails of large images are reduced (JPEG); an undecodable image is None."""
    from memaudit.report.images import _to_png_uri

    def decode(uri):
        mime, b64 = uri.split(";base64,")
        return mime, Image.open(io.BytesIO(base64.b64decode(b64)))

    small = (np.arange(16 * 12).reshape(12, 16) % 251).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, format="PNG")
    mime, im = decode(_to_png_uri(buf.getvalue(), px=96))
    assert mime == "data:image/png" and im.size == (96, 72)  # factor 96 // 16 = 6
    assert np.array_equal(np.asarray(im), np.kron(small, np.ones((6, 6), np.uint8)))
    big = io.BytesIO()
    Image.new("RGB", (300, 200), (200, 10, 10)).save(big, format="PNG")
    mime, im = decode(_to_png_uri(big.getvalue(), px=96, shrink=True))
    assert mime == "data:image/jpeg" and im.size == (96, 64)
    mime, im = decode(_to_png_uri(big.getvalue(), px=96))  # a card keeps the original
    assert mime == "data:image/png" and im.size == (300, 200)
    assert _to_png_uri(b"not an image") is None


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
    # sharp in the PDF: chromium embeds an image at the size it was given (CSS pixelated is
    # not carried over), so the 16x16 planted image is there as 256x256 blocks of its pixels
    sharp = np.kron(planted_image(), np.ones((16, 16), np.uint8))
    images = _pdf_images(pdf.read_bytes())
    assert images and any(a.shape[:2] == (256, 256) and np.array_equal(a[..., 0], sharp)
                          for a in images)
    # printed unfolded: every folded section of the page is open in the copy chromium prints
    html = report.read_bytes()
    assert unfold(html).count(b"<details open") == html.count(b"<details") >= 2
    # printed in the page's order: the PDF's bookmarks are the page's sections, in order
    h2 = re.findall(r'<h2 id="([a-z]+)">([^<]+)</h2>', html.decode())
    assert [i for i, _ in h2] == SECTIONS
    assert [t for depth, t in _pdf_outline(pdf.read_bytes()) if depth == 1] == [
        t for _, t in h2]


def _pdf_outline(pdf: bytes) -> list[tuple[int, str]]:
    """(depth, title) of a chromium PDF's bookmarks, walked in order (/First, /Next)."""
    objs = {int(m.group(1)): m.group(2) for m in
            re.finditer(rb"(\d+) 0 obj\s*<<(.*?)>>\s*endobj", pdf, re.S)}

    def ref(d: bytes, key: bytes) -> int | None:
        m = re.search(rb"/%s (\d+) 0 R" % key, d)
        return int(m.group(1)) if m else None

    def walk(i: int | None, depth: int) -> list[tuple[int, str]]:
        out = []
        while i is not None:
            title = re.search(rb"/Title \((.*?)(?<!\\)\)", objs[i], re.S).group(1)
            out.append((depth, re.sub(rb"\\(.)", rb"\1", title).decode("latin-1")))
            out += walk(ref(objs[i], b"First"), depth + 1)
            i = ref(objs[i], b"Next")
        return out

    root = next(d for d in objs.values() if b"/Type /Outlines" in d)
    return walk(ref(root, b"First"), 0)


def _pdf_images(pdf: bytes) -> list[np.ndarray]:
    """The raw RGB images of a chromium PDF (image XObjects, Flate, 8 bits, no predictor)."""
    import zlib

    out = []
    for m in re.finditer(rb"<<(/Type /XObject\n/Subtype /Image\n.*?)>>\s*stream\r?\n", pdf,
                         re.S):
        head = m.group(1)
        w, h, n = (int(re.search(rb"/%s (\d+)" % k, head).group(1))
                   for k in (b"Width", b"Height", b"Length"))
        raw = np.frombuffer(zlib.decompress(pdf[m.end():m.end() + n]), np.uint8)
        if raw.size == w * h * 3:
            out.append(raw.reshape(h, w, 3))
    return out


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
    shown = [_pixels(b) for b in _data_uris(html)]
    assert not any(np.array_equal(a, secret) for a in shown)
    # the untouched two, each in its card and in its prompt's row
    assert sum(np.array_equal(a, planted_image()) for a in shown) == 4
    assert "Files not shown" in html
    assert "2 generated image path(s) outside" in html
    assert ("training images from 1 file(s) neither inside the index folder nor named with "
            "--source") in html


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
