"""Benchmarks that span several areas (the per-area ones live beside their code, e.g.
memaudit/models/bench.py): `python -m memaudit.bench.gpu OUTDIR` runs every GPU figure."""
