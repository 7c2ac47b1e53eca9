"""detect: a real folder of PNGs scored against an index (fake in-memory one and a real
index built by `memaudit.index.build_index` from Parquet), library and CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from criteria_fake import PixelEmbedder, fake_index_from_images
from PIL import Image

from memaudit.cli import main
from memaudit.common import UserError
from memaudit.criteria.calibrate import calibrate_index
from memaudit.criteria.detect import SCHEMA, detect_images


def _digits(n=120, size=16):
    from sklearn.datasets import load_digits

    d = load_digits().images[:n] / 16.0
    return [Image.fromarray(np.round(a * 255).astype(np.uint8)).convert("RGB")
            .resize((size, size), Image.NEAREST) for a in d]


def _noise(seed, size=16):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _folder(tmp_path, train, copies=(7, 42, 99)):
    folder = tmp_path / "outputs"
    (folder / "sub").mkdir(parents=True)
    for i in copies:
        train[i].save(folder / f"copy_{i:03d}.png")
    _noise(1).save(folder / "sub" / "noise_a.png")
    _noise(2).save(folder / "noise_b.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_detect_folder_against_fake_index(tmp_path):
    train = _digits()
    idx = fake_index_from_images(train, PixelEmbedder(16))
    idx.manifest["calibration"] = calibrate_index(idx, sample=100, k=50)
    folder = _folder(tmp_path, train)
    table = detect_images(folder, idx, criteria=["nl2", "l2-tiled"], batch_size=2)
    assert table.schema == SCHEMA
    assert table.num_rows == 5 * 2
    rows = table.to_pylist()
    names = [r["image"].split("/")[-1] for r in rows[::2]]
    assert names == ["copy_007.png", "copy_042.png", "copy_099.png", "noise_b.png",
                     "noise_a.png"]
    by = {(r["image"].split("/")[-1], r["criterion"]): r for r in rows}
    reps = idx.representative_rows(idx.items.column("group_id").to_numpy())
    for i in (7, 42, 99):
        for crit in ("nl2", "l2-tiled"):
            r = by[(f"copy_{i:03d}.png", crit)]
            assert r["score"] == pytest.approx(0.0, abs=1e-9)
            assert r["is_copy"] and r["is_copy_calibrated"]
            assert r["neighbour_row"] == reps[i]
            assert r["neighbour_key"] == f"k{reps[i]}"
            assert r["neighbour_caption"] == f"caption {reps[i]}"
    for name in ("noise_a.png", "noise_b.png"):
        assert not by[(name, "nl2")]["is_copy"] and not by[(name, "l2-tiled")]["is_copy"]
        assert not by[(name, "nl2")]["is_copy_calibrated"]
    nl2 = by[("noise_a.png", "nl2")]
    assert nl2["threshold"] == 1.4
    assert nl2["calibrated_threshold"] == idx.manifest["calibration"]["nl2"]["fpr"]["0.01"]
    # Parquet round trip
    pq.write_table(table, tmp_path / "r.parquet")
    assert pq.read_table(tmp_path / "r.parquet").equals(table)


def test_detect_user_errors(tmp_path):
    idx = fake_index_from_images(_digits(20), PixelEmbedder(16))
    with pytest.raises(UserError, match="no such file"):
        detect_images(tmp_path / "missing", idx)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        detect_images(tmp_path / "empty", idx)
    _noise(0).save(tmp_path / "x.png")
    with pytest.raises(UserError, match="supports nl2, l2-tiled"):
        detect_images(tmp_path / "x.png", idx, criteria=["sscd"])
    with pytest.raises(UserError, match="unknown criterion"):
        detect_images(tmp_path / "x.png", idx, criteria=["lpips"])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        detect_images(tmp_path / "bad.png", idx)


def _write_parquet(path, images):
    rows = []
    for i, im in enumerate(images):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        rows.append({"key": f"d{i:04d}", "caption": f"a digit {i % 10}", "png": buf.getvalue()})
    rows.append(dict(rows[5], key="dup-of-5"))  # an exact duplicate
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_detect_cli_against_real_index(tmp_path, capsys):
    from memaudit.index import build_index

    train = _digits(120)
    _write_parquet(tmp_path / "train.parquet", train)
    out = build_index(tmp_path / "train.parquet", "pixels", tmp_path / "idx", batch_size=32)
    manifest = json.loads((out / "manifest.json").read_text())
    cal = manifest["calibration"]
    assert cal["settings"]["groups"] == 120 and cal["settings"]["items"] == 121
    assert cal["nl2"]["n"] == 121  # every training item (METHODS 1.2), the duplicate too
    assert set(cal) >= {"settings", "nl2", "l2-tiled"}
    folder = _folder(tmp_path, train, copies=(5, 30))
    main(["detect", str(folder), "--index", str(out), "--out", str(tmp_path / "r.parquet"),
          "--criterion", "nl2", "--device", "cpu", "--batch-size", "3"])
    printed = capsys.readouterr().out
    assert "d0005" in printed and "nl2: 2/4 copies at the fixed 1.4" in printed
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert [r["criterion"] for r in rows] == ["nl2"] * 4
    first = rows[0]
    assert first["image"].endswith("copy_005.png") and first["score"] == pytest.approx(0)
    assert first["neighbour_key"] == "d0005" and first["group_count"] == 2
    assert first["calibrated_threshold"] == pytest.approx(cal["nl2"]["fpr"]["0.01"])


def test_detect_cli_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["detect", str(tmp_path / "nope"), "--index", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: no such file or directory: {tmp_path / 'nope'}"]
    _noise(0).save(tmp_path / "x.png")
    with pytest.raises(SystemExit) as e:
        main(["detect", str(tmp_path / "x.png"), "--index", str(tmp_path / "noindex")])
    assert e.value.code == 2
    assert "not an index directory" in capsys.readouterr().err
