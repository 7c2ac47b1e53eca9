"""Index build: items/manifest/faiss contents, duplicate groups, skipped rows, factories,
recipes, atomic + resumable builds (killed subprocess), TrainingIndex API, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from index_helpers import (
    digits_parquet,
    digits_rgb,
    encode,
    make_sscd_torchscript,
    photos,
    tiny_clip_config,
    write_parquet,
)
from PIL import Image

from memaudit.common import UserError
from memaudit.index import TrainingIndex, build_index
from memaudit.index.build import EXIT_AFTER_SHARD_ENV

N = 40
DUPS = {10: 3, 25: 3, 30: 7}  # rows 10 and 25 copy row 3's pixels, row 30 copies row 7
BAD = {5: b"", 17: b"\x89PNG\r\n\x1a\n broken", 33: None}


@pytest.fixture()
def digits_data(tmp_path):
    return digits_parquet(tmp_path / "train" / "digits.parquet", n=N, dup_of=DUPS,
                          bad_rows=BAD)


def test_pixels_build_groups_items_manifest(tmp_path, digits_data):
    out = build_index(digits_data, "pixels", tmp_path / "idx", batch_size=8, shard_rows=16,
                      calibrate=False)
    assert sorted(p.name for p in out.iterdir()) == ["groups.npy", "index.faiss",
                                                     "items.parquet", "manifest.json",
                                                     "members.npy"]
    assert not (tmp_path / "idx.partial").exists()
    idx = TrainingIndex.open(out)
    m = idx.manifest
    kept = [i for i in range(N) if i not in BAD]
    assert m["rows"] == len(kept) == idx.nitems and m["input_rows"] == N
    assert m["embedder"] == {"name": "pixels", "config": {"size": [8, 8]}}
    assert (m["dim"], m["metric"], m["factory"], m["dedup"]) == (192, "l2", "Flat",
                                                                 "exact-pixel-hash")
    assert m["pixel_size_auto"] is True
    assert m["skipped"]["by_reason"] == {"empty": 2, "undecodable": 1}
    assert sorted(m["skipped"]["keys"]["empty"]) == ["d0005", "d0033"]
    assert m["skipped"]["keys"]["undecodable"] == ["d0017"]
    assert m["calibration"] is None and len(m["content_hash"]) == 64

    items = idx.items.to_pydict()
    assert items["key"] == [f"d{i:04d}" for i in kept]
    assert items["row_id"] == list(range(len(kept)))
    assert items["source_row"] == kept
    assert set(items["source_file"]) == {str(digits_data)}
    # digits themselves contain no exact duplicates in the first 40; we planted 3 copies
    assert m["groups"] == idx.ntotal == len(kept) - 3
    pos = {k: i for i, k in enumerate(items["key"])}
    g3 = items["group_id"][pos["d0003"]]
    assert items["group_id"][pos["d0010"]] == g3 == items["group_id"][pos["d0025"]]
    assert items["group_count"][pos["d0025"]] == 3 and items["group_count"][pos["d0004"]] == 1
    assert items["is_representative"][pos["d0003"]] and not items["is_representative"][pos["d0010"]]
    # group ids are first-seen order; faiss holds one representative each (id == group id)
    reps = [i for i, r in enumerate(items["is_representative"]) if r]
    assert [items["group_id"][i] for i in reps] == list(range(idx.ntotal))
    imgs, _ = digits_rgb(N)
    want = imgs[[kept[i] for i in reps]].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    np.testing.assert_array_equal(idx.group_vectors(), want.reshape(len(reps), -1))
    np.testing.assert_array_equal(idx.representative_rows([g3, -1]), [pos["d0003"], -1])
    np.testing.assert_array_equal(idx.group_counts([g3]), [3])
    # most frequent caption of the group: two "copy of row 3" beat the original caption
    assert idx.group_caption(g3) == "copy of row 3"
    # a tie (one original, one copy) goes to the caption seen first
    assert idx.group_caption(items["group_id"][pos["d0007"]]) == "a handwritten digit 7"
    assert idx.item(pos["d0010"])["caption"] == "copy of row 3"

    # search: an item finds its own group at squared distance 0
    q = idx.embedder.embed([Image.fromarray(imgs[3]), Image.fromarray(imgs[12])])
    scores, gids = idx.search(q, 3)
    assert gids[0, 0] == g3 and scores[0, 0] == 0.0
    assert gids[1, 0] == items["group_id"][pos["d0012"]]
    assert np.all(np.diff(scores, axis=1) >= 0)
    with pytest.raises(UserError, match="shape"):
        idx.search(np.zeros((1, 5), np.float32), 1)


def test_pixel_size_default_and_override(tmp_path):
    ph = photos()
    blobs = [encode(ph["astronaut"]), encode(ph["coffee"])]
    p = write_parquet(tmp_path / "mixed.parquet", blobs, ["a", "b"])
    idx = TrainingIndex.open(build_index(p, "pixels", tmp_path / "i1", calibrate=False))
    assert idx.manifest["embedder"]["config"]["size"] == [64, 64] and idx.dim == 3 * 64 * 64
    idx2 = TrainingIndex.open(build_index(p, "pixels", tmp_path / "i2", calibrate=False,
                                          embedder_opts={"size": 16}))
    assert idx2.dim == 3 * 16 * 16 and idx2.manifest["pixel_size_auto"] is False


def test_ivf_pq_factory_trained(tmp_path):
    p = digits_parquet(tmp_path / "d.parquet", n=300)
    out = build_index(p, "pixels", tmp_path / "ivf", factory="IVF2,PQ4x4", batch_size=128,
                      shard_rows=256, calibrate=False)
    idx = TrainingIndex.open(out)
    assert idx.manifest["factory"] == "IVF2,PQ4x4" and idx.index.is_trained
    assert idx.ntotal == idx.manifest["groups"]
    imgs, _ = digits_rgb(3)
    _, gids = idx.search(idx.embedder.embed([Image.fromarray(a) for a in imgs]), 1)
    assert gids.shape == (3, 1) and (gids >= 0).all()
    with pytest.raises(UserError, match="bad faiss factory"):
        build_index(p, "pixels", tmp_path / "bad", factory="NotAFactory", calibrate=False)
    assert not (tmp_path / "bad").exists()


def test_exists_overwrite_and_settings_mismatch(tmp_path, digits_data):
    out = build_index(digits_data, "pixels", tmp_path / "idx", calibrate=False)
    with pytest.raises(UserError, match="already exists"):
        build_index(digits_data, "pixels", out, calibrate=False)
    build_index(digits_data, "pixels", out, calibrate=False, overwrite=True,
                embedder_opts={"size": 4})
    assert TrainingIndex.open(out).dim == 48
    assert not list(tmp_path.glob("idx.old-*"))
    # a .partial from a build with other settings is replaced, not resumed (nor refused)
    partial = tmp_path / "other.partial"
    partial.mkdir()
    (partial / "state.json").write_text("{}")
    (partial / "shard_000000.json").write_text("{}")
    out2 = build_index(digits_data, "pixels", tmp_path / "other", calibrate=False)
    assert TrainingIndex.open(out2).nitems == N - len(BAD) and not partial.exists()


def test_overwrite_never_replaces_data_or_a_foreign_folder(tmp_path, digits_data):
    """issue 11: `index build DATA --out DATA --overwrite` deleted the training data."""
    data_dir = digits_data.parent
    before = digits_data.read_bytes()
    for out in (data_dir, tmp_path):  # the source folder, a folder holding it
        with pytest.raises(UserError, match="input"):
            build_index(data_dir, "pixels", out, overwrite=True, calibrate=False)
    with pytest.raises(UserError, match="is a file"):
        build_index(digits_data, "pixels", digits_data, overwrite=True, calibrate=False)
    with pytest.raises(UserError, match="inside the input folder"):
        build_index(data_dir, "pixels", data_dir / "idx", calibrate=False)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not an index")
    with pytest.raises(UserError, match="not a memaudit index folder"):
        build_index(digits_data, "pixels", foreign, overwrite=True, calibrate=False)
    assert digits_data.read_bytes() == before and (foreign / "holiday.jpg").exists()
    assert sorted(p.name for p in data_dir.iterdir()) == ["digits.parquet"]


def test_no_index_from_only_corrupt_rows(tmp_path):
    """issue 11: a Parquet whose rows are all corrupt published a 0-item index (exit 0)."""
    bad = write_parquet(tmp_path / "bad.parquet", [b"", b"\x89PNG broken", None],
                        ["a", "b", "c"])
    with pytest.raises(UserError, match=r"no usable image.*2 empty, 1 undecodable"):
        build_index(bad, "pixels", tmp_path / "idx", calibrate=False)
    assert not (tmp_path / "idx").exists() and not (tmp_path / "idx.partial").exists()


def _build_cmd(data: Path, out: Path) -> list[str]:
    code = textwrap.dedent(f"""
        from memaudit.index import build_index
        build_index({str(data)!r}, "pixels", {str(out)!r}, batch_size=4, shard_rows=8,
                    calibrate=False)
    """)
    return [sys.executable, "-c", code]


def test_killed_build_resumes_identical(tmp_path, digits_data):
    ref = build_index(digits_data, "pixels", tmp_path / "ref", batch_size=4, shard_rows=8,
                      calibrate=False)
    out = tmp_path / "idx"
    env = {**os.environ, EXIT_AFTER_SHARD_ENV: "2", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(_build_cmd(digits_data, out), env=env, capture_output=True, text=True)
    assert r.returncode == 75, r.stderr
    partial = tmp_path / "idx.partial"
    assert not out.exists() and partial.is_dir()
    assert sorted(p.name for p in partial.glob("shard_*.json")) == [
        "shard_000000.json", "shard_000001.json", "shard_000002.json"]
    done_before = {p.name: p.stat().st_mtime_ns for p in partial.glob("shard_*")}
    # restart, killed again after the next shard: the three finished shards are untouched
    env[EXIT_AFTER_SHARD_ENV] = "3"
    r = subprocess.run(_build_cmd(digits_data, out), env=env, capture_output=True, text=True)
    assert r.returncode == 75, r.stderr
    after = {p.name: p.stat().st_mtime_ns for p in partial.glob("shard_*")}
    assert {k: after[k] for k in done_before} == done_before  # kept, not recomputed
    assert "shard_000003.json" in after and "shard_000003.json" not in done_before
    env.pop(EXIT_AFTER_SHARD_ENV)
    r = subprocess.run(_build_cmd(digits_data, out), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.is_dir() and not partial.exists()
    for name in ("index.faiss", "items.parquet"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
    for volatile in ("created", "build_seconds"):
        a.pop(volatile), b.pop(volatile)
    assert a == b


def test_resume_skips_finished_shards(tmp_path, digits_data, monkeypatch):
    """In-process: shards already on disk are not re-embedded on restart."""
    from memaudit.index import shards

    out = tmp_path / "idx"
    env = {**os.environ, EXIT_AFTER_SHARD_ENV: "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(_build_cmd(digits_data, out), env=env, capture_output=True, text=True)
    assert r.returncode == 75, r.stderr
    seen: list[int] = []
    orig = shards.build_shard

    def spy(spec, k, *a, **kw):
        seen.append(k)
        return orig(spec, k, *a, **kw)

    monkeypatch.setattr(shards, "build_shard", spy)
    build_index(digits_data, "pixels", out, batch_size=4, shard_rows=8, calibrate=False)
    assert seen == [2, 3, 4]  # 40 rows in shards of 8; 0 and 1 were on disk


def test_calibration_hook_and_recipe_cli(tmp_path, digits_data, capsys):
    from memaudit.cli import main

    recipe = tmp_path / "indexes" / "digits.toml"
    recipe.parent.mkdir()
    recipe.write_text(textwrap.dedent(f"""
        data = {str(digits_data)!r}
        embedder = "pixels"
        out = {str(tmp_path / "indexes" / "digits")!r}
        batch_size = 16
        size = 8
        [calibration]
        sample = 20
    """))
    main(["--quiet", "index", "build", str(recipe)])
    idx = TrainingIndex.open(tmp_path / "indexes" / "digits")
    cal = idx.manifest["calibration"]
    assert cal is not None and cal["settings"]["sampled"] == 20
    assert {"nl2", "l2-tiled"} <= set(cal)
    assert idx.manifest["embedder"]["config"] == {"size": [8, 8]}
    capsys.readouterr()
    main(["index", "info", str(tmp_path / "indexes" / "digits")])
    text = capsys.readouterr().out
    assert "pixels" in text and "exact-pixel-hash" in text
    main(["index", "calibrate", str(tmp_path / "indexes" / "digits"), "--sample", "10"])
    assert TrainingIndex.open(tmp_path / "indexes" / "digits").manifest["calibration"][
        "settings"]["sampled"] == 10
    bad = tmp_path / "bad.toml"
    bad.write_text('data = "x"\nembedder = "pixels"\nfrobnicate = 1\n')
    with pytest.raises(SystemExit) as e:
        main(["index", "build", str(bad)])
    assert e.value.code == 2 and "unknown keys frobnicate" in capsys.readouterr().err


def test_sscd_build_and_query_cli(tmp_path, capsys):
    from memaudit.cli import main

    weights = make_sscd_torchscript(tmp_path / "w" / "sscd_disc_mixup.torchscript.pt")
    ph = photos()
    names = ["astronaut", "coffee", "chelsea", "cat", "rocket"]
    data = write_parquet(tmp_path / "photos.parquet", [encode(ph[n], "JPEG") for n in names],
                         [f"a photo of {n}" for n in names], keys=names, image_col="jpg")
    main(["--quiet", "index", "build", str(data), "--embedder", "sscd", "--weights",
          str(weights), "--out", str(tmp_path / "sidx"), "--batch-size", "2"])
    idx = TrainingIndex.open(tmp_path / "sidx")
    assert (idx.metric, idx.dim, idx.manifest["preprocessing"]) == ("ip", 512, "official")
    assert idx.manifest["embedder"]["config"]["weights"] == str(weights.resolve())
    assert idx.nitems == 5 and idx.ntotal == 4  # chelsea and cat are the same picture
    assert "sscd" in idx.manifest["calibration"]  # the criteria area's calibration ran
    keys = idx.items.column("key").to_pylist()
    g = idx.items.column("group_id").to_pylist()
    assert g[keys.index("chelsea")] == g[keys.index("cat")]
    np.testing.assert_allclose(np.linalg.norm(idx.group_vectors(), axis=1), 1.0, atol=1e-5)
    q = tmp_path / "query.png"
    Image.fromarray(ph["rocket"]).save(q)
    capsys.readouterr()
    main(["index", "query", str(tmp_path / "sidx"), str(q), "--k", "2", "--weights",
          str(weights)])
    out = capsys.readouterr().out
    assert "rocket" in out and "a photo of rocket" in out and "cosine" in out
    from memaudit.index.query import query_images

    (_, rows), = query_images(tmp_path / "sidx", [q], k=4, weights=str(weights))
    assert rows[0]["key"] == "rocket" and rows[0]["score"] > 0.99
    # k = 4 = every group: chelsea (the representative of {chelsea, cat}) is among them
    cat = [r for r in rows if r["key"] == "chelsea"]
    assert len(rows) == 4 and len(cat) == 1 and cat[0]["group_count"] == 2
    _shared_index_runs_no_code(tmp_path, tmp_path / "sidx", weights, q, capsys)


def _shared_index_runs_no_code(tmp_path, sidx, weights, q, capsys):
    """issue 11: an index's manifest never makes memaudit load (or fetch) the TorchScript it
    names; only a file the user names, with the SHA-256 the manifest recorded."""
    import torch

    from memaudit.cli import main
    from memaudit.common import sha256_file

    loaded: list[str] = []
    real_load = torch.jit.load

    def spy(f, *a, **kw):
        loaded.append(str(f))
        return real_load(f, *a, **kw)

    torch.jit.load = spy
    try:
        sha = sha256_file(weights)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:  # the user named no weights
            main(["index", "query", str(sidx), str(q)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1
        assert "sscd_disc_mixup.torchscript.pt" in err and sha in err and "--weights" in err
        # a third party's manifest pointing at "their" model (a path, then a URL)
        evil = tmp_path / "evil.pt"
        with warnings.catch_warnings():  # torch 2.x deprecation notice of jit.script
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.script(torch.nn.Linear(2, 2)).save(str(evil))
        man = json.loads((sidx / "manifest.json").read_text())
        for target in (str(evil), "https://example.invalid/evil.pt"):
            man["embedder"]["config"]["weights"] = target
            (sidx / "manifest.json").write_text(json.dumps(man))
            with pytest.raises(SystemExit) as e:
                main(["index", "query", str(sidx), str(q)])
            err = capsys.readouterr().err  # it names the file it needs, and loads nothing
            assert e.value.code == 2 and "pass --weights PATH" in err
        # a file the user names that is not the one the index was built with
        with pytest.raises(SystemExit) as e:
            main(["index", "query", str(sidx), str(q), "--weights", str(evil)])
        assert e.value.code == 2 and "SHA-256" in capsys.readouterr().err
        assert loaded == []  # nothing was ever loaded: not the manifest's, not the wrong one
        main(["index", "query", str(sidx), str(q), "--weights", str(weights)])
        assert loaded == [str(weights.resolve())]
    finally:
        torch.jit.load = real_load


def test_clip_build_tiny(tmp_path):
    cfg = tiny_clip_config(tmp_path)
    ph = photos()
    names = ["astronaut", "coffee", "rocket"]
    data = write_parquet(tmp_path / "p.parquet", [encode(ph[n]) for n in names], names,
                         keys=names)
    out = build_index(data, "clip", tmp_path / "cidx",
                      embedder_opts={"model": "memaudit-tiny-clip", "model_config": str(cfg)})
    idx = TrainingIndex.open(out)
    assert (idx.metric, idx.dim, idx.ntotal) == ("ip", 32, 3)
    assert "clip" in idx.manifest["calibration"]
    v = idx.embedder.embed([Image.fromarray(ph["coffee"])])
    s, gids = idx.search(v, 1)
    assert gids[0, 0] == 1 and s[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_read_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_index(tmp_path / "nothing.parquet", "pixels", tmp_path / "x")
    with pytest.raises(UserError, match="unknown embedder"):
        build_index(tmp_path / "nothing.parquet", "dino", tmp_path / "x")
    with pytest.raises(UserError, match="not found"):
        TrainingIndex.open(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="missing manifest.json"):
        TrainingIndex.open(tmp_path / "half")


def test_example_recipes_parse():
    from memaudit.index import load_recipe

    root = Path(__file__).resolve().parents[1] / "indexes"
    recipes = sorted(root.glob("example-*.toml"))
    assert len(recipes) >= 3
    for r in recipes:
        kw = load_recipe(r)
        assert kw["embedder"] in ("pixels", "sscd", "clip") and kw["source"] and kw["out"]
    sscd = load_recipe(root / "example-sscd.toml")
    assert sscd["embedder_opts"]["preprocessing"] == "official"


def test_decoding_runs_ahead_in_worker_threads(tmp_path):
    """Decoding + preprocessing happen in the decode pool, and batches are prepared ahead
    while the consumer (the model) is still busy with the first one."""
    import threading

    from memaudit.data.parquet import iter_training_batches
    from memaudit.embedders.pixels import PixelEmbedder
    from memaudit.index.shards import prepared_batches

    p = digits_parquet(tmp_path / "d.parquet", n=40)
    threads: set[str] = set()
    calls = threading.Semaphore(0)

    class Spy(PixelEmbedder):
        def preprocess(self, image):
            threads.add(threading.current_thread().name)
            calls.release()
            return super().preprocess(image)

    gen = prepared_batches(Spy(size=8), iter_training_batches(p, batch_rows=4), workers=2,
                           prefetch=4)
    first = next(gen)
    assert len(first) == 4
    # while we hold the first batch, the pool keeps preparing the next ones
    for _ in range(4 + 3 * 4):
        assert calls.acquire(timeout=30)
    rest = list(gen)
    assert sum(len(b) for b in rest) == 36
    assert [r.key for r, *_ in first] == [f"d{i:04d}" for i in range(4)]
    assert [r.key for b in rest for r, *_ in b] == [f"d{i:04d}" for i in range(4, 40)]
    assert threads and all(t.startswith("memaudit-decode") for t in threads)


def test_group_duplicates_first_seen_numbering():
    from memaudit.index.build import group_duplicates

    h = np.zeros((7, 16), np.uint8)
    for i, tag in enumerate([9, 4, 9, 7, 4, 9, 1]):  # rows 0,2,5 equal; 1,4 equal
        h[i, 0] = tag
    g, rep, counts = group_duplicates(h)
    assert g.tolist() == [0, 1, 0, 2, 1, 0, 3]
    assert rep.tolist() == [True, True, False, True, False, False, True]
    assert counts.tolist() == [3, 2, 1, 1]
    g0, rep0, c0 = group_duplicates(np.zeros((0, 16), np.uint8))
    assert len(g0) == len(rep0) == len(c0) == 0


def test_calibration_skipped_without_criteria_module(tmp_path, digits_data, monkeypatch):
    import sys as _sys

    monkeypatch.setitem(_sys.modules, "memaudit.criteria.calibrate", None)  # import fails
    out = build_index(digits_data, "pixels", tmp_path / "idx")
    m = TrainingIndex.open(out).manifest
    assert m["calibration"] is None and "index calibrate" in m["calibration_note"]
