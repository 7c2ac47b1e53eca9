"""The audit database: schema creation, versioning, transactions, writers and views."""

from __future__ import annotations

import json

import duckdb
import pytest

from memaudit.common import UserError
from memaudit.store import SCHEMA_VERSION, AuditStore


def _run(store: AuditStore) -> int:
    return store.add_run(model="canary", model_hash="m" * 8, index_path="/idx",
                         index_hash="i" * 8, plan={"a": 1}, plan_hash="h",
                         settings={"steps": 4}, versions={"torch": "x"}, device="cpu",
                         seeds=[0, 1])


def _fill(store: AuditStore) -> int:
    """Two methods x one prompt x two seeds, one nL2-like criterion (lower = more similar)."""
    with store.transaction():
        run = _run(store)
        pid = store.upsert_prompt("a <b>", source="t.txt", label="trigger")
        # cfg: scores 1.0 (copy), 2.0; amg: 1.5 (copy only calibrated at 1.6), 3.0
        for method, scores, calls in (("cfg", (1.0, 2.0), 10.0), ("amg", (1.5, 3.0), 15.0)):
            for seed, s in enumerate(scores):
                gid = store.add_generation(run_id=run, prompt_id=pid, method=method, seed=seed,
                                           image_path=f"img/{method}-{seed}.png",
                                           wall_seconds=calls / 10, unet_calls=calls,
                                           alignment=float(seed == 0))
                store.add_match(generation_id=gid, criterion="nl2", score=s,
                                higher_is_more_similar=False, is_copy=s < 1.4,
                                is_copy_calibrated=s < 1.6, threshold=1.4,
                                calibrated_threshold=1.6, neighbour_row=3, neighbour_key="k3",
                                neighbour_caption="cap", dup_count=64)
    return run


def test_schema_created_and_versioned(tmp_path):
    db = tmp_path / "audit.duckdb"
    with AuditStore(db) as s:
        assert s.schema_version == SCHEMA_VERSION
        assert s.count("runs") == 0
    # reopen is fine
    with AuditStore(db, read_only=True) as s:
        assert s.schema_version == SCHEMA_VERSION
    # an older schema is refused with a clear one-line message
    con = duckdb.connect(str(db))
    con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(UserError, match="older audit schema .version 0"):
        AuditStore(db)


def test_not_an_audit_db_refused(tmp_path):
    db = tmp_path / "other.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE x (a INT)")
    con.close()
    with pytest.raises(UserError, match="not a memaudit audit database"):
        AuditStore(db)
    with pytest.raises(UserError, match="not found"):
        AuditStore(tmp_path / "missing.duckdb", read_only=True)


def test_transaction_rolls_back(tmp_path):
    with AuditStore(tmp_path / "a.duckdb") as s:
        with pytest.raises(RuntimeError):
            with s.transaction():
                _run(s)
                s.upsert_prompt("p")
                raise RuntimeError("killed")
        assert s.count("runs") == 0 and s.count("prompts") == 0


def test_prompt_upsert_merges_sources(tmp_path):
    with AuditStore(tmp_path / "a.duckdb") as s, s.transaction():
        a = s.upsert_prompt("x'); DROP TABLE runs; --", source="one.txt")
        b = s.upsert_prompt("x'); DROP TABLE runs; --", source="two.txt", label="trigger")
        assert a == b
        row = s.query("SELECT * FROM prompts")[0]
        assert json.loads(row["sources_json"]) == ["one.txt", "two.txt"]
        assert row["label"] == "trigger"
        assert s.count("runs") == 0  # parameterised: the table still exists


def test_views_hand_computed(tmp_path):
    with AuditStore(tmp_path / "a.duckdb") as s:
        run = _fill(s)
        rows = {r["method"]: r for r in s.query(
            "SELECT * FROM method_summary WHERE run_id = ? ORDER BY method", [run])}
        cfg, amg = rows["cfg"], rows["amg"]
        assert cfg["n"] == 2 and cfg["copy_rate_fixed"] == 0.5
        assert cfg["copy_rate_calibrated"] == 0.5
        assert amg["copy_rate_fixed"] == 0.0 and amg["copy_rate_calibrated"] == 0.5
        # similarity = -nL2; p95 by linear interpolation between -2.0 and -1.0
        assert cfg["max_similarity"] == -1.0
        assert cfg["p95_similarity"] == pytest.approx(-2.0 + 0.95 * 1.0)
        assert amg["unet_ratio_to_cfg"] == pytest.approx(1.5)
        assert amg["wall_ratio_to_cfg"] == pytest.approx(1.5)
        assert cfg["alignment"] == 0.5
        pm = s.query("SELECT * FROM prompt_method WHERE method = 'cfg'")[0]
        assert pm["prompt"] == "a <b>" and pm["copies_fixed"] == 1
        assert pm["best_score"] == 1.0 and pm["top_neighbour_key"] == "k3"


def test_quality_rows_and_views(tmp_path):
    """quality rows beside cfg's: FD as a ratio, KID as a difference; CLIP score averaged and
    compared with cfg's; a second feature space is matched to cfg's row in that space."""
    with AuditStore(tmp_path / "a.duckdb") as s:
        run = _fill(s)
        with s.transaction():
            for method, space, kid, fd in (("cfg", "digits", 0.02, 4.0),
                                           ("amg", "digits", 0.05, 5.0),
                                           ("cfg", "pixels", 0.10, 20.0),
                                           ("amg", "pixels", 0.08, 18.0)):
                s.add_quality(run_id=run, method=method, features=space, dim=10, n=2,
                              n_reference=7, reference_seed=0, kid=kid, kid_std=0.01,
                              kid_subsets=100, kid_subset_size=2, fd=fd)
            s.con.execute("UPDATE generations SET clip_score = CASE method WHEN 'cfg' THEN 20 "
                          "ELSE 15 + seed END")
        q = {(r["method"], r["features"]): r for r in s.query("SELECT * FROM method_quality")}
        assert q[("amg", "digits")]["fd_ratio_to_cfg"] == pytest.approx(1.25)
        assert q[("amg", "digits")]["kid_minus_cfg"] == pytest.approx(0.03)
        assert q[("amg", "pixels")]["fd_ratio_to_cfg"] == pytest.approx(0.9)
        assert q[("amg", "pixels")]["cfg_kid"] == 0.10
        assert q[("cfg", "digits")]["fd_ratio_to_cfg"] == 1.0
        cost = {r["method"]: r for r in s.query("SELECT * FROM method_summary")}
        assert cost["amg"]["clip_score"] == 15.5
        assert cost["amg"]["clip_score_ratio_to_cfg"] == pytest.approx(15.5 / 20)
        assert cost["amg"]["alignment_ratio_to_cfg"] == pytest.approx(1.0)
        assert s.count("quality") == 4
        with pytest.raises(duckdb.ConstraintException), s.transaction():
            s.add_quality(run_id=run, method="cfg", features="digits", dim=10, n=2,
                          n_reference=7, reference_seed=0, kid=None, kid_std=None,
                          kid_subsets=None, kid_subset_size=None, fd=None)


def test_unique_generation(tmp_path):
    with AuditStore(tmp_path / "a.duckdb") as s:
        run = _fill(s)
        with pytest.raises(duckdb.ConstraintException), s.transaction():
            s.add_generation(run_id=run, prompt_id=1, method="cfg", seed=0, image_path="x")
        assert s.count("generations") == 4


def test_steps_trace_columns(tmp_path):
    import torch

    with AuditStore(tmp_path / "a.duckdb") as s, s.transaction():
        trace = [{"t": 999, "u": 0.999, "guidance_norm": torch.tensor([1.0, 2.0]),
                  "sigma_t": torch.tensor([0.1, 0.2]), "lambda": 0.3,
                  "active": [["spe"], []], "s": torch.tensor([0.0, 1.0])},
                 {"t": 500, "u": 0.5, "guidance_norm": torch.tensor([3.0, 4.0])}]
        assert s.add_steps([7, 8], trace) == 4
        rows = s.query("SELECT * FROM steps ORDER BY step, generation_id")
        assert [r["guidance_norm"] for r in rows] == [1.0, 2.0, 3.0, 4.0]
        assert rows[1]["sigma_t"] == pytest.approx(0.2) and rows[1]["lambda_t"] == 0.3
        assert json.loads(rows[0]["active_json"]) == ["spe"]
        assert json.loads(rows[1]["extra_json"]) == {"s": 1.0}
        assert rows[2]["sigma_t"] is None and rows[3]["t"] == 500
