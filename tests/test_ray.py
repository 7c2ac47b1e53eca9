"""`--engine ray` on a local Ray instance (`ray.init(num_cpus=2)`, one per module): an index
build and an audit give what the local engine gives, and both resume after a kill.

Starting Ray and its actors costs seconds, so the module has two tests, each covering a whole
chain: a local build killed part-way and finished on Ray (equal to an uninterrupted local
build, the finished shards untouched), and an audit driver on Ray killed mid-unit and resumed
on Ray (equal, row for row and id for id, to an uninterrupted local run).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from audit_fixtures import make_tiny_canary, make_training_parquet, write_plan
from index_helpers import digits_rgb, encode, photos, write_parquet

from memaudit.index import TrainingIndex, build_index
from memaudit.index.build import EXIT_AFTER_SHARD_ENV
from memaudit.store import AuditStore

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module; its address lets subprocess drivers join it."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _photo_parquet(path):
    """Real photos at several sizes (aspect-kept SSCD batches have several shapes), one exact
    duplicate pair (chelsea and cat), one byte-identical repeat and three bad rows."""
    ph = photos()
    digits, _ = digits_rgb(3)
    rows = [("astronaut", encode(ph["astronaut"], "JPEG")),
            ("coffee", encode(ph["coffee"][::2, ::2].copy(), "JPEG")),
            ("empty", b""),
            ("chelsea", encode(ph["chelsea"])),
            ("cat", encode(ph["cat"])),
            ("broken", b"\x89PNG\r\n\x1a\n broken"),
            ("rocket", encode(ph["rocket"][:300].copy(), "JPEG")),
            ("astronaut-again", encode(ph["astronaut"], "JPEG")),
            ("digit0", encode(np.kron(digits[0], np.ones((16, 16, 1), np.uint8)))),
            ("none", None),
            ("digit1", encode(np.kron(digits[1], np.ones((12, 20, 1), np.uint8))))]
    return write_parquet(path, [b for _, b in rows], [f"a photo of {k}" for k, _ in rows],
                         keys=[k for k, _ in rows], image_col="jpg", row_group_size=4)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _manifest_without_timings(d):
    m = json.loads((d / "manifest.json").read_text())
    for k in ("created", "build_seconds", "engine"):
        m.pop(k)
    m["calibration"]["settings"].pop("seconds")
    return m


def test_ray_build_resumes_local_partial_and_equals_local(tmp_path, ray_address, monkeypatch):
    from memaudit.cli import main
    from memaudit.engine.ray_engine import RayEngine
    from memaudit.index.bench import small_sscd_like

    data = _photo_parquet(tmp_path / "photos.parquet")
    weights = small_sscd_like(tmp_path / "sscd.torchscript.pt")
    args = dict(batch_size=2, shard_rows=3, embedder_opts={"weights": str(weights),
                                                          "short_edge": 96})
    ref = build_index(data, "sscd", tmp_path / "ref", **args)
    # a local build killed after shard 0, then finished by the Ray engine through the CLI
    out = tmp_path / "idx"
    code = textwrap.dedent(f"""
        from memaudit.index import build_index
        build_index({str(data)!r}, "sscd", {str(out)!r}, **{args!r})
    """)
    env = {**os.environ, EXIT_AFTER_SHARD_ENV: "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 75, r.stderr
    partial = tmp_path / "idx.partial"
    assert len(list(partial.glob("shard_000000*"))) == 4  # emb, hash, items, marker
    sent: list[list[int]] = []
    ray_map = RayEngine.map

    def spy(self, factory, items, *a, **kw):
        sent.append(list(items))
        return ray_map(self, factory, items, *a, **kw)

    monkeypatch.setattr(RayEngine, "map", spy)
    recipe = tmp_path / "photos.toml"
    recipe.write_text(f'data = "{data}"\nembedder = "sscd"\nout = "{out}"\nbatch_size = 2\n'
                      f'shard_rows = 3\nweights = "{weights}"\nshort_edge = 96\n')
    main(["--quiet", "index", "build", str(recipe), "--engine", "ray"])
    assert not partial.exists()
    assert sent == [[1, 2, 3]]  # 11 rows in shards of 3; shard 0 was kept, not recomputed

    got, want = TrainingIndex.open(out), TrainingIndex.open(ref)
    # the same items: order, keys, rows, duplicate groups (chelsea == cat, astronaut twice)
    assert got.items.equals(want.items)
    keys = got.items.column("key").to_pylist()
    g = got.items.column("group_id").to_pylist()
    assert g[keys.index("chelsea")] == g[keys.index("cat")]
    assert g[keys.index("astronaut")] == g[keys.index("astronaut-again")]
    np.testing.assert_allclose(got.group_vectors(), want.group_vectors(), atol=1e-5)
    # the same manifest apart from the engine and timings
    a, b = _manifest_without_timings(out), _manifest_without_timings(ref)
    ca, cb = _flat(a.pop("calibration")), _flat(b.pop("calibration"))
    assert ca.keys() == cb.keys()
    assert ca == {k: pytest.approx(v, abs=1e-6) if isinstance(v, float) else v
                  for k, v in cb.items()}
    assert a == b
    assert a["skipped"]["by_reason"] == {"empty": 2, "undecodable": 1}
    engine = json.loads((out / "manifest.json").read_text())["engine"]
    assert engine["name"] == "ray" and engine["actors"] == 2 and engine["gpus_per_actor"] == 0


def test_ray_audit_killed_mid_unit_resumes_and_equals_local(tmp_path, ray_address):
    from memaudit.audit import load_plan, run_audit

    src = make_training_parquet(tmp_path / "train.parquet")
    canary = make_tiny_canary(tmp_path / "canary")
    kw = dict(methods=("cfg", "rna"), seeds=(0, 1), criteria=("nl2",), batch_size=2)
    ref_dir, work = tmp_path / "ref", tmp_path / "work"
    ref_dir.mkdir()
    work.mkdir()
    ref = run_audit(load_plan(write_plan(ref_dir, src, str(canary), **kw)), device="cpu")
    plan = write_plan(work, src, str(canary), **kw)
    # a driver process joins the module's Ray instance and dies with unit 4 computed on an
    # actor (its images written) but not committed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEMAUDIT_TEST_KILL_BEFORE_COMMIT": "4"}
    p = subprocess.run([sys.executable, "-m", "memaudit", "--quiet", "audit", str(plan),
                        "--device", "cpu", "--engine", "ray", "--address", ray_address],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 4, p.stderr
    with AuditStore(work / "out" / "audit.duckdb", read_only=True) as s:
        assert s.count("units") == 3 and s.count("generations") == 6
    res = run_audit(load_plan(plan), device="cpu", engine="ray")
    assert res.units_done == 11 - 3  # 8 generation units, screening, quality per method
    got, want = _rows(res.db_path), _rows(ref.db_path)
    # ids included: units are committed in unit order whichever engine computed them
    assert got["counts"] == want["counts"] and got["counts"]["generations"] == 16
    assert [r[:-1] for r in got["gens"]] == [r[:-1] for r in want["gens"]]
    assert [r[-1] for r in got["gens"]] == pytest.approx([r[-1] for r in want["gens"]],
                                                         abs=1e-5)
    assert got["screens"][0] == want["screens"][0]
    # quality (computed here from the images the actors wrote) as the local run's
    assert got["counts"]["quality"] == 2
    assert [r[:3] for r in got["quality"]] == [r[:3] for r in want["quality"]]
    assert [x for r in got["quality"] for x in r[3:]] == pytest.approx(
        [x for r in want["quality"] for x in r[3:]], rel=1e-4, abs=1e-6)
    assert got["screens"][1] == pytest.approx(want["screens"][1], abs=1e-4)
    with AuditStore(res.db_path, read_only=True) as s:
        settings = json.loads(s.run()["settings_json"])
    assert settings["engine"]["name"] == "ray"
    for r in got["gens"]:
        assert (res.db_path.parent / r[5]).is_file()


def _rows(db):
    with AuditStore(db, read_only=True) as s:
        gens = s.con.execute(
            "SELECT g.id, m.criterion, p.text, g.method, g.seed, g.image_path, g.final_prompt, "
            "m.neighbour_key, m.is_copy, m.score FROM generations g "
            "JOIN prompts p ON p.id = g.prompt_id JOIN matches m ON m.generation_id = g.id "
            "ORDER BY g.id").fetchall()
        scr = s.con.execute("SELECT prompt_id, flagged, score, threshold FROM screens "
                            "ORDER BY prompt_id").fetchall()
        qual = s.con.execute("SELECT method, features, n, kid, fd FROM quality "
                             "ORDER BY method, features").fetchall()
        counts = {t: s.count(t) for t in ("generations", "matches", "steps", "screens",
                                          "quality", "units", "runs")}
    return {"gens": gens, "counts": counts, "quality": qual,
            "screens": ([r[:2] for r in scr], [x for r in scr for x in r[2:]])}

