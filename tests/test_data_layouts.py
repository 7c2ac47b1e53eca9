"""Training sets in every layout (issue 22): image folders, Hugging Face imagefolder,
webdataset tars, kohya-ss configs, DreamBooth folders. Each is built here from real bundled
images (scikit-learn digits), indexed, and gives the same index as the same rows in Parquet;
bad rows (corrupt image, missing caption, tar cut short) are counted and skipped."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from index_helpers import digits_rgb, encode, write_parquet

from memaudit.common import UserError
from memaudit.data.training_set import (
    iter_training_rows,
    open_training_set,
    read_image_rows,
)
from memaudit.index import TrainingIndex, build_index
from memaudit.index.build import EXIT_AFTER_SHARD_ENV

N = 10
DUP = {7: 2}  # image 7 has image 2's pixels (another caption): one group of 2


def _images() -> tuple[list[bytes], list[str]]:
    imgs, labels = digits_rgb(N)
    for i, j in DUP.items():
        imgs[i] = imgs[j]
    return [encode(a) for a in imgs], [f"a handwritten digit {int(x)}" for x in labels]


def _rows(rows: list[tuple[str, str, bytes]], tmp: Path) -> Path:
    """The same rows (key, caption, image bytes) as Parquet."""
    return write_parquet(tmp / "ref" / "same.parquet", [b for _, _, b in rows],
                         [c for _, c, _ in rows], [k for k, _, _ in rows])


def _assert_same_index(source, rows, tmp: Path, name: str, **opts) -> TrainingIndex:
    """`source` indexed gives what the same rows in Parquet give; every item reads back."""
    a = TrainingIndex.open(build_index(source, "pixels", tmp / f"idx-{name}", shard_rows=4,
                                       batch_size=3, calibrate=False, **opts))
    b = TrainingIndex.open(build_index(_rows(rows, tmp / name), "pixels", tmp / f"ref-{name}",
                                       shard_rows=4, batch_size=3, calibrate=False))
    assert a.manifest["source"]["layout"] == name
    assert a.manifest["content_hash"] == b.manifest["content_hash"]
    for col in ("row_id", "key", "caption", "group_id", "group_count", "is_representative"):
        assert a.items.column(col).to_pylist() == b.items.column(col).to_pylist(), col
    np.testing.assert_array_equal(a.group_vectors(), b.group_vectors())
    assert (a.manifest["groups"], a.manifest["rows"]) == (b.manifest["groups"], len(rows))
    by_key = {k: data for k, _, data in rows}
    for item in a.items.to_pylist():
        got = read_image_rows(item["source_file"], [item["source_row"]])
        assert got == {item["source_row"]: by_key[item["key"]]}
    return a


def test_image_folder_with_sidecar_captions(tmp_path):
    blobs, caps = _images()
    root = tmp_path / "lora"
    rows = []
    for i in range(N):
        rel = f"d{i:02d}.png" if i < 5 else f"sub/deep/d{i:02d}.png"
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blobs[i])
        p.with_suffix(".txt" if i % 2 else ".caption").write_text(caps[i] + "\n")
        rows.append((rel, caps[i], blobs[i]))
    (root / ".hidden.png").write_bytes(blobs[0])  # hidden files are not training images
    assert type(open_training_set(root)).__name__ == "FolderLayout"
    idx = _assert_same_index(root, rows, tmp_path, "folder")
    assert idx.items.column("group_count").to_pylist()[7] == 2
    # rows from any start to any stop, as a resumed build reads them
    keys = [r.key for r in iter_training_rows(root)]
    assert keys == [k for k, _, _ in rows]
    ts = open_training_set(root)
    part = [r.key for b in ts.iter_batches(batch_rows=2, start_row=3, stop_row=8) for r in b]
    assert part == keys[3:8]


def test_hf_imagefolder_jsonl_list_captions_and_csv(tmp_path):
    blobs, caps = _images()
    root = tmp_path / "hf" / "train"
    (root / "images").mkdir(parents=True)
    rows, meta = [], []
    for i in reversed(range(N)):  # metadata order, not file order
        fn = f"images/{i:03d}.png"
        (root / fn).write_bytes(blobs[i])
        text = [caps[i], f"digit number {i}"] if i == 4 else caps[i]
        meta.append({"file_name": fn, "text": text, "label": i})
        rows.append((fn, caps[i] + f"\ndigit number {i}" if i == 4 else caps[i], blobs[i]))
    (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    _assert_same_index(root, rows, tmp_path, "imagefolder")
    # metadata.csv with another caption column (--caption-column)
    csv_root = tmp_path / "hfcsv"
    (csv_root / "x").mkdir(parents=True)
    (csv_root / "x" / "a.png").write_bytes(blobs[0])
    (csv_root / "x" / "b.png").write_bytes(blobs[1])
    (csv_root / "metadata.csv").write_text(
        "file_name,prompt\nx/a.png,first\nx/missing.png,gone\n../outside.png,no\nx/b.png,second\n")
    got = list(iter_training_rows(csv_root, caption_col="prompt"))
    assert [(r.key, r.caption, r.skip) for r in got] == [
        ("x/a.png", "first", None), ("x/missing.png", "gone", "missing_file"),
        ("../outside.png", "no", "bad_path"), ("x/b.png", "second", None)]
    assert got[3].image_bytes == blobs[1] and got[2].image_bytes is None
    with pytest.raises(UserError, match="no caption column 'caption_text'"):
        list(iter_training_rows(csv_root, caption_col="caption_text"))


def _tar(path: Path, samples: list[dict[str, bytes]], keys: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, members in zip(keys, samples, strict=True):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _wds(tmp: Path) -> tuple[Path, list[tuple[str, str, bytes]]]:
    """img2dataset webdataset output: two shards of N.png, N.txt, N.json (+ its parquet)."""
    blobs, caps = _images()
    out = tmp / "wds"
    rows, shards = [], {0: ([], []), 1: ([], [])}
    for i in range(N):
        key = f"{i // 5:05d}{i % 5:04d}"
        sample = {"png": blobs[i], "json": json.dumps({"key": key, "caption": caps[i]}).encode()}
        if i != 6:  # sample 6 has no .txt: the caption comes from its .json
            sample["txt"] = caps[i].encode()
        shards[i // 5][0].append(sample)
        shards[i // 5][1].append(key)
        rows.append((key, caps[i], blobs[i]))
    for s, (samples, keys) in shards.items():
        _tar(out / f"{s:05d}.tar", samples, keys)
        write_parquet(out / f"{s:05d}.parquet", [None] * len(keys), [None] * len(keys), keys,
                      image_col="status")  # img2dataset's metadata, no images
    return out, rows


def test_webdataset_shards_streamed(tmp_path):
    out, rows = _wds(tmp_path)
    assert type(open_training_set(out)).__name__ == "WebDatasetLayout"
    _assert_same_index(out, rows, tmp_path, "webdataset")
    ts = open_training_set(out / "00001.tar")
    assert ts.unit_rows(ts.units()) == [5]
    assert [r.key for b in ts.iter_batches(start_row=2, stop_row=4) for r in b] == \
        ["000010002", "000010003"]


def test_killed_webdataset_build_resumes_identical(tmp_path):
    out, _ = _wds(tmp_path)
    ref = build_index(out, "pixels", tmp_path / "ref", batch_size=2, shard_rows=3,
                      calibrate=False)
    code = textwrap.dedent(f"""
        from memaudit.index import build_index
        build_index({str(out)!r}, "pixels", {str(tmp_path / 'idx')!r}, batch_size=2,
                    shard_rows=3, calibrate=False)
    """)
    env = {**os.environ, EXIT_AFTER_SHARD_ENV: "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 75, r.stderr
    from memaudit.index import shards

    seen: list[int] = []
    orig = shards.build_shard

    def spy(spec, k, *a, **kw):
        seen.append(k)
        return orig(spec, k, *a, **kw)

    shards.build_shard = spy
    try:
        idx = build_index(out, "pixels", tmp_path / "idx", batch_size=2, shard_rows=3,
                          calibrate=False)
    finally:
        shards.build_shard = orig
    assert seen == [2, 3]  # 10 rows in shards of 3; shards 0 and 1 were on disk
    for name in ("index.faiss", "items.parquet"):
        assert (idx / name).read_bytes() == (ref / name).read_bytes(), name


def test_kohya_config_repeats_class_tokens_and_reg(tmp_path):
    blobs, caps = _images()
    (tmp_path / "img" / "sks").mkdir(parents=True)
    (tmp_path / "reg" / "dog").mkdir(parents=True)
    rows = []
    for i in range(6):
        p = tmp_path / "img" / "sks" / f"{i}.png"
        p.write_bytes(blobs[i])
        if i < 3:
            p.with_suffix(".txt").write_text(f"sks dog, {caps[i]}\nsecond line ignored\n")
        cap = f"sks dog, {caps[i]}" if i < 3 else "sks dog"
        rows += [(f"img/sks/{i}.png", cap, blobs[i])] * 3  # num_repeats = 3
    for i in range(6, 9):
        (tmp_path / "reg" / "dog" / f"{i}.png").write_bytes(blobs[i])
        rows.append((f"reg/dog/{i}.png", "dog", blobs[i]))
    cfg = tmp_path / "lora.toml"
    cfg.write_text(textwrap.dedent("""
        [general]
        caption_extension = ".txt"
        shuffle_caption = true
        [[datasets]]
        resolution = 512
          [[datasets.subsets]]
          image_dir = "img/sks"
          class_tokens = "sks dog"
          num_repeats = 3
          [[datasets.subsets]]
          image_dir = "reg/dog"
          class_tokens = "dog"
          is_reg = true
    """))
    idx = _assert_same_index(cfg, rows, tmp_path, "kohya")
    assert idx.items.column("group_count").to_pylist()[:3] == [3, 3, 3]
    src = idx.manifest["source"]
    assert (src["instance_prompts"], src["class_prompt"]) == (["sks dog"], "dog")
    from memaudit.cli import main  # the CLI: --dataset-config names the training set

    main(["--quiet", "index", "build", "--dataset-config", str(cfg), "--embedder", "pixels",
          "--out", str(tmp_path / "cli"), "--no-calibrate"])
    cli = TrainingIndex.open(tmp_path / "cli")
    assert cli.items.select(["key", "caption", "group_count"]) == \
        idx.items.select(["key", "caption", "group_count"])
    with pytest.raises(SystemExit) as e:
        main(["index", "build", str(cfg), "--dataset-config", str(cfg), "--embedder", "pixels",
              "--out", str(tmp_path / "cli2")])
    assert e.value.code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img/sks"\n'
                   'num_repeats = 0\n')
    with pytest.raises(UserError, match="num_repeats must be an integer >= 1"):
        open_training_set(bad).units()


def test_dreambooth_instance_prompt_and_kohya_folder_names(tmp_path):
    blobs, _ = _images()
    inst = tmp_path / "instance"
    inst.mkdir()
    for i in range(4):
        (inst / f"{i}.png").write_bytes(blobs[i])
    (inst / "0.txt").write_text("ignored: DreamBooth trains every image on the prompt")
    rows = [(f"{i}.png", "a photo of sks dog", blobs[i]) for i in range(4)]
    idx = _assert_same_index(inst, rows, tmp_path, "dreambooth",
                             instance_prompt="a photo of sks dog",
                             class_prompt="a photo of dog")
    src = idx.manifest["source"]
    assert (src["instance_prompts"], src["class_prompt"]) == (["a photo of sks dog"],
                                                              "a photo of dog")
    db = tmp_path / "train"
    for folder, ids in (("10_sks cat", (4, 5)), ("2_cat", (6,))):
        (db / folder).mkdir(parents=True)
        for i in ids:
            (db / folder / f"{i}.png").write_bytes(blobs[i])
    (db / "2_cat" / "6.caption").write_text("a cat on a mat")
    ts = open_training_set(db, layout="dreambooth")
    got = [(r.key, r.caption) for r in iter_training_rows(db, layout="dreambooth")]
    assert got == [("10_sks cat/4.png", "sks cat")] * 10 + [("10_sks cat/5.png", "sks cat")] * 10 \
        + [("2_cat/6.png", "a cat on a mat")] * 2
    assert ts.describe()["instance_prompts"] == ["sks cat", "cat"]
    with pytest.raises(UserError, match="not a DreamBooth folder"):
        open_training_set(inst, layout="dreambooth").units()


def test_bad_rows_counted_and_skipped(tmp_path, capsys):
    from memaudit.cli import main

    blobs, caps = _images()
    root = tmp_path / "set"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.png").write_bytes(blobs[i] if i != 2 else b"\x89PNG\r\n\x1a\n broken")
        if i != 4:
            (root / f"{i}.txt").write_text(caps[i])
    main(["--quiet", "index", "build", str(root), "--embedder", "pixels", "--out",
          str(tmp_path / "idx"), "--no-calibrate"])
    skipped = [ln for ln in capsys.readouterr().out.splitlines() if "skipped" in ln]
    assert len(skipped) == 1 and "undecodable" in skipped[0] and "no_caption" in skipped[0]
    m = TrainingIndex.open(tmp_path / "idx").manifest
    assert m["skipped"]["by_reason"] == {"undecodable": 1, "no_caption": 1}
    assert m["skipped"]["keys"] == {"undecodable": ["2.png"], "no_caption": ["4.png"]}
    assert (m["input_rows"], m["rows"]) == (6, 4)
    # a tar cut inside sample 3's image: samples 0-2 kept, 3 skipped, the rest are gone
    out, _ = _wds(tmp_path)
    tar = out / "00000.tar"
    data = tar.read_bytes()
    cut = data.index(blobs[3][:64]) + 40
    cut_dir = tmp_path / "cut"
    cut_dir.mkdir()
    (cut_dir / "00000.tar").write_bytes(data[:cut])
    rows = list(iter_training_rows(cut_dir))
    assert [(r.key, r.skip) for r in rows] == [("000000000", None), ("000000001", None),
                                             ("000000002", None), ("000000003", "truncated")]
    m = TrainingIndex.open(build_index(cut_dir, "pixels", tmp_path / "cut-idx",
                                       calibrate=False)).manifest
    assert m["skipped"]["by_reason"] == {"truncated": 1} and m["rows"] == 3
    # cut exactly after a sample (no end-of-archive blocks): the last sample is suspect
    with tarfile.open(tar) as tf:
        members = tf.getmembers()  # sample 0: png, json, txt; members[3] starts sample 1
    (cut_dir / "00000.tar").write_bytes(data[:members[3].offset])
    assert [(r.key, r.skip) for r in iter_training_rows(cut_dir)] == [("000000000", "truncated")]


def test_detection_and_errors(tmp_path):
    with pytest.raises(UserError, match="training set not found"):
        open_training_set(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no training data found"):
        open_training_set(tmp_path / "empty")
    (tmp_path / "nocap").mkdir()
    (tmp_path / "nocap" / "a.png").write_bytes(_images()[0][0])
    with pytest.raises(UserError, match="no caption files .* --instance-prompt"):
        open_training_set(tmp_path / "nocap").units()
    with pytest.raises(UserError, match="unknown training-set layout 'zip'"):
        open_training_set(tmp_path / "nocap", layout="zip")
    bad = tmp_path / "meta"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{oops\n')
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        ts = open_training_set(bad)
        ts.unit_rows(ts.units())
    (tmp_path / "x.tar").write_bytes(b"not a tar at all")
    with pytest.raises(UserError, match="cannot read tar file"):
        open_training_set(tmp_path / "x.tar").unit_rows([tmp_path / "x.tar"])
