"""The report's per-prompt view: one row per prompt with a flagged output, its generations per
method (every seed, copies marked) beside the training image its worst copy reproduces,
under a stable anchor (`#prompt-` + the first 12 hex digits of the SHA-256 of the prompt's
text), so a reviewer can cite one prompt; and the prompt x method tables, whose prompts link
to those rows (or carry the anchor themselves)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from memaudit.report.images import THUMB_PX, image_file_uri


def prompt_anchor(text: str) -> str:
    """The stable id of a prompt's row: the same prompt has the same anchor in every report."""
    return "prompt-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def prompt_rows(gens: list[dict[str, Any]], methods: list[str], cards: list[dict[str, Any]],
                root: Path, train: Any, max_prompts: int) -> tuple[list[dict], list[str]]:
    """Rows for the prompts of `cards` (flagged generations: {gid, prompt, verdict_copy,
    rank, matches}), most verdict copies first, at most `max_prompts`, showing `gens` (the
    generations of those prompts: {gid, method, seed, image_path, prompt, label}); and the
    image paths left out because they are not under `root` (the database's folder)."""
    per: dict[str, dict[str, Any]] = {}
    for c in cards:
        p = per.setdefault(c["prompt"], {"copies": 0, "rank": float("-inf"), "best": None,
                                         "state": {}})
        p["copies"] += int(c["verdict_copy"])
        p["state"][c["gid"]] = "copy" if c["verdict_copy"] else "fixed"
        for m in c["matches"]:
            if p["best"] is None or m["rank"] > p["best"]["rank"]:
                p["best"] = m
        p["rank"] = max(p["rank"], c["rank"])
    chosen = sorted(per, key=lambda t: (-per[t]["copies"], -per[t]["rank"], t))[:max_prompts]
    if not chosen:
        return [], []
    outside: list[str] = []
    rows = {t: {"anchor": prompt_anchor(t), "prompt": t, "label": None, "n": 0,
                "copies": per[t]["copies"], "cells": {m: [] for m in methods}} for t in chosen}
    for g in gens:
        row = rows.get(g["prompt"])
        if row is None:
            continue
        row["label"], row["n"] = g["label"], row["n"] + 1
        path = root / str(g["image_path"])
        uri = image_file_uri(path, root=root, px=THUMB_PX, shrink=True)
        if uri is None and path.exists():
            outside.append(str(g["image_path"]))
        row["cells"].setdefault(g["method"], []).append(
            {"seed": g["seed"], "uri": uri, "state": per[g["prompt"]]["state"].get(g["gid"], "")})
    out = []
    for t in chosen:
        row, best = rows[t], per[t]["best"]
        row["train"] = dict(best, train_uri=train.uri(best["neighbour_row"]))
        row["cells"] = [{"method": m, "images": row["cells"].get(m) or []} for m in methods]
        out.append(row)
    return out, outside


def link_prompt_tables(tables: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Give each prompt of the prompt x method tables its anchor: a link to its row when it
    has one, else the anchor on its first table row (in place)."""
    have = {r["prompt"] for r in rows}
    placed: set[str] = set()
    for t in tables:
        for r in t["rows"]:
            r["anchor"] = prompt_anchor(r["prompt"])
            r["link"] = r["prompt"] in have
            r["place_id"] = not r["link"] and r["prompt"] not in placed
            placed.add(r["prompt"])
