"""The audit database: one DuckDB file, one writer, every stage appends in a transaction.

All values go through parameters or registered Arrow tables, never into SQL text: prompts
and captions are untrusted (DESIGN.md "Conventions").
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from memaudit.common import UserError
from memaudit.store.catalog import DUCKDB_CONFIG, catalog, differences, is_empty
from memaudit.store.schema import SCHEMA_VERSION, TABLE_NAMES, TABLES, VIEWS

#: runs.status: running (in progress, or killed: nothing can tell them apart once the
#: writer is gone), finished, failed (an error ended it part-way; marked by the runner)
RUN_STATUSES = ("running", "finished", "failed")

_STEP_KEYS = {
    "t": ("t", "timestep"),
    "u": ("u",),
    "guidance_norm": ("guidance_norm",),  # sampler's ||eps_hat - e_u||; dynamic's d stays extra
    "sigma_t": ("sigma_t", "sigma", "similarity"),
    "lambda_t": ("lambda", "lambda_t", "lam", "threshold"),
    "active_json": ("active", "active_guidances"),
}


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(tzinfo=None)


def _jsonable(v: Any) -> Any:
    """Plain Python for JSON: tensors / numpy scalars -> numbers or lists."""
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        return v.item() if v.ndim == 0 else v.tolist()
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


class AuditStore:
    """An open audit database (`OUT/audit.duckdb`).

    `AuditStore(path)` creates the file with the current schema when absent; an existing file
    with another `schema_version` is refused with a `UserError`. `read_only=True` opens an
    existing file for the report and the gate.

    A database may come from someone else (docs/report.md "Trust model"): every connection has
    DuckDB's external access off and its configuration locked (`catalog.DUCKDB_CONFIG`); an
    existing file is refused unless its catalog is exactly the schema memaudit writes (no
    stored macro, no extra or altered table, column or view); and the views memaudit reads
    are its own, defined as temporary views at open, so a view stored in the file never runs.
    While reading (`read_only`), a DuckDB error or a run row that is not JSON is a
    `UserError` naming the file.
    """

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        import duckdb

        self.path = Path(path)
        if read_only and not self.path.exists():
            raise UserError(f"audit database {self.path} not found")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only,
                                      config=dict(DUCKDB_CONFIG))
        except duckdb.Error as e:
            raise UserError(f"cannot open audit database {self.path}: "
                            f"{str(e).splitlines()[0]}") from e
        self.read_only = read_only
        try:
            self._check_or_create()
        except BaseException:
            self.con.close()
            raise

    # --- schema -----------------------------------------------------------------------
    def _check_or_create(self) -> None:
        import duckdb

        try:
            cat = catalog(self.con)
        except (duckdb.Error, ValueError) as e:
            raise UserError(f"{self.path} is not a readable DuckDB database: "
                            f"{str(e).splitlines()[0]}") from e
        if is_empty(cat):
            if self.read_only:
                raise UserError(f"{self.path} is empty, not a memaudit audit database")
            with self.transaction():
                for ddl in TABLES:
                    self.con.execute(ddl)
                self.con.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                                 [str(SCHEMA_VERSION)])
                self.con.execute("INSERT INTO meta VALUES ('created_at', ?)",
                                 [_now().isoformat()])
                for view in VIEWS:  # for users who query the file directly
                    self.con.execute(view)
            self._own_views()
            return
        if cat["macros"]:  # they would shadow built-ins in every query below: nothing runs
            raise UserError(self._foreign(differences(cat)))
        if "meta" not in cat["tables"]:
            raise UserError(f"{self.path} is not a memaudit audit database (no meta table)")
        try:
            row = self.con.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else None
        except (duckdb.Error, TypeError, ValueError):
            version = None
        if version is None:
            raise UserError(f"{self.path} is not a memaudit audit database (its meta table "
                            "records no schema_version)")
        if version != SCHEMA_VERSION:
            older = "an older" if version < SCHEMA_VERSION else "a newer"
            raise UserError(
                f"{self.path} uses {older} audit schema (version {version}; this memaudit "
                f"reads version {SCHEMA_VERSION}); rerun the audit into a new output directory"
            )
        diffs = differences(cat)
        if diffs:
            raise UserError(self._foreign(diffs))
        self._own_views()

    def _foreign(self, diffs: list[str]) -> str:
        more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        return (f"{self.path} is not a memaudit audit database as memaudit writes it "
                f"(schema version {SCHEMA_VERSION}): {'; '.join(diffs[:4])}{more}")

    def _own_views(self) -> None:
        """memaudit's views as temporary views: they shadow the file's, which never run."""
        for view in VIEWS:
            self.con.execute(view.replace("CREATE OR REPLACE VIEW",
                                          "CREATE OR REPLACE TEMP VIEW", 1))

    @property
    def schema_version(self) -> int:
        return int(self.con.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None,
                 tb: object) -> None:
        self.close()
        if self.read_only and exc is not None:
            import duckdb

            if isinstance(exc, duckdb.Error):  # the file's rows, read by memaudit's own SQL
                raise UserError(f"cannot read audit database {self.path}: "
                                f"{str(exc).splitlines()[0]}") from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT; ROLLBACK on any exception (nothing half-written)."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    # --- queries ----------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Rows as dicts (read-side helper for report and gate). On a database opened
        read-only (one memaudit did not just write), a query the file makes fail (a view
        that raises, a column of another type) is a one-line `UserError`."""
        import duckdb

        try:
            cur = self.con.execute(sql, list(params or []))
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
        except duckdb.Error as e:
            if not self.read_only:
                raise
            raise UserError(f"cannot read {self.path}: {str(e).strip().splitlines()[0]} "
                            "(a damaged or foreign audit database)") from e
        return [dict(zip(names, r, strict=True)) for r in rows]

    def count(self, table: str) -> int:
        if table not in TABLE_NAMES:
            raise ValueError(table)
        return self.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def latest_run(self) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM runs ORDER BY id DESC LIMIT 1")
        return self._checked_run(rows[0]) if rows else None

    def _checked_run(self, run: dict[str, Any]) -> dict[str, Any]:
        """The run row, its JSON columns checked (a crafted or damaged file: one line)."""
        for col in ("plan_json", "settings_json", "versions_json", "seeds_json"):
            v = run.get(col)
            if v is None and col != "plan_json":
                continue
            try:
                parsed = json.loads(v)
            except (TypeError, ValueError, RecursionError):
                parsed = None
            if not isinstance(parsed, dict if col != "seeds_json" else list):
                raise UserError(f"{self.path}: runs.{col} of run {run.get('id')} is not a "
                                f"JSON {'object' if col != 'seeds_json' else 'list'}")
        return run

    def run(self, run_id: int | None = None) -> dict[str, Any]:
        """One run's row (default the latest); `UserError` when there is none."""
        if run_id is None:
            r = self.latest_run()
            if r is None:
                raise UserError(f"{self.path} holds no audit run yet")
            return r
        rows = self.query("SELECT * FROM runs WHERE id = ?", [run_id])
        if not rows:
            raise UserError(f"no run {run_id} in {self.path}")
        return self._checked_run(rows[0])

    def done_units(self, run_id: int) -> set[str]:
        return {r[0] for r in self.con.execute(
            "SELECT unit FROM units WHERE run_id = ?", [run_id]).fetchall()}

    # --- writers (call inside `transaction()`) ------------------------------------------
    def _next_id(self, table: str) -> int:
        return self.con.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {table}").fetchone()[0]

    def add_run(self, *, model: str, model_hash: str | None, index_path: str | None,
                index_hash: str | None, plan: dict[str, Any], plan_hash: str,
                settings: dict[str, Any] | None, versions: dict[str, str], device: str,
                seeds: list[int]) -> int:
        run_id = self._next_id("runs")
        self.con.execute(
            "INSERT INTO runs VALUES (?, ?, NULL, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, _now(), model, model_hash, index_path, index_hash,
             json.dumps(plan, sort_keys=True), plan_hash, json.dumps(settings or {},
                                                                       sort_keys=True),
             json.dumps(versions, sort_keys=True), device, json.dumps(seeds)])
        return run_id

    def finish_run(self, run_id: int) -> None:
        self.con.execute("UPDATE runs SET status = 'finished', finished_at = ? WHERE id = ?",
                         [_now(), run_id])

    def set_run_status(self, run_id: int, status: str) -> None:
        """'running' (again, on resume) or 'failed' (an error ended it part-way)."""
        if status not in RUN_STATUSES:
            raise ValueError(status)
        self.con.execute("UPDATE runs SET status = ?, finished_at = ? WHERE id = ?",
                         [status, _now() if status == "failed" else None, run_id])

    def upsert_prompt(self, text: str, source: str | None = None,
                      label: str | None = None, target_key: str | None = None) -> int:
        """The prompt's id; a new source is appended to its source list, a label and a
        target key (the training item it is known to reproduce) are kept."""
        row = self.con.execute("SELECT id, sources_json, label, target_key FROM prompts "
                               "WHERE text = ?", [text]).fetchone()
        if row is None:
            pid = self._next_id("prompts")
            self.con.execute("INSERT INTO prompts VALUES (?, ?, ?, ?, ?)",
                             [pid, text, json.dumps([source] if source else []), label,
                              target_key])
            return pid
        pid, sources_json, old_label, old_target = row
        sources = json.loads(sources_json)
        if source and source not in sources:
            sources.append(source)
        self.con.execute("UPDATE prompts SET sources_json = ?, label = ?, target_key = ? "
                         "WHERE id = ?",
                         [json.dumps(sources), label if label is not None else old_label,
                          target_key if target_key is not None else old_target, pid])
        return pid

    def add_generation(self, *, run_id: int, prompt_id: int, method: str, seed: int,
                       image_path: str, guidance_scale: float | None = None,
                       steps: int | None = None, wall_seconds: float | None = None,
                       unet_calls: float | None = None, final_prompt: str | None = None,
                       alignment: float | None = None, clip_score: float | None = None,
                       extra: dict[str, Any] | None = None) -> int:
        gid = self._next_id("generations")
        self.con.execute(
            "INSERT INTO generations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [gid, run_id, prompt_id, method, int(seed), guidance_scale, steps, image_path,
             wall_seconds, unet_calls, final_prompt, alignment, clip_score,
             json.dumps({k: _jsonable(v) for k, v in (extra or {}).items()})])
        return gid

    def add_quality(self, *, run_id: int, method: str, features: str, dim: int | None, n: int,
                    n_reference: int, reference_seed: int | None, kid: float | None,
                    kid_std: float | None, kid_subsets: int | None,
                    kid_subset_size: int | None, fd: float | None,
                    extra: dict[str, Any] | None = None) -> None:
        """One method's quality in one feature space (METHODS 4; memaudit.audit.quality)."""
        self.con.execute(
            "INSERT INTO quality VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, method, features, dim, int(n), int(n_reference), reference_seed, kid,
             kid_std, kid_subsets, kid_subset_size, fd,
             json.dumps({k: _jsonable(v) for k, v in (extra or {}).items()})])

    def add_match(self, *, generation_id: int, criterion: str, score: float,
                  higher_is_more_similar: bool, is_copy: bool,
                  is_copy_calibrated: bool | None, threshold: float | None,
                  calibrated_threshold: float | None, neighbour_row: int | None,
                  neighbour_key: str | None, neighbour_caption: str | None,
                  dup_count: int | None, extra: dict[str, Any] | None = None,
                  reproduced: bool | None = None) -> None:
        """One criterion's verdict on one generation; `reproduced`: the prompt's known target
        is the nearest item and the fixed cut passes (None: the prompt has no target)."""
        score = float(score)
        self.con.execute(
            "INSERT INTO matches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [generation_id, criterion, score, score if higher_is_more_similar else -score,
             bool(higher_is_more_similar),
             None if neighbour_row is None else int(neighbour_row), neighbour_key,
             neighbour_caption, None if dup_count is None else int(dup_count), bool(is_copy),
             None if is_copy_calibrated is None else bool(is_copy_calibrated),
             threshold, calibrated_threshold,
             json.dumps({k: _jsonable(v) for k, v in (extra or {}).items()}),
             None if reproduced is None else bool(reproduced)])

    def add_screen(self, *, run_id: int, prompt_id: int, score: float, steps: int, seeds: int,
                   threshold: float | None, flagged: bool | None, score_name: str | None = None,
                   params: dict[str, Any] | None = None) -> None:
        """One prompt's screening score; `params` = the score's parameters and notes
        (`ScreenScore.record()` without the name), stored as JSON."""
        self.con.execute("INSERT INTO screens VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         [run_id, prompt_id, float(score), steps, seeds, threshold, flagged,
                          score_name, None if params is None else json.dumps(
                              {k: _jsonable(v) for k, v in params.items()})])

    def add_steps(self, generation_ids: Sequence[int], trace: Sequence[dict[str, Any]]) -> int:
        """Per-step trace of a batch: `trace[j][key]` is a per-sample [B] value or a scalar.

        Known keys go to their columns (t, u, guidance magnitude, sigma_t, lambda, active
        guidances); everything else lands in `extra_json`. Inserted as one Arrow table.
        """
        b = len(generation_ids)
        cols: dict[str, list[Any]] = {k: [] for k in (
            "generation_id", "step", "t", "u", "guidance_norm", "sigma_t", "lambda_t",
            "active_json", "extra_json")}
        for j, rec in enumerate(trace):
            rec = {k: _jsonable(v) for k, v in rec.items()}

            def per(v: Any, i: int) -> Any:
                return v[i] if isinstance(v, list) and len(v) == b else v

            used: set[str] = set()
            picked: dict[str, Any] = {}
            for col, names in _STEP_KEYS.items():
                for name in names:
                    if name in rec:
                        picked[col] = rec[name]
                        used.add(name)
                        break
            for i, gid in enumerate(generation_ids):
                cols["generation_id"].append(int(gid))
                cols["step"].append(j)
                for col in ("t", "u", "guidance_norm", "sigma_t", "lambda_t"):
                    v = per(picked.get(col), i)
                    cols[col].append(None if v is None or isinstance(v, (list, dict, str))
                                     else float(v))
                act = per(picked.get("active_json"), i)
                cols["active_json"].append(None if act is None else json.dumps(act))
                extra = {k: per(v, i) for k, v in rec.items() if k not in used}
                cols["extra_json"].append(json.dumps(extra) if extra else None)
        if not cols["step"]:
            return 0
        table = pa.table({
            "generation_id": pa.array(cols["generation_id"], pa.int32()),
            "step": pa.array(cols["step"], pa.int32()),
            **{c: pa.array(cols[c], pa.float64())
               for c in ("t", "u", "guidance_norm", "sigma_t", "lambda_t")},
            "active_json": pa.array(cols["active_json"], pa.string()),
            "extra_json": pa.array(cols["extra_json"], pa.string()),
        })
        self.con.register("_steps_batch", table)
        try:
            self.con.execute("INSERT INTO steps SELECT * FROM _steps_batch")
        finally:
            self.con.unregister("_steps_batch")
        return table.num_rows

    def mark_unit(self, run_id: int, unit: str) -> None:
        self.con.execute("INSERT INTO units VALUES (?, ?, ?)", [run_id, unit, _now()])
