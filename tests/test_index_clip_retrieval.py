"""Import of a clip-retrieval output folder (img_emb/*.npy + metadata/*.parquet [+ autofaiss])."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memaudit.common import UserError
from memaudit.index import TrainingIndex, import_clip_retrieval


def _write_folder(root, parts, dim=16, seed=0):
    """parts: rows per part. Row 2 of part 1 duplicates row 0 of part 0."""
    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    allv = []
    for n, rows in enumerate(parts):
        v = rng.normal(size=(rows, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        v = v.astype(np.float16)
        if n == 1:
            v[2] = allv[0][0]
        allv.append(v)
        np.save(root / "img_emb" / f"img_emb_{n}.npy", v)
        pq.write_table(pa.table({
            "image_path": [f"part{n}/{i:05d}.jpg" for i in range(rows)],
            "caption": [f"caption {n}-{i}" for i in range(rows)],
            "url": [f"https://example.org/{n}/{i}.jpg" for i in range(rows)],
        }), root / "metadata" / f"metadata_{n}.parquet")
    return np.concatenate(allv)


def test_import_rebuild_with_dedup(tmp_path, monkeypatch):
    src = tmp_path / "cr"
    vecs = _write_folder(src, [5, 4])
    out = import_clip_retrieval(src, tmp_path / "idx", clip_model="ViT-B-32",
                                clip_pretrained="laion2b_s34b_b79k")

    def no_whole_read(*a, **k):
        raise AssertionError("items.parquet read whole")

    with monkeypatch.context() as mp:  # opened with its group table: never read whole
        mp.setattr(pq, "read_table", no_whole_read)
        idx = TrainingIndex.open(out)
        assert idx.group_rows(0).tolist() == [0, 7]
        assert idx.group_counts([0, 1]).tolist() == [2, 1]
        assert idx.representative_rows([0, 7]).tolist() == [0, 8]
    m = idx.manifest
    assert m["embedder"] == {"name": "clip", "config": {"model": "ViT-B-32",
                                                        "pretrained": "laion2b_s34b_b79k"}}
    assert (m["metric"], m["dim"], m["rows"], m["groups"], m["dedup"]) == (
        "ip", 16, 9, 8, "exact-embedding-hash")
    items = idx.items.to_pydict()
    assert items["key"][:2] == ["part0/00000.jpg", "part0/00001.jpg"]
    assert items["caption"][7] == "caption 1-2" and items["url"][7].endswith("/1/2.jpg")
    assert items["group_id"][7] == items["group_id"][0] == 0
    assert items["group_count"][0] == 2 and not items["is_representative"][7]
    assert items["source_row"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    want = vecs.astype(np.float32)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    reps = np.asarray(items["is_representative"])
    np.testing.assert_allclose(idx.group_vectors(), want[reps], atol=1e-6)
    s10, g10 = idx.search(want[:1], 10)  # more than ntotal: faiss pads with -1
    assert g10.shape == (1, 10) and (g10[0, :8] >= 0).all() and (g10[0, 8:] == -1).all()
    s, g = idx.search(want[[3, 7]], 1)
    assert g[:, 0].tolist() == [3, 0]
    np.testing.assert_allclose(s[:, 0], 1.0, atol=1e-5)
    with pytest.raises(UserError, match="already exists"):
        import_clip_retrieval(src, out)


def test_import_reuses_autofaiss_index(tmp_path):
    src = tmp_path / "cr"
    vecs = _write_folder(src, [6, 3]).astype(np.float32)
    (src / "index").mkdir()
    ix = faiss.index_factory(16, "IVF2,Flat", faiss.METRIC_INNER_PRODUCT)
    ix.train(vecs)
    ix.add(vecs)
    faiss.write_index(ix, str(src / "index" / "image.index"))
    (src / "index" / "image.json").write_text(json.dumps({"index_key": "IVF2,Flat",
                                                          "index_param": "nprobe=2"}))
    idx = TrainingIndex.open(import_clip_retrieval(src, tmp_path / "idx"))
    assert idx.manifest["dedup"] == "none" and idx.manifest["factory"] == "IVF2,Flat"
    assert idx.ntotal == idx.nitems == 9
    assert faiss.extract_index_ivf(idx.index).nprobe == 2
    assert idx.items.column("group_count").to_pylist() == [1] * 9
    _, g = idx.search(vecs[[4]], 1)
    assert g[0, 0] == 4
    rebuilt = TrainingIndex.open(import_clip_retrieval(src, tmp_path / "idx2",
                                                       use_existing_index=False))
    assert rebuilt.ntotal == 8 and rebuilt.manifest["factory"] == "Flat"


def test_import_errors_and_cli(tmp_path, capsys):
    from memaudit.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a clip-retrieval folder"):
        import_clip_retrieval(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(UserError, match="inside the input folder"):  # never into the source
        import_clip_retrieval(tmp_path, tmp_path / "o")
    src = tmp_path / "cr"
    _write_folder(src, [3])
    pq.write_table(pa.table({"image_path": ["a", "b"]}), src / "metadata" / "metadata_0.parquet")
    with pytest.raises(SystemExit) as e:
        main(["index", "import-clip-retrieval", str(src), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "has 2 rows but" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
