"""Streaming Parquet reader: column detection, keys, files/dirs/globs, bad rows."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from index_helpers import digits_parquet, digits_rgb, encode, photos, write_parquet
from PIL import Image

from memaudit.common import UserError
from memaudit.data.parquet import (
    count_rows,
    decode_image,
    iter_training_batches,
    iter_training_rows,
    resolve_sources,
)


def test_rows_keys_captions_bytes(tmp_path):
    p = digits_parquet(tmp_path / "d.parquet", n=20)
    rows = list(iter_training_rows(p, batch_rows=7))
    assert [r.key for r in rows] == [f"d{i:04d}" for i in range(20)]
    assert [r.source_row for r in rows] == list(range(20))
    assert [r.row for r in rows] == list(range(20))
    assert rows[3].source_file == str(p)
    imgs, labels = digits_rgb(20)
    assert rows[3].caption == f"a handwritten digit {labels[3]}"
    img, reason = decode_image(rows[3].image_bytes)
    assert reason is None
    np.testing.assert_array_equal(np.asarray(img), imgs[3])


def test_hf_struct_text_and_generated_keys(tmp_path):
    ph = photos()
    blobs = [encode(ph["astronaut"], "JPEG"), encode(ph["coffee"], "PNG")]
    p = write_parquet(tmp_path / "hf-part.parquet", blobs, ["an astronaut", None],
                      image_col="image", caption_col="text", struct=True)
    rows = list(iter_training_rows(p))
    assert [r.key for r in rows] == ["hf-part:0", "hf-part:1"]
    assert [r.caption for r in rows] == ["an astronaut", ""]
    assert rows[0].image_bytes == blobs[0]
    img, _ = decode_image(rows[1].image_bytes)
    np.testing.assert_array_equal(np.asarray(img), ph["coffee"])


def test_directory_and_glob_in_sorted_order(tmp_path):
    imgs, _ = digits_rgb(6)
    for name, part in (("b.parquet", imgs[3:]), ("a.parquet", imgs[:3])):
        write_parquet(tmp_path / "set" / name, [encode(a) for a in part],
                      [name] * len(part), image_col="jpg")
    assert [f.name for f in resolve_sources(tmp_path / "set")] == ["a.parquet", "b.parquet"]
    rows = list(iter_training_rows(tmp_path / "set"))
    assert [r.key for r in rows] == ["a:0", "a:1", "a:2", "b:0", "b:1", "b:2"]
    assert [r.row for r in rows] == list(range(6))
    assert [r.key for r in iter_training_rows(str(tmp_path / "set" / "*.parquet"))] == \
        [r.key for r in rows]
    assert count_rows(tmp_path / "set") == 6


def test_start_stop_skip_files_and_row_groups(tmp_path):
    imgs, _ = digits_rgb(10)
    write_parquet(tmp_path / "s" / "a.parquet", [encode(a) for a in imgs[:4]], ["x"] * 4,
                  row_group_size=2)
    write_parquet(tmp_path / "s" / "b.parquet", [encode(a) for a in imgs[4:]], ["y"] * 6,
                  row_group_size=2)
    got = [r for b in iter_training_batches(tmp_path / "s", batch_rows=3, start_row=3,
                                            stop_row=8) for r in b]
    assert [r.row for r in got] == [3, 4, 5, 6, 7]
    assert [r.key for r in got] == ["a:3", "b:0", "b:1", "b:2", "b:3"]
    assert all(len(b) <= 3 for b in iter_training_batches(tmp_path / "s", batch_rows=3))


def test_column_overrides_and_errors(tmp_path):
    imgs, _ = digits_rgb(2)
    p = write_parquet(tmp_path / "c.parquet", [encode(a) for a in imgs], ["a", "b"],
                      image_col="pixels_blob", caption_col="alt")
    with pytest.raises(UserError, match="no image column"):
        list(iter_training_rows(p))
    rows = list(iter_training_rows(p, image_col="pixels_blob", caption_col="alt"))
    assert [r.caption for r in rows] == ["a", "b"]
    with pytest.raises(UserError, match="no caption column 'nope'"):
        list(iter_training_rows(p, image_col="pixels_blob", caption_col="nope"))
    with pytest.raises(UserError, match="not found"):
        list(iter_training_rows(tmp_path / "missing.parquet"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(UserError, match="cannot read Parquet"):
        list(iter_training_rows(bad))
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"jpg": pa.array([1, 2])}), wrong)
    with pytest.raises(UserError, match="expected encoded bytes"):
        list(iter_training_rows(wrong))


def test_decode_reasons():
    assert decode_image(None) == (None, "empty")
    assert decode_image(b"") == (None, "empty")
    assert decode_image(b"\x89PNG garbage") == (None, "undecodable")
    good = encode(digits_rgb(1)[0][0])
    assert decode_image(good[: len(good) // 2])[1] == "undecodable"  # truncated
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, "PNG")
    assert decode_image(buf.getvalue(), max_pixels=10_000) == (None, "too_large")
    img, reason = decode_image(buf.getvalue())
    assert reason is None and img.size == (300, 300) and img.mode == "RGB"
    gray = io.BytesIO()
    Image.fromarray(np.full((4, 5), 200, np.uint8)).save(gray, "PNG")
    img, _ = decode_image(gray.getvalue())
    assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == [200, 200, 200]


def test_cli_missing_column_exit_2(tmp_path, capsys):
    from memaudit.cli import main

    imgs, _ = digits_rgb(2)
    p = write_parquet(tmp_path / "c.parquet", [encode(a) for a in imgs], ["a", "b"],
                      image_col="blob")
    with pytest.raises(SystemExit) as e:
        main(["index", "build", str(p), "--embedder", "pixels", "--out",
              str(tmp_path / "idx"), "--no-calibrate"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no image column" in err[0]
