"""Multi-node behaviour on one machine (issue 20): a Ray cluster of a head and two worker
nodes in one process tree (`ray.cluster_utils.Cluster`, each node with its own CPUs and a
custom resource), the head without CPUs so that every actor runs on a worker node.

- An index build and an audit over the cluster: both worker nodes do work (the engine
  records the node of every item), then one worker node is removed part-way; the job ends
  on the remaining node with results equal to the local engine's, nothing duplicated or lost
  in the database.
- A build whose driver dies (a subprocess joining the cluster by address) resumes from its
  shards: only the unfinished shards are computed again.

Each work item is slowed by 0.4 s (a wrapper around the real worker) so that the node is
removed while items are still in flight.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from audit_fixtures import make_tiny_canary, make_training_parquet, write_plan

from memaudit.index import TrainingIndex, build_index
from memaudit.index.build import EXIT_AFTER_SHARD_ENV
from memaudit.store import AuditStore

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from memaudit.engine.ray_engine import RayEngine  # noqa: E402

NODE = {"num_cpus": 2, "object_store_memory": 80 * 2**20}


@pytest.fixture(scope="module")
def cluster():
    # Ray starts its workers at niceness 15; on a busy CI machine they would then wait
    # behind everything else (the engine bench does the same)
    saved = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = "0"
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 80 * 2**20, "include_dashboard": False})
    c.add_node(resources={"node_a": 1}, **NODE)
    c.add_node(resources={"node_b": 1}, **NODE)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level=logging.WARNING)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_worker_niceness", None)
        else:
            os.environ["RAY_worker_niceness"] = saved


def _workers(c) -> list:
    return [n for n in c.worker_nodes]


def _lose_a_node_part_way(monkeypatch, c, after: int, delay: float = 0.4) -> dict:
    """Wrap RayEngine.map: every item takes `delay` s more; after `after` results, once every
    worker node has returned one (an actor can start seconds after the other on a loaded
    machine), one worker node is removed (and a fresh one added for the next test once the
    map ends)."""
    real_map = RayEngine.map
    state: dict = {"before": None, "removed": None}

    class Slow:  # defined here: pickled by value to the actors
        def __init__(self, factory, delay):
            self.factory, self.delay = factory, delay

        def __call__(self, device):
            import time

            work = self.factory(device)

            def run(item):
                time.sleep(self.delay)
                return work(item)

            return run

    def spy(self, factory, items, *a, **kw):
        n = 0
        for r in real_map(self, Slow(factory, delay), items, *a, **kw):
            n += 1
            if n >= after and state["removed"] is None \
                    and len(self.nodes_used) == len(_workers(c)):
                state["before"] = dict(self.nodes_used)
                victim = _workers(c)[-1]
                state["removed"] = victim.node_id
                c.remove_node(victim)
            yield r
        state["after"] = dict(self.nodes_used)

    monkeypatch.setattr(RayEngine, "map", spy)
    return state


def _replace_lost_node(c) -> None:
    c.add_node(resources={"node_c": 1}, **NODE)
    c.wait_for_nodes()


def _pixel_data(tmp_path):
    from memaudit.index import bench_scale

    return bench_scale.write_synthetic(tmp_path / "data", 600, file_rows=250, row_group=50)


def test_build_spread_over_two_nodes_survives_losing_one(tmp_path, cluster, monkeypatch):
    data = tmp_path / "data"
    _pixel_data(tmp_path)
    args = dict(embedder_opts={"size": 4}, shard_rows=50, batch_size=64, calibrate=False,
                factory="IVF4,Flat", faiss_params="nprobe=4")
    ref = build_index(data, "pixels", tmp_path / "ref", **args)
    nodes = {n.node_id for n in _workers(cluster)}
    state = _lose_a_node_part_way(monkeypatch, cluster, after=4)
    eng = RayEngine(actors=2, device="cpu")
    try:
        out = build_index(data, "pixels", tmp_path / "idx", engine=eng, **args)
    finally:
        monkeypatch.undo()
        _replace_lost_node(cluster)
    assert set(state["before"]) == nodes  # both worker nodes had done work
    assert state["removed"] in nodes
    assert sum(state["after"].values()) == 12  # every shard once, from the ordered stream
    survivor = (nodes - {state["removed"]}).pop()
    assert state["after"][survivor] > state["before"][survivor]  # it did the rest
    got, want = TrainingIndex.open(out), TrainingIndex.open(ref)
    assert got.items.equals(want.items)
    np.testing.assert_allclose(got.group_vectors(), want.group_vectors(), atol=1e-6)
    assert got.manifest["groups"] == want.manifest["groups"]
    assert got.manifest["engine"]["nodes"] == 2
    assert not (tmp_path / "idx.partial").exists()


def test_build_whose_driver_dies_resumes_from_its_shards(tmp_path, cluster, monkeypatch):
    data = tmp_path / "data"
    _pixel_data(tmp_path)
    args = ["--embedder", "pixels", "--size", "4", "--shard-rows", "100", "--no-calibrate"]
    ref = build_index(data, "pixels", tmp_path / "ref", embedder_opts={"size": 4},
                      shard_rows=100, calibrate=False)
    out = tmp_path / "idx"
    env = {**os.environ, EXIT_AFTER_SHARD_ENV: "2", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "memaudit", "--quiet", "index", "build",
                        str(data), "--out", str(out), *args, "--engine", "ray",
                        "--address", cluster.address, "--actors", "2"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 75, p.stderr
    done = sorted(f.name for f in (tmp_path / "idx.partial").glob("shard_*.json"))
    assert "shard_000002.json" in done
    sent: list[list[int]] = []
    real_map = RayEngine.map

    def spy(self, factory, items, *a, **kw):
        sent.append(list(items))
        return real_map(self, factory, items, *a, **kw)

    monkeypatch.setattr(RayEngine, "map", spy)
    build_index(data, "pixels", out, embedder_opts={"size": 4}, shard_rows=100,
                calibrate=False, engine=RayEngine(actors=2, device="cpu"))
    assert sent == [[k for k in range(6) if f"shard_{k:06d}.json" not in done]]
    assert TrainingIndex.open(out).items.equals(TrainingIndex.open(ref).items)


def _db_rows(db):
    with AuditStore(db, read_only=True) as s:
        gens = s.con.execute(
            "SELECT g.id, p.text, g.method, g.seed, g.image_path, m.criterion, "
            "m.neighbour_key, m.is_copy, round(m.score, 4) FROM generations g "
            "JOIN prompts p ON p.id = g.prompt_id JOIN matches m ON m.generation_id = g.id "
            "ORDER BY g.id, m.criterion").fetchall()
        units = s.con.execute("SELECT unit FROM units ORDER BY unit").fetchall()
        counts = {t: s.count(t) for t in ("generations", "matches", "steps", "screens",
                                          "units", "runs")}
    return gens, units, counts


def test_audit_spread_over_two_nodes_survives_losing_one(tmp_path, cluster, monkeypatch):
    from memaudit.audit import load_plan, run_audit

    src = make_training_parquet(tmp_path / "train.parquet")
    canary = make_tiny_canary(tmp_path / "canary")
    kw = dict(methods=("cfg",), seeds=(0, 1), criteria=("nl2",), batch_size=1, screen=False,
              extra="quality = false")
    ref_dir, work = tmp_path / "ref", tmp_path / "work"
    ref_dir.mkdir()
    work.mkdir()
    ref = run_audit(load_plan(write_plan(ref_dir, src, str(canary), **kw)), device="cpu")
    plan = load_plan(write_plan(work, src, str(canary), **kw))
    # the reference run's index, so that the only Ray map below is the audit's
    shutil.copytree(ref_dir / "out" / "index", plan.index)
    nodes = {n.node_id for n in _workers(cluster)}
    state = _lose_a_node_part_way(monkeypatch, cluster, after=3, delay=0.3)
    try:
        res = run_audit(plan, device="cpu", engine=RayEngine(actors=2, device="cpu"))
    finally:
        monkeypatch.undo()
        _replace_lost_node(cluster)
    assert set(state["before"]) == nodes and state["removed"] in nodes
    assert res.units_done == 8  # 4 prompts x 2 seeds, one image per unit
    got, want = _db_rows(res.db_path), _db_rows(ref.db_path)
    assert got[2] == want[2] and got[2]["generations"] == 8 and got[2]["runs"] == 1
    assert got[1] == want[1]  # every unit committed once
    assert [r[:-1] for r in got[0]] == [r[:-1] for r in want[0]]
    assert [r[-1] for r in got[0]] == pytest.approx([r[-1] for r in want[0]], abs=2e-4)
    for r in got[0]:
        assert (res.db_path.parent / r[4]).is_file()
