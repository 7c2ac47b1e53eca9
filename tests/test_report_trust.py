"""What the report opens, on whose word (issue 18, defects 6 and 7; docs/report.md "Trust
model"): the index is checked against the content hash the run recorded, and training images
are read only from files inside the index folder or sources the user names."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit_fixtures import copying_audit, make_training_parquet, planted_image
from PIL import Image

from memaudit.cli import main
from memaudit.common import UserError
from memaudit.report import build_context, write_report


@pytest.fixture(scope="module")
def audit(tmp_path_factory) -> Path:
    """tmp/train.parquet, tmp/out/audit.duckdb, tmp/out/index (built from the Parquet)."""
    tmp = tmp_path_factory.mktemp("trust")
    copying_audit(tmp)
    return tmp


@pytest.fixture(scope="module")
def counts(audit, tmp_path_factory) -> tuple[int, int]:
    """Planted images on the page: generated ones only (no training image readable), and
    with the training images (the source named)."""
    tmp = tmp_path_factory.mktemp("counts")
    db = audit / "out" / "audit.duckdb"
    bare = _n_planted(write_report(db, tmp / "a.html").read_text())
    full = _n_planted(write_report(db, tmp / "b.html", sources=[audit / "train.parquet"])
                      .read_text())
    assert full > bare > 0
    return bare, full


def _shown(html: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(m))).convert("L"))
            for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def _count(html: str, want: np.ndarray) -> int:
    """Inlined images equal to `want` (the report enlarges small images by a whole factor,
    nearest-neighbour: one pixel per block is the original)."""
    return sum(a.shape[0] % want.shape[0] == 0 and np.array_equal(
        a[::a.shape[0] // want.shape[0], ::a.shape[1] // want.shape[1]], want)
        for a in _shown(html))


def _n_planted(html: str) -> int:
    return _count(html, planted_image())


# --- defect 6: the report pairs outputs with the originals of the run's own index ----------
def test_another_index_is_refused_unless_the_mismatch_is_explicit(audit, tmp_path, capsys):
    from memaudit.index import build_index

    other = build_index(make_training_parquet(tmp_path / "other.parquet", n=9), "pixels",
                        tmp_path / "other-index", calibrate=False)
    db, out = audit / "out" / "audit.duckdb", tmp_path / "r.html"
    with pytest.raises(UserError, match=r"is not the run's index \(content hash [0-9a-f]{12}; "
                       r"run 1 recorded [0-9a-f]{12} for .*out/index\).*--index-mismatch-ok"):
        write_report(db, out, index=other, sources=[tmp_path / "other.parquet"])
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["report", str(db), "--out", str(out), "--index", str(other)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--index-mismatch-ok" in err and not out.exists()
    # explicit: rendered, and the page says so at its top (before the summary)
    main(["report", str(db), "--out", str(out), "--index", str(other), "--index-mismatch-ok"])
    html = out.read_text()
    note = html.index("not the index this run recorded")
    assert note < html.index("<h2")
    ctx = build_context(db, index=other, index_mismatch_ok=True)
    assert "not the run's index" in ctx["index_mismatch"]


def test_the_same_index_moved_elsewhere_is_accepted(audit, tmp_path):
    moved = shutil.copytree(audit / "out" / "index", tmp_path / "moved-index")
    html = write_report(audit / "out" / "audit.duckdb", tmp_path / "r.html", index=moved,
                        sources=[audit / "train.parquet"]).read_text()
    assert "not the index this run recorded" not in html
    # the training images are shown as from the run's own index in place (4 flagged
    # generations beside their 4 training images, and the per-prompt rows)
    here = write_report(audit / "out" / "audit.duckdb", tmp_path / "r2.html",
                        sources=[audit / "train.parquet"]).read_text()
    assert _n_planted(html) == _n_planted(here) >= 8


# --- defect 7: only files inside the index folder or named by the user are opened ---------
def _secret_parquet(path: Path) -> np.ndarray:
    a = np.zeros((16, 16), np.uint8)
    a[::2, ::2] = 255  # a checkerboard no audit image looks like
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    pq.write_table(pa.table({"png": [buf.getvalue()] * 40}), path)
    return a


def _crafted_index(audit: Path, folder: Path, targets: list[str]) -> Path:
    """The run's index (same content hash) whose items and manifest name `targets`."""
    index = shutil.copytree(audit / "out" / "index", folder)
    items = pq.read_table(index / "items.parquet")
    names = [targets[i % len(targets)] for i in range(items.num_rows)]
    items = items.set_column(items.column_names.index("source_file"), "source_file",
                             pa.array(names, pa.string()))
    pq.write_table(items, index / "items.parquet")
    man = json.loads((index / "manifest.json").read_text())
    man["source"]["paths"] = sorted(set(targets))  # the manifest vouches for them
    (index / "manifest.json").write_text(json.dumps(man))
    return index


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every Parquet file the report reads a training image from."""
    import memaudit.report.images as images_mod

    calls: list[str] = []
    real = images_mod.training_image_bytes

    def spy(source_file, *a, **k):
        calls.append(str(source_file))
        return real(source_file, *a, **k)

    monkeypatch.setattr(images_mod, "training_image_bytes", spy)
    return calls


def test_files_a_manifest_names_are_never_opened(audit, tmp_path, opened):
    secret = _secret_parquet(tmp_path / "private.parquet")
    db = audit / "out" / "audit.duckdb"
    generated_only = _n_planted(write_report(db, tmp_path / "g.html").read_text())
    for target in ("/etc/passwd", str(tmp_path / "private.parquet")):
        index = _crafted_index(audit, tmp_path / f"crafted-{len(target)}", [target])
        html = write_report(db, tmp_path / "r.html", index=index).read_text()
        assert opened == []  # neither /etc/passwd nor a Parquet the user never named
        assert _count(html, secret) == 0
        assert "root:x:" not in html  # no line of /etc/passwd
        assert _n_planted(html) == generated_only  # the generated images only
        assert "Files not shown" in html and "neither inside the index folder nor named " \
            "with --source, never opened, e.g. " + target in html
    # the user names the Parquet: their word, so it is read
    html = write_report(db, tmp_path / "r.html", index=index,
                        sources=[tmp_path / "private.parquet"]).read_text()
    assert set(opened) == {str(tmp_path / "private.parquet")}
    assert _count(html, secret) >= 4  # beside the 4 flagged generations (and their rows)


def test_sources_inside_the_index_folder_are_read_without_naming_them(audit, tmp_path,
                                                                       opened, counts):
    index = shutil.copytree(audit / "out" / "index", tmp_path / "index")
    shutil.copy(audit / "train.parquet", index / "train.parquet")
    _crafted_index(audit, tmp_path / "unused", [str(index / "train.parquet")])
    shutil.copy(tmp_path / "unused" / "items.parquet", index / "items.parquet")
    html = write_report(audit / "out" / "audit.duckdb", tmp_path / "r.html",
                        index=index).read_text()
    assert set(opened) == {str(index / "train.parquet")} and _n_planted(html) == counts[1]
    # a symlink inside the index folder to a file outside it is outside
    (index / "train.parquet").unlink()
    (index / "train.parquet").symlink_to(audit / "train.parquet")
    opened.clear()
    html = write_report(audit / "out" / "audit.duckdb", tmp_path / "r.html",
                        index=index).read_text()
    assert opened == [] and _n_planted(html) == counts[0]


def test_without_sources_the_report_says_how_to_show_the_training_images(audit, tmp_path,
                                                                         opened, counts):
    html = write_report(audit / "out" / "audit.duckdb", tmp_path / "r.html").read_text()
    assert opened == [] and _n_planted(html) == counts[0]  # the generated images only
    assert "--source" in html and str(audit / "train.parquet") in html
    with pytest.raises(UserError, match="--source .*not found"):
        write_report(audit / "out" / "audit.duckdb", tmp_path / "r.html",
                     sources=[tmp_path / "missing.parquet"])


def test_an_image_folder_is_shown_when_named_and_the_hint_names_the_folder(tmp_path):
    """A training set that is a folder of images: the index records one file per image; the
    report opens them only when the folder is named with --source, and says to name the
    folder (not its first three images)."""
    from memaudit.index import build_index
    from memaudit.report.images import _TrainingImages

    rng = np.random.default_rng(0)
    root = tmp_path / "lora"
    want = {}
    for i in range(5):
        key = f"{'a' if i < 3 else 'b/c'}/{i}.png"
        want[key] = (rng.random((16, 16)) * 255).astype(np.uint8)
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(want[key]).save(root / key)
        (root / key).with_suffix(".txt").write_text(f"image {i}")
    index = build_index(root, "pixels", tmp_path / "index", calibrate=False)
    bare = _TrainingImages(index)
    assert [bare.uri(r) for r in range(5)] == [None] * 5
    assert bare.left_out(False)[1] == (f"the index records its training data as 5 files under "
                                       f"{root.resolve()}: name it with --source to show the "
                                       "training images")
    named = _TrainingImages(index, [root])
    for r in range(5):
        html = f'src="{named.uri(r)}"'
        assert _count(html, want[named.index.item(r)["key"]]) == 1
    assert named.left_out(True) == []
