"""Which run an audit continues: a run is resumed only when it audits the same content
(the plan's settings, each prompt list's SHA-256 and rows, the model's and the index's
hashes); docs/database.md "Resuming, and changed plans"."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memaudit.audit.plan import Plan
from memaudit.common import UserError
from memaudit.store import AuditStore


def plan_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of keys whose values differ between two plan dicts."""
    diffs: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += plan_difference(a, b, name + ".")
        elif a != b:
            diffs.append(f"{name}: {json.dumps(a)} -> {json.dumps(b)}")
    return diffs


def prompt_list_changes(old: Any, new: list[dict[str, Any]], run_id: int) -> list[str] | None:
    """How the content of the same prompt lists (files and labels) differs from a run's;
    None when the lists themselves differ (then `plan_difference` names them)."""
    def files(lists: Any) -> list[tuple[Any, Any]]:
        return [(p.get("file"), p.get("label")) for p in lists if isinstance(p, dict)]

    if not isinstance(old, list) or len(old) != len(new) or files(old) != files(new):
        return None
    out = []
    for a, b in zip(old, new, strict=True):
        name = Path(str(b["file"])).name
        if not a.get("sha256"):
            out.append(f"run {run_id} recorded no content of prompt list {name} (an older "
                       "memaudit), so it cannot be taken for unchanged")
        elif (a.get("sha256"), a.get("rows")) != (b["sha256"], b["rows"]):
            out.append(f"prompt list {name} changed since run {run_id} (sha256 "
                       f"{a['sha256'][:12]} -> {b['sha256'][:12]}, {a.get('rows')} prompts -> "
                       f"{b['rows']} prompts)")
    return out


def start_or_resume(store: AuditStore, plan: Plan, model: Any, ihash: str | None,
                     new_run: bool, log: Callable[[str], None]) -> int | None:
    """The run to resume, or None to start a new one (see `run_audit`)."""
    latest = store.latest_run()
    if latest is None or new_run:
        return None
    rid, status = int(latest["id"]), str(latest["status"])
    old = json.loads(latest["plan_json"])
    old.pop("device", None)
    new = plan.comparable()
    # a run is keyed by the content it audits: each prompt list's SHA-256 and rows, the
    # model's and the index's hashes (a hash missing on either side is not "unchanged")
    why = prompt_list_changes(old.get("prompts"), new["prompts"], rid)
    if why is not None:
        old.pop("prompts", None)
        new.pop("prompts")
    diffs = plan_difference(old, new)
    why = ([f"the plan differs from run {rid} in {plan.db_path} ({'; '.join(diffs)})"]
           if diffs else []) + (why or [])
    mh = getattr(model, "model_hash", None)
    if latest["model_hash"] != mh:
        why.append(f"model weights changed since run {rid} "
                   f"({(latest['model_hash'] or 'none')[:12]} -> {(mh or 'none')[:12]})")
    if latest["index_hash"] != ihash:
        why.append(f"the index changed since run {rid} ({(latest['index_hash'] or 'none')[:12]}"
                   f" -> {(ihash or 'none')[:12]})")
    if not why:
        log(f"resuming run {rid}" + ("" if status == "running" else f" ({status})"))
        return rid
    if status != "finished":
        log(f"{'; '.join(why)}; run {rid} is {status}: starting a new run beside it")
        return None
    raise UserError(f"{'; '.join(why)}; run {rid} is finished: use --new-run to start a new "
                    "run")
