"""Prompt lists: read the formats the memorization literature exchanges (issue 3).

Accepted (see /work/shared/data/prompts/README.md):
- plain text, one prompt a line (blank lines and lines starting with `#` skipped);
- JSON Lines with a `caption`, `prompt` or `text` key (Wen et al. 2024 `sdv1_500_memorized.jsonl`:
  `caption`, `index`, `url`); other keys are kept in `extra`;
- CSV separated by `,`, `;` or a tab (sniffed from the header), with or without a leading
  unnamed index column (pandas' default), the prompt column found case-insensitively
  (`caption`, `prompt` or `text`), a label column kept when present (`type` or `label`, e.g.
  VM/TM in the Webster 2023 list), and MemBench's `prompt,urls` where `urls` is a
  Python list literal (parsed with `ast.literal_eval`, never `eval`).
"""

from __future__ import annotations

import ast
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memaudit.common import UserError

PROMPT_KEYS = ("caption", "prompt", "text")
LABEL_KEYS = ("type", "label")
#: Columns naming the training item a prompt is known to reproduce (first present wins).
TARGET_KEYS = ("target_key", "key")
TEXT_SUFFIXES = {".txt", ".text", ".lst", ".prompts"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
CSV_SUFFIXES = {".csv", ".tsv"}


@dataclass
class PromptRecord:
    """One prompt. `index` is its 0-based position in the file's prompt list (after skipping
    blank and comment lines); `extra` holds the other columns/keys of the row (e.g. `url`,
    `Index`, MemBench `urls` as a list, the leading unnamed CSV index as `row`)."""

    text: str
    source: str
    label: str | None = None
    index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target_key(self) -> str | None:
        """The training item this prompt is known to reproduce: a `target_key` (else `key`)
        column or JSON key (the canary's prompts.csv; docs/criteria.md "Reproduction"), else
        None. Numbers are read as their text (a key column of integers)."""
        for name in TARGET_KEYS:
            v = self.extra.get(name)
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, int | str):
                return str(v).strip() or None
        return None


def _find_key(names: list[str], wanted: tuple[str, ...]) -> str | None:
    lowered = {n.strip().lower(): n for n in names}
    for w in wanted:
        if w in lowered:
            return lowered[w]
    return None


def _label(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def _read_text(text: str, source: str) -> list[PromptRecord]:
    out: list[PromptRecord] = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        out.append(PromptRecord(text=s, source=source, index=len(out)))
    return out


def _read_jsonl(text: str, source: str) -> list[PromptRecord]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # a plain JSON array of objects or strings is accepted too
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}: not valid JSON ({e.msg}, line {e.lineno})") from e
        except RecursionError:
            raise UserError(f"{source}: JSON nested too deeply to be a prompt list") from None
        if not isinstance(rows, list):
            raise UserError(f"{source}: not a list of prompts")
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{source}: line {lineno} is not valid JSON ({e.msg})") from e
            except RecursionError:
                raise UserError(f"{source}: line {lineno} is JSON nested too deeply to be a "
                                "prompt record") from None
    out: list[PromptRecord] = []
    for n, row in enumerate(rows, 1):
        if isinstance(row, str):
            out.append(PromptRecord(text=row.strip(), source=source, index=len(out)))
            continue
        if not isinstance(row, dict):
            raise UserError(f"{source}: record {n} is not a JSON object")
        key = _find_key(list(row), PROMPT_KEYS)
        if key is None:
            raise UserError(
                f"{source}: record {n} has no prompt key (one of {', '.join(PROMPT_KEYS)}); "
                f"keys: {', '.join(map(str, row)) or '(none)'}"
            )
        value = row[key]
        if value is None or isinstance(value, bool | list | dict):
            raise UserError(f"{source}: record {n}: the prompt ({key!r}) is "
                            f"{json.dumps(value)[:40]}, not text")
        label_key = _find_key(list(row), LABEL_KEYS)
        extra = {k: v for k, v in row.items() if k not in (key, label_key)}
        out.append(PromptRecord(text=str(value).strip(), source=source,
                                label=_label(row.get(label_key)) if label_key else None,
                                index=len(out), extra=extra))
    return out


def _sniff_delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in (";", ",", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def _maybe_literal(value: str) -> Any:
    s = value.strip()
    if s[:1] in "[(" and s[-1:] in "])":
        try:
            return ast.literal_eval(s)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            return value
    return value


def _read_csv(text: str, source: str) -> list[PromptRecord]:
    header_line = text.split("\n", 1)[0]
    delim = _sniff_delimiter(header_line)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    try:
        return _csv_rows(reader, source, delim)
    except csv.Error as e:  # a field over csv's limit (131,072 characters), a stray NUL
        raise UserError(f"{source}: line {reader.line_num}: not readable as CSV ({e})") from None


def _csv_rows(reader: Any, source: str, delim: str) -> list[PromptRecord]:
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{source}: empty CSV file") from None
    key = _find_key(header, PROMPT_KEYS)
    if key is None:
        raise UserError(
            f"{source}: no prompt column (one of {', '.join(PROMPT_KEYS)}, any case); "
            f"columns: {', '.join(repr(h) for h in header)}"
        )
    col = header.index(key)
    label_key = _find_key(header, LABEL_KEYS)
    label_col = header.index(label_key) if label_key is not None else None
    out: list[PromptRecord] = []
    for lineno, row in enumerate(reader, 2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= col:
            raise UserError(f"{source}: row {lineno} has {len(row)} fields, expected "
                            f"{len(header)} (separator {delim!r})")
        extra: dict[str, Any] = {}
        for i, name in enumerate(header):
            if i in (col, label_col) or i >= len(row):
                continue
            extra[name.strip() or "row"] = _maybe_literal(row[i])
        label = _label(row[label_col]) if label_col is not None and label_col < len(row) else None
        out.append(PromptRecord(text=row[col].strip(), source=source, label=label,
                                index=len(out), extra=extra))
    return out


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """Read a prompt list (plain text, JSON Lines or CSV; see the module docstring).

    The format comes from the suffix (.txt, .jsonl/.ndjson/.json, .csv/.tsv); other suffixes
    are sniffed (JSON object lines, then a CSV header naming a prompt column). A file that is
    missing, unreadable, of unknown format or without a prompt column raises UserError.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file {str(p)!r} not found")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    source = str(p)
    suffix = p.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        records = _read_text(text, source)
    elif suffix in JSONL_SUFFIXES:
        records = _read_jsonl(text, source)
    elif suffix in CSV_SUFFIXES:
        records = _read_csv(text, source)
    else:
        first = text.lstrip()[:1]
        header = text.split("\n", 1)[0]
        if first in ("{", "["):
            records = _read_jsonl(text, source)
        elif _find_key([h.strip().strip('"') for h in header.replace(";", ",").split(",")],
                       PROMPT_KEYS):
            records = _read_csv(text, source)
        else:
            raise UserError(
                f"{p}: unknown prompt-list format (use .txt one prompt a line, .jsonl with a "
                "caption/prompt/text key, or .csv with a caption/prompt/text column)"
            )
    records = [r for r in records if r.text]
    for i, r in enumerate(records):
        r.index = i
    if not records:
        raise UserError(f"{p}: no prompts found")
    return records


def prompt_texts(records: list[PromptRecord]) -> list[str]:
    return [r.text for r in records]
