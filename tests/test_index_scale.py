"""Bounded memory at every stage of an index (issue 20): out-of-core duplicate grouping equal
to the np.unique path, faiss filled in pieces equal to a fill in memory, items and groups
read by row id, memory limits refused or honoured, and the scale benchmark's smoke size."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memaudit.common import UserError
from memaudit.engine.memory import parse_memory, rss_bytes, stage_budgets
from memaudit.index import TrainingIndex, build_index
from memaudit.index.build import make_faiss_index
from memaudit.index.fill import (
    IVFDATA_FILE,
    IndexFiller,
    _FlatFile,
    check_memory_fill,
    fill_mode,
)
from memaudit.index.grouping import group_duplicates, group_shards
from memaudit.index.items import GroupTable, ItemReader, write_group_table


def _dup_hashes(n: int, ngroups: int, seed: int = 0) -> np.ndarray:
    """[n, 16] digests drawn from `ngroups` values: many groups of every size, members
    spread over the whole range (so over every shard)."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, size=(ngroups, 16), dtype=np.uint8)
    # a skewed draw: a few large groups, many pairs, singletons
    pick = np.minimum(rng.zipf(1.3, size=n) - 1, ngroups - 1)
    pick = np.where(rng.random(n) < 0.5, rng.integers(0, ngroups, n), pick)
    return pool[pick]


def test_duckdb_grouping_equals_np_unique(tmp_path):
    hashes = _dup_hashes(30_000, 12_000)
    bounds = [0, 1, 4000, 4000, 9000, 17_500, 30_000]  # uneven shards, one empty
    files = []
    for i in range(len(bounds) - 1):
        f = tmp_path / f"shard_{i}.hash.npy"
        np.save(f, hashes[bounds[i]:bounds[i + 1]])
        files.append(f)
    res = group_shards(files, tmp_path / "grouping", memory_limit=64 * 2**20, threads=2)
    groups, rep, counts = group_duplicates(hashes)
    assert res["rows"] == 30_000 and res["groups"] == len(counts)
    assert counts.max() > 100 and (counts == 2).sum() > 100 and (counts == 1).sum() > 100
    rows = pq.read_table(tmp_path / "grouping" / "rows.parquet")
    assert rows.column("row_id").to_pylist() == list(range(30_000))
    np.testing.assert_array_equal(rows.column("group_id").to_numpy(), groups)
    np.testing.assert_array_equal(rows.column("group_count").to_numpy(), counts[groups])
    np.testing.assert_array_equal(
        rows.column("is_representative").to_numpy(zero_copy_only=False), rep)
    g = pq.read_table(tmp_path / "grouping" / "groups.parquet")
    np.testing.assert_array_equal(g.column("group_count").to_numpy(), counts)
    np.testing.assert_array_equal(g.column("first_row").to_numpy(), np.nonzero(rep)[0])
    # the group table written from them == the one computed in memory from the columns
    write_group_table(tmp_path / "grouping" / "groups.parquet",
                      tmp_path / "grouping" / "members.parquet", tmp_path, len(counts),
                      batch_rows=1000)
    disk = GroupTable.open(tmp_path, len(counts), 30_000)
    mem = GroupTable.from_columns(groups, rep, len(counts))
    np.testing.assert_array_equal(np.asarray(disk.table), mem.table)
    np.testing.assert_array_equal(np.asarray(disk.members), mem.members)
    for gid in (0, int(np.argmax(counts)), int(np.nonzero(counts == 1)[0][0])):
        np.testing.assert_array_equal(disk.rows_of(gid), np.nonzero(groups == gid)[0])
    # a finished grouping is reused (a finalisation killed after it does not redo it)
    (tmp_path / "grouping" / "rows.parquet").rename(tmp_path / "moved.parquet")
    assert group_shards(files, tmp_path / "grouping", 64 * 2**20) == res


def _ivf_blocks_vs_memory(factory: str, metric, tmp_path, block_vectors: int):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    trained = make_faiss_index(16, factory, "l2")
    trained.train(x[:2000])
    assert fill_mode(trained) == "ivf"
    per = faiss.extract_index_ivf(trained).code_size + 8
    (tmp_path / "staging").mkdir()
    filler = IndexFiller(faiss.clone_index(trained), tmp_path / "staging", tmp_path / "work",
                         block_bytes=block_vectors * per)
    for a, b in ((0, 700), (700, 700), (700, 1900), (1900, 3000)):  # shards, one empty
        filler.add(x[a:b])
    assert len(filler.blocks) >= 3
    filler.finish()
    assert (tmp_path / "staging" / IVFDATA_FILE).is_file() and not (tmp_path / "work").exists()
    ref = faiss.clone_index(trained)
    ref.add(x)
    # byte for byte what faiss' own on-disk merge makes of the index filled in memory
    from faiss.contrib.ondisk import merge_ondisk

    faiss.write_index(ref, str(tmp_path / "ref.index"))
    (tmp_path / "faiss").mkdir()
    merge_ondisk(faiss.clone_index(trained), [str(tmp_path / "ref.index")],
                 str(tmp_path / "faiss" / IVFDATA_FILE))
    assert (tmp_path / "faiss" / IVFDATA_FILE).read_bytes() == \
        (tmp_path / "staging" / IVFDATA_FILE).read_bytes()
    from memaudit.index.fill import read_index

    got = read_index(tmp_path / "staging" / "index.faiss")
    assert got.ntotal == 3000
    for index in (ref, got):
        faiss.ParameterSpace().set_index_parameters(index, "nprobe=4")
    q = x[::37] + 0.01
    d0, i0 = ref.search(q, 10)
    d1, i1 = got.search(q, 10)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(d0, d1)
    a, b = faiss.extract_index_ivf(ref).invlists, faiss.extract_index_ivf(got).invlists
    for lst in range(a.nlist):  # the same entries in the same order, list by list
        n = a.list_size(lst)
        assert n == b.list_size(lst)
        assert faiss.rev_swig_ptr(a.get_ids(lst), n).tolist() == \
            faiss.rev_swig_ptr(b.get_ids(lst), n).tolist()


@pytest.mark.parametrize("factory", ["IVF8,PQ4", "IVF8,Flat", "PCA8,IVF8,PQ4", "IVF256,Flat"])
def test_ivf_filled_in_blocks_equals_in_memory(tmp_path, factory):
    _ivf_blocks_vs_memory(factory, faiss.METRIC_L2, tmp_path, block_vectors=500)


def test_flat_file_is_faiss_serialisation(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    for metric in (faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT):
        f = _FlatFile(tmp_path / "flat.faiss", 7, metric)
        f.add(x[:20])
        f.add(x[20:20])
        f.add(x[20:])
        f.finish()
        ref = faiss.IndexFlat(7, metric)
        ref.add(x)
        assert (tmp_path / "flat.faiss").read_bytes() == faiss.serialize_index(ref).tobytes()
    assert fill_mode(faiss.index_factory(4, "HNSW8,Flat")) == "memory"


def test_build_ivf_index_opens_searches_and_reads_items_by_row(tmp_path, monkeypatch):
    """A real build (pixels, IVF-PQ, several IVF blocks): searches equal a fill in memory,
    and opening it never reads items.parquet whole."""
    from memaudit.index import bench_scale

    data = tmp_path / "data"
    bench_scale.write_synthetic(data, 1200, file_rows=500, row_group=100)
    monkeypatch.setattr("memaudit.index.items.ITEM_ROW_GROUP", 256)
    monkeypatch.setattr("memaudit.index.finalize.ITEM_ROW_GROUP", 256)
    monkeypatch.setattr("memaudit.index.finalize.stage_budgets", lambda limit: {
        **stage_budgets(limit), "fill_block": 300 * (8 + 8)})  # 300 vectors per block
    out = build_index(data, "pixels", tmp_path / "idx", factory="IVF8,PQ8",
                      embedder_opts={"size": 4}, shard_rows=250, batch_size=128,
                      calibrate=False, faiss_params="nprobe=8")
    assert sorted(p.name for p in out.iterdir()) == [
        "groups.npy", "index.faiss", IVFDATA_FILE, "items.parquet", "manifest.json",
        "members.npy", "vectors.npy"]
    meta = pq.ParquetFile(out / "items.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [256] * 4 + [176]
    want = bench_scale.known_groups(1200, 1200)

    def no_whole_read(*a, **k):
        raise AssertionError("items.parquet read whole")

    monkeypatch.setattr(pq, "read_table", no_whole_read)
    idx = TrainingIndex.open(out)
    assert idx.ntotal == len(want) and idx.nitems == 1200
    np.testing.assert_array_equal(idx.group_counts(np.arange(idx.ntotal)), want)
    # item lookups by row id, across row groups, in any order
    rows = [1199, 3, 700, 3, 256, 255]
    keys = idx.keys(rows)
    assert keys == [f"r{r:09d}" for r in rows]
    assert idx.item(700)["key"] == "r000000700"
    big = int(np.argmax(want))
    members = idx.group_rows(big)
    assert len(members) == want[big] and idx.representative_rows([big])[0] == members[0]
    np.testing.assert_array_equal(idx.group_of_rows(members), [big] * len(members))
    img = bench_scale.image_of_rows(members, 1200)
    assert len(set(img.tolist())) == 1
    assert idx.group_caption(big).startswith(f"image {img[0]} take ")
    with pytest.raises(IndexError):
        idx.item(1200)
    # search equals the same trained index filled in memory
    x = np.load(out / "vectors.npy")
    ref = faiss.read_index(str(out / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    ivf = faiss.extract_index_ivf(ref)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    ref.ntotal = ivf.ntotal = 0
    ref.add(x)
    faiss.ParameterSpace().set_index_parameters(ref, "nprobe=8")
    q = x[::11] + 0.003
    np.testing.assert_array_equal(ref.search(q, 5)[1], idx.index.search(q, 5)[1])
    np.testing.assert_array_equal(ref.search(q, 5)[0], idx.index.search(q, 5)[0])


def test_item_reader_matches_table_and_caches_few_groups(tmp_path):
    t = pa.table({"row_id": np.arange(1000), "key": [f"k{i}" for i in range(1000)]})
    pq.write_table(t, tmp_path / "items.parquet", row_group_size=64)
    r = ItemReader(tmp_path / "items.parquet", cache_groups=2)
    rows = np.random.default_rng(0).integers(0, 1000, 300)
    assert r.take(rows).equals(t.take(pa.array(rows)))
    assert r.take(rows, ["key"]).column(0).to_pylist() == [f"k{i}" for i in rows]
    assert len(r._cache) == 2
    assert r.take([]).num_rows == 0
    assert ItemReader(t).take([5, 1]).column("key").to_pylist() == ["k5", "k1"]
    with pytest.raises(IndexError):
        r.take([1000])


def test_old_index_without_group_table_still_opens(tmp_path, monkeypatch):
    from memaudit.index import bench_scale

    bench_scale.write_synthetic(tmp_path / "d", 300, file_rows=300, row_group=100)
    out = build_index(tmp_path / "d", "pixels", tmp_path / "idx", embedder_opts={"size": 4},
                      calibrate=False)
    new = TrainingIndex.open(out)
    (out / "groups.npy").unlink()
    (out / "members.npy").unlink()
    old = TrainingIndex.open(out)
    g = np.arange(new.ntotal)
    np.testing.assert_array_equal(old.representative_rows(g), new.representative_rows(g))
    np.testing.assert_array_equal(old.group_counts(g), new.group_counts(g))
    big = int(np.argmax(new.group_counts(g)))
    np.testing.assert_array_equal(old.group_rows(big), new.group_rows(big))


def test_memory_limits_parsed_and_refused(tmp_path):
    from memaudit.index import bench_scale

    assert parse_memory("4GB") == 4 * 10**9
    assert parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert parse_memory(2**30) == 2**30 and parse_memory(None) is None
    for bad in ("lots", "4XB", "1MB", True):
        with pytest.raises(UserError):
            parse_memory(bad)
    b = stage_budgets(4 * 2**30, used=2**30)
    assert b["grouping"] == int(3 * 2**30) * 6 // 10 and b["fill_block"] == 3 * 2**30 // 4
    with pytest.raises(UserError, match="already uses"):
        stage_budgets(2**30, used=2**30)
    with pytest.raises(UserError, match="filled in memory"):
        check_memory_fill(faiss.index_factory(64, "HNSW32,Flat"), "HNSW32,Flat", 10**8, 2**30)
    check_memory_fill(faiss.index_factory(64, "IVF8,PQ8"), "IVF8,PQ8", 10**10, 2**30)  # disk
    # a setting that cannot fit an explicit limit fails before any work, naming it
    limit = (rss_bytes() or 0) + 512 * 2**20
    with pytest.raises(UserError, match="--shard-rows"):
        build_index(bench_scale.write_synthetic(tmp_path / "d", 10)[0], "pixels",
                    tmp_path / "b", embedder_opts={"size": 512},
                    shard_rows=100_000, memory_limit=limit, calibrate=False)
    with pytest.raises(UserError, match="train_sample"):
        build_index(tmp_path / "d", "pixels", tmp_path / "b", embedder_opts={"size": 2048},
                    factory="IVF4,Flat", train_sample=10**6, shard_rows=1,
                    memory_limit=limit, calibrate=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()
    from memaudit.index.recipe import index_options

    with pytest.raises(UserError, match="memory_limit"):
        index_options({"data": "x", "memory_limit": "big"}, "recipe")


def test_bench_scale_smoke(tmp_path, capsys):
    from memaudit.index import bench_scale

    res = bench_scale.main(["--rows", "3000", "--subset", "1000", "--file-rows", "1500",
                            "--factory", "IVF8,PQ8", "--shard-rows", "500", "--queries", "50",
                            "--memory-limit", "3GB", "--refinalize-limit", "2GB",
                            "--no-calibrate", "--skip-audit", "--work", str(tmp_path / "w")])
    cmp = res["compare_subset"]
    assert cmp["groups_equal_np_unique"] and cmp["search_ids_equal"]
    assert cmp["search_distances_equal"] and cmp["rows"] == 1000
    assert res["known_structure"]["group_counts_equal"]
    assert res["known_structure"]["groups"] == res["known_structure"]["expected_groups"]
    builds = res["builds"]
    assert builds["all"]["under_limit"] and builds["refinalize_all"]["items_identical"]
    assert builds["refinalize_sub"]["items_identical"]
    assert set(res["peak_growth"]) >= {"build", "refinalize"}
    assert {"shards", "grouping", "training", "filling"} <= set(builds["all"]["stages"])
    assert not (tmp_path / "w").exists()  # its data is cleaned up
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    assert any(d.get("bench") == "peak growth, subset -> all" for d in lines)


def test_plan_memory_limit_checked_and_not_in_the_hash(tmp_path):
    from audit_fixtures import make_training_parquet, write_plan

    from memaudit.audit import load_plan

    src = make_training_parquet(tmp_path / "train.parquet")
    base = load_plan(write_plan(tmp_path, src, "canary"))
    limited = load_plan(write_plan(tmp_path, src, "canary", extra='memory_limit = "4GB"'))
    assert limited.memory_limit == "4GB" and base.memory_limit is None
    assert limited.hash() == base.hash()  # where it runs, not what it computes: resumes
    with pytest.raises(UserError, match="memory_limit"):
        load_plan(write_plan(tmp_path, src, "canary", extra='memory_limit = "lots"'))


def test_a_shard_reads_only_its_row_groups(tmp_path, monkeypatch):
    """Read tasks by row group: a shard in the middle of a large file reads the row groups
    overlapping its rows, and only its rows come out, with their file and global numbers."""
    from memaudit.data import parquet as pqr
    from memaudit.index import bench_scale

    files = bench_scale.write_synthetic(tmp_path / "d", 100, file_rows=60, row_group=10)
    read: list[tuple[str, list[int]]] = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, row_groups=None, **kw):
        read.append((self.metadata.num_rows, list(row_groups)))
        return real(self, *a, row_groups=row_groups, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    rows = [r for b in pqr.iter_training_batches(tmp_path / "d", batch_rows=4, start_row=35,
                                                 stop_row=75)
            for r in b]
    assert [r.row for r in rows] == list(range(35, 75))
    assert [r.key for r in rows] == [f"r{i:09d}" for i in range(35, 75)]
    assert [(r.source_file, r.source_row) for r in rows[-16:-14]] == [
        (str(files[0]), 59), (str(files[1]), 0)]
    assert read == [(60, [3, 4, 5]), (40, [0, 1])]


def _edit_column(t: pa.Table, name: str, edit) -> pa.Table:
    values = t.column(name).to_pylist()
    edit(values)
    return t.set_column(t.column_names.index(name), name,
                        pa.array(values, t.schema.field(name).type))


def test_item_list_checked_a_row_group_at_a_time(tmp_path, monkeypatch):
    """TrainingIndex.open checks items.parquet one row group at a time, never whole: an item
    list of several row groups opens; a null, a group outside the index, a missing or extra
    representative or a row id off its position in the last row group is one line."""
    import shutil

    from memaudit.index import bench_scale

    bench_scale.write_synthetic(tmp_path / "d", 300, file_rows=300, row_group=100)
    out = build_index(tmp_path / "d", "pixels", tmp_path / "idx", embedder_opts={"size": 4},
                      calibrate=False)
    items = pq.read_table(out / "items.parquet")
    ngroups = TrainingIndex.open(out).ntotal
    rep = items.column("is_representative").to_pylist()
    last_rep = max(i for i in range(300) if rep[i])
    last_dup = max(i for i in range(300) if not rep[i])
    assert last_rep >= 256 and last_dup >= 256  # both in the last row group of 64

    def swap(v):
        v[-1], v[-2] = v[-2], v[-1]

    cases = {
        "ok": (items, None),
        "null": (_edit_column(items, "group_id", lambda v: v.__setitem__(-1, None)),
                 "column group_id has nulls"),
        "outside": (_edit_column(items, "group_id", lambda v: v.__setitem__(-1, ngroups)),
                    f"names groups outside index.faiss \\(0..{ngroups - 1}\\)"),
        "no-rep": (_edit_column(items, "is_representative",
                                lambda v: v.__setitem__(last_rep, False)),
                   f"{ngroups - 1} of index.faiss's {ngroups} groups have a representative"),
        "two-reps": (_edit_column(items, "is_representative",
                                  lambda v: v.__setitem__(last_dup, True)),
                     f"\\({ngroups + 1} representatives"),
        "row-ids": (_edit_column(items, "row_id", swap), "row_id is not each row's position "
                    "from row 256 on"),
    }
    for name, (table, _) in cases.items():
        shutil.copytree(out, tmp_path / name)
        pq.write_table(table, tmp_path / name / "items.parquet", row_group_size=64)
    read = []
    real = pq.ParquetFile.read_row_group

    def counted(self, i, *a, **k):
        read.append(i)
        return real(self, i, *a, **k)

    def no_whole_read(*a, **k):
        raise AssertionError("items.parquet read whole")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    monkeypatch.setattr(pq, "read_table", no_whole_read)
    idx = TrainingIndex.open(tmp_path / "ok")
    assert read == [0, 1, 2, 3, 4] and idx.nitems == 300  # each row group once, in order
    for name, (_, message) in cases.items():
        if message is not None:
            with pytest.raises(UserError, match=message):
                TrainingIndex.open(tmp_path / name)


def test_rows_of_keys_by_row_group(tmp_path, monkeypatch):
    """Keys to row ids in one pass over the key column, a row group at a time, stopping once
    every key is found; a repeated key gives its first row, an absent one -1."""
    keys = [f"k{i}" for i in range(1000)]
    keys[900] = "k7"  # repeated: row 7 first
    t = pa.table({"row_id": np.arange(1000), "key": keys})
    pq.write_table(t, tmp_path / "items.parquet", row_group_size=64)
    r = ItemReader(tmp_path / "items.parquet")
    read = []
    real = pq.ParquetFile.read_row_group

    def counted(self, i, *a, **k):
        read.append(i)
        return real(self, i, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    ask = ["k999", "k7", "nope", "", "k64", "k7"]
    want = [999, 7, -1, -1, 64, 7]
    np.testing.assert_array_equal(r.rows_of_keys(ask), want)
    assert read == list(range(16))  # every row group once (two keys are absent)
    read.clear()
    np.testing.assert_array_equal(r.rows_of_keys(["k70", "k3"]), [70, 3])
    assert read == [0, 1]  # stops once both are found
    np.testing.assert_array_equal(ItemReader(t).rows_of_keys(ask), want)
    assert len(r.rows_of_keys([])) == 0
