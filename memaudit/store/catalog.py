"""An audit database's catalog (tables, columns, views, macros...) compared with the schema
memaudit writes, before any query touches the file's rows (docs/report.md "Trust model").

A database may come from someone else, and DuckDB stores code in it: a view runs when it is
queried, and a stored macro shadows a built-in function of the same name (`arg_max`, even the
`duckdb_views()` that `information_schema` calls). So the catalog is read only through
`system.main.duckdb_*()` table functions, filtered in Python, and a file whose catalog is not
exactly the one `schema.TABLES` / `schema.VIEWS` create in this DuckDB is refused.
"""

from __future__ import annotations

import functools
from typing import Any

#: DuckDB settings of every connection memaudit opens: no file, network or extension is
#: reachable from SQL (what a stored view or macro would use), and SQL cannot change that back
DUCKDB_CONFIG: dict[str, Any] = {
    "enable_external_access": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "lock_configuration": True,  # last: the settings above are then fixed
}

_SYSTEM_DATABASES = ("system", "temp")


def _rows(con: Any, fn: str, cols: str) -> list[tuple]:
    # `fn` and `cols` are fixed names from this module, never user text
    return con.execute(f"SELECT {cols} FROM system.main.{fn}()").fetchall()


def catalog(con: Any) -> dict[str, Any]:
    """What the connection's own database (not `system` or `temp`) holds besides rows."""
    dbs = [r[0] for r in _rows(con, "duckdb_databases", "database_name, internal")
           if not r[1] and r[0] not in _SYSTEM_DATABASES]
    if len(dbs) != 1:
        raise ValueError(f"expected one attached database, found {dbs}")
    db = dbs[0]

    def mine(fn: str, cols: str) -> list[tuple]:
        """Rows of the file's database, the first column its schema-qualified object name
        ("main." left out)."""
        return [(r[2] if r[1] == "main" else f"{r[1]}.{r[2]}", *r[3:])
                for r in _rows(con, fn, "database_name, schema_name, " + cols) if r[0] == db]

    tables = sorted(r[0] for r in mine("duckdb_tables", "table_name"))
    columns: dict[str, list[tuple]] = {t: [] for t in tables}
    for t, name, _idx, dtype, nullable, default in sorted(mine(
            "duckdb_columns", "table_name, column_name, column_index, data_type, "
            "is_nullable, column_default"), key=lambda r: (r[0], r[2])):
        if t in columns:
            columns[t].append((name, dtype, nullable, default))
    schemas = [r[1] for r in _rows(con, "duckdb_schemas", "database_name, schema_name")
               if r[0] == db]
    return {
        "schemas": sorted(schemas),
        "tables": columns,
        "views": {r[0]: r[1] for r in mine("duckdb_views", "view_name, sql")},
        "macros": sorted(r[0] for r in mine("duckdb_functions", "function_name")),
        "sequences": sorted(r[0] for r in mine("duckdb_sequences", "sequence_name")),
        "types": sorted(r[0] for r in mine("duckdb_types", "type_name, internal") if not r[1]),
        "indexes": sorted(r[0] for r in mine("duckdb_indexes", "index_name")),
        "constraints": sorted(mine("duckdb_constraints", "table_name, constraint_text")),
    }


@functools.cache
def reference_catalog() -> dict[str, Any]:
    """The catalog `schema.TABLES` and `schema.VIEWS` create in this DuckDB (in memory)."""
    import duckdb

    from memaudit.store.schema import TABLES, VIEWS

    con = duckdb.connect(":memory:", config=dict(DUCKDB_CONFIG))
    try:
        for ddl in TABLES + VIEWS:
            con.execute(ddl)
        return catalog(con)
    finally:
        con.close()


def is_empty(cat: dict[str, Any]) -> bool:
    return not any(cat[k] for k in ("tables", "views", "macros", "sequences", "types",
                                     "indexes")) and set(cat["schemas"]) <= {"main"}


def _column(c: tuple) -> str:
    return (f"{c[1]}{'' if c[2] else ' NOT NULL'}"
            f"{'' if c[3] is None else ' DEFAULT ' + str(c[3])}")


def differences(cat: dict[str, Any]) -> list[str]:
    """How a catalog differs from the one memaudit writes (empty: identical), each item a few
    words naming the object."""
    ref = reference_catalog()
    out: list[str] = []
    out += [f"stored macro {m}" for m in cat["macros"]]
    for kind in ("schema", "sequence", "type", "index"):
        key = kind + "s" if kind != "index" else "indexes"
        out += [f"extra {kind} {x}" for x in cat[key] if x not in ref[key]]
        out += [f"missing {kind} {x}" for x in ref[key] if x not in cat[key]]
    for t, cols in cat["tables"].items():
        if t not in ref["tables"]:
            out.append(f"extra table {t}")
            continue
        want = {c[0]: c for c in ref["tables"][t]}
        have = {c[0]: c for c in cols}
        out += [f"extra column {t}.{c}" for c in have if c not in want]
        out += [f"missing column {t}.{c}" for c in want if c not in have]
        changed = [f"column {t}.{c} is {_column(have[c])}, memaudit writes {_column(want[c])}"
                   for c in have if c in want and have[c] != want[c]]
        out += changed
        if set(have) == set(want) and not changed and list(have) != list(want):
            out.append(f"the columns of table {t} are in another order")
    out += [f"missing table {t}" for t in ref["tables"] if t not in cat["tables"]]
    for v, sql in cat["views"].items():
        if v not in ref["views"]:
            out.append(f"extra view {v}")
        elif sql != ref["views"][v]:
            out.append(f"view {v} differs from memaudit's")
    out += [f"missing view {v}" for v in ref["views"] if v not in cat["views"]]
    tables_ok = {t for t in cat["tables"] if t in ref["tables"]}
    want_c = {c for c in ref["constraints"] if c[0] in tables_ok}
    have_c = set(cat["constraints"])
    out += [f"extra constraint {c[0]}: {c[1]}" for c in sorted(have_c - want_c)
            if c[0] in tables_ok]
    out += [f"missing constraint {c[0]}: {c[1]}" for c in sorted(want_c - have_c)]
    return out
