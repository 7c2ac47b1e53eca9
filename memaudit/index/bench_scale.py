"""`python -m memaudit.index.bench_scale`: an index over millions of rows under a memory limit
(issue 20); figures go to docs/benchmarks.md ("Scale"), never into a timed test.

1. Writes a synthetic training set (`--rows`, Parquet files of `--file-rows` rows) with a
   known duplicate structure: row r shows image `mix(r) mod 0.8 N` (so ~30% of the rows
   repeat an image shown elsewhere, in groups of 2 to ~8 spread over the whole set), a 4x4
   RGB picture (PPM) whose pixels spell out its image number.
2. Builds a `pixels` index (4x4, dim 48, `--factory`, default IVF1024,PQ8 with re-ranking)
   from all rows under `--memory-limit`, each build in a fresh subprocess: wall time, rows/s,
   and per stage (shards, grouping, training, filling, calibration) its seconds and its peak
   RSS (VmHWM, reset per stage); the process' overall peak RSS and anonymous (heap) peak
   sampled every 50 ms. The peak must stay under the limit. The number of groups and of
   items per group must be the known structure's.
3. The same build over the first `--subset` rows, its shards kept, compared with the
   in-memory path: groups by `np.unique` (`memaudit.index.grouping.group_duplicates`) on the
   shards' pixel hashes, and a faiss index with the same trained quantizer filled in memory
   with all representatives at once; groups must be equal item for item, and searches
   (`--queries` noisy training vectors, k=10) equal in ids and distances.
4. Both finalisations again, from their kept shards, under `--refinalize-limit` (default
   1.5GB, no calibration): the same items; the peak at `--subset` vs `--rows` rows under one
   tight limit, where every stage runs against its cap (DuckDB spilling to disk).
5. An audit of the shipped canary against each index (local engine: the process holds what
   an audit actor holds), its peak RSS at `--subset` rows vs `--rows` rows (goal: flat).

Everything is written under `--work` (default: a temporary folder) and removed at the end
unless `--keep`. Peak figures are printed as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

PPM_HEADER = b"P6\n4 4\n255\n"


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 -> uint64), vectorised."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def image_of_rows(rows: np.ndarray, total: int) -> np.ndarray:
    """The known duplicate structure: the image number each row shows."""
    with np.errstate(over="ignore"):
        return (_mix(rows) % np.uint64(max(1, total * 4 // 5))).astype(np.int64)


def image_pixels(images: np.ndarray) -> np.ndarray:
    """[n, 48] uint8: the image number (8 bytes) then 40 bytes derived from it."""
    with np.errstate(over="ignore"):
        words = [images.astype(np.uint64)] + [_mix(images.astype(np.uint64) * np.uint64(7)
                                                   + np.uint64(j)) for j in range(5)]
    return np.stack(words, 1).astype("<u8").view(np.uint8).reshape(len(images), 48)


def write_synthetic(out: Path, rows: int, file_rows: int = 1_000_000,
                    row_group: int = 100_000, total: int | None = None) -> list[Path]:
    """The first `rows` rows of the synthetic training set of `total` rows (module
    docstring), in files of `file_rows` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    files = []
    schema = pa.schema([("image", pa.binary()), ("caption", pa.string()), ("key", pa.string())])
    for f0 in range(0, rows, file_rows):
        path = out / f"part-{f0 // file_rows:05d}.parquet"
        with pq.ParquetWriter(path, schema) as w:
            for a in range(f0, min(rows, f0 + file_rows), row_group):
                r = np.arange(a, min(rows, f0 + file_rows, a + row_group), dtype=np.int64)
                img = image_of_rows(r, total or rows)
                blob = np.concatenate([np.broadcast_to(np.frombuffer(PPM_HEADER, np.uint8),
                                                       (len(r), len(PPM_HEADER))),
                                       image_pixels(img)], 1)
                width = blob.shape[1]
                offsets = np.arange(0, width * (len(r) + 1), width, dtype=np.int32)
                images = pa.Array.from_buffers(pa.binary(), len(r), [
                    None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(blob.tobytes())])
                w.write_table(pa.table({
                    "image": images,
                    "caption": pa.array([f"image {i} take {j % 3}" for i, j in
                                         zip(img.tolist(), r.tolist(), strict=True)]),
                    "key": pa.array([f"r{j:09d}" for j in r.tolist()]),
                }, schema=schema))
        files.append(path)
    return files


def known_groups(rows: int, total: int) -> np.ndarray:
    """Items per group of the first `rows` rows, groups in order of first appearance."""
    from memaudit.index.grouping import group_duplicates

    img = image_of_rows(np.arange(rows, dtype=np.int64), total)
    return group_duplicates(img.view(np.uint8).reshape(rows, 8))[2]


# -- measured subprocesses ----------------------------------------------------------------
class _Sampler:
    """Peak VmRSS, RssAnon (heap) and RssFile (mapped files and libraries) of this process,
    sampled every `period` seconds, overall and per build stage
    (`memaudit.engine.memory.current_stage`)."""

    def __init__(self, period: float = 0.05):
        from memaudit.engine.memory import current_stage, rss_bytes

        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.stages: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.wait(period):
                now = {k: rss_bytes(k) or 0 for k in self.peak}
                st = self.stages.setdefault(current_stage[0] or "-", dict.fromkeys(now, 0))
                for k, v in now.items():
                    self.peak[k] = max(self.peak[k], v)
                    st[k] = max(st[k], v)

        self._th = threading.Thread(target=run, daemon=True)
        self._th.start()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._th.join()
        return self.peak


def child_build(args: dict[str, Any]) -> dict[str, Any]:
    from memaudit.engine.memory import last_stages, rss_bytes
    from memaudit.index import build_index

    base = rss_bytes("VmHWM") or 0
    sampler = _Sampler()
    t0 = time.perf_counter()
    build_index(args["source"], "pixels", Path(args["out"]), factory=args["factory"],
                embedder_opts={"size": 4}, batch_size=1024, shard_rows=args["shard_rows"],
                train_sample=args["train_sample"], faiss_params=args["faiss_params"],
                memory_limit=args["memory_limit"], overwrite=True, device="cpu",
                calibrate=args["calibrate"])
    secs = time.perf_counter() - t0
    sampled = sampler.stop()
    stages = [{**s, "anon_sampled": sampler.stages.get(s["stage"], {}).get("RssAnon"),
               "file_sampled": sampler.stages.get(s["stage"], {}).get("RssFile")}
              for s in last_stages]
    peaks = [s["peak_rss"] for s in stages if s["peak_rss"]]
    return {"seconds": round(secs, 1), "stages": stages, "import_peak_rss": base,
            "peak_rss": max([base, sampled["VmRSS"], *peaks]),
            "peak_anon_sampled": sampled["RssAnon"], "peak_file_sampled": sampled["RssFile"]}


def child_audit(args: dict[str, Any]) -> dict[str, Any]:
    from memaudit.audit import load_plan, run_audit
    from memaudit.engine.memory import rss_bytes

    sampler = _Sampler()
    t0 = time.perf_counter()
    res = run_audit(load_plan(args["plan"]), device="cpu")
    sampled = sampler.stop()
    return {"seconds": round(time.perf_counter() - t0, 1), "units": res.units_done,
            "peak_rss": max(rss_bytes("VmHWM") or 0, sampled["VmRSS"]),
            "peak_anon_sampled": sampled["RssAnon"], "peak_file_sampled": sampled["RssFile"]}


def _run_child(kind: str, args: dict[str, Any], env: dict[str, str] | None = None
               ) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "memaudit.index.bench_scale", "--child", kind,
                        json.dumps(args)], capture_output=True, text=True,
                       env={**os.environ, "MEMAUDIT_QUIET": "1", **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({r.returncode}): {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _mib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _summary(name: str, rows: int, res: dict[str, Any], limit: int) -> dict[str, Any]:
    out = {"bench": name, "rows": rows, "seconds": res["seconds"],
           "rows_per_s": round(rows / max(res["seconds"], 1e-9), 1),
           "limit_mib": _mib(limit), "peak_rss_mib": _mib(res["peak_rss"]),
           "under_limit": res["peak_rss"] < limit,
           "peak_anon_sampled_mib": _mib(res["peak_anon_sampled"]),
           "peak_file_sampled_mib": _mib(res["peak_file_sampled"]),
           "import_peak_rss_mib": _mib(res["import_peak_rss"]),
           "stages": {s["stage"]: {"seconds": s["seconds"], "peak_rss_mib": _mib(s["peak_rss"]),
                                   "anon_mib": _mib(s["anon_sampled"]),
                                   "file_mib": _mib(s["file_sampled"])}
                      for s in res["stages"]}}
    print(json.dumps(out), flush=True)
    return out


# -- the comparison with the in-memory path ------------------------------------------------
def compare_in_memory(index_dir: Path, shards: Path, queries: int, k: int = 10
                      ) -> dict[str, Any]:
    """Groups (np.unique on the shards' hashes) and searches (faiss filled in memory) of the
    in-memory path against the index built in pieces."""
    import faiss

    from memaudit.index import TrainingIndex
    from memaudit.index.fill import IVFDATA_FILE, read_index
    from memaudit.index.grouping import group_duplicates

    hashes = np.concatenate([np.load(f) for f in sorted(shards.glob("shard_*.hash.npy"))])
    vecs = np.concatenate([np.load(f) for f in sorted(shards.glob("shard_*.emb.npy"))])
    groups, rep, counts = group_duplicates(hashes)
    idx = TrainingIndex.open(index_dir)
    items = idx.items
    same_groups = (np.array_equal(items.column("group_id").to_numpy(), groups)
                   and np.array_equal(items.column("is_representative").to_numpy(
                       zero_copy_only=False), rep)
                   and np.array_equal(items.column("group_count").to_numpy(), counts[groups]))
    ref = read_index(index_dir / "index.faiss") if (index_dir / IVFDATA_FILE).exists() \
        else None
    reps = np.ascontiguousarray(vecs[rep])
    rng = np.random.default_rng(1)
    q = reps[rng.choice(len(reps), size=min(queries, len(reps)), replace=False)]
    q = np.ascontiguousarray(q + rng.normal(0, 0.02, q.shape).astype(np.float32))
    if ref is not None:  # the same trained quantizer, lists filled in memory at once
        ivf = faiss.extract_index_ivf(ref)
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(lists, True)
        lists.this.disown()
        ref.ntotal = ivf.ntotal = 0
        ref.add(reps)
        params = idx.manifest.get("faiss_params")
        if params:
            faiss.ParameterSpace().set_index_parameters(ref, params)
    else:
        ref = faiss.IndexFlatL2(reps.shape[1])
        ref.add(reps)
    d_ref, i_ref = ref.search(q, k)
    d_got, i_got = idx.index.search(q, k)
    return {"rows": len(groups), "groups": len(counts), "groups_equal_np_unique": same_groups,
            "queries": len(q), "k": k,
            "search_ids_equal": bool(np.array_equal(i_ref, i_got)),
            "search_distances_equal": bool(np.array_equal(d_ref, d_got))}


def _audit_plan(work: Path, index: Path, name: str) -> Path:
    prompts = work / "prompts.txt"
    if not prompts.exists():
        prompts.write_text("".join(f"image {i} take 0\n" for i in range(16)))
    plan = work / f"plan-{name}.toml"
    plan.write_text(f'out = "{work / f"audit-{name}"}"\nmodel = "canary"\n'
                    f'index = "{index}"\ncriteria = ["nl2"]\nmethods = ["cfg"]\nseeds = 4\n'
                    f'steps = 10\nbatch_size = 16\nalignment = "none"\nquality = false\n'
                    f'[[prompts]]\nfile = "{prompts}"\n')
    return plan


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--subset", type=int, default=1_000_000)
    ap.add_argument("--file-rows", type=int, default=1_000_000)
    ap.add_argument("--memory-limit", default="4GB")
    ap.add_argument("--refinalize-limit", default="1.5GB",
                    help="finalise the full set again under this limit ('' to skip)")
    ap.add_argument("--factory", default="IVF1024,PQ8")
    ap.add_argument("--faiss-params", default="nprobe=16")
    ap.add_argument("--shard-rows", type=int, default=65536)
    ap.add_argument("--train-sample", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--no-calibrate", action="store_true")
    ap.add_argument("--skip-audit", action="store_true")
    ap.add_argument("--work", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, payload = args.child
        res = (child_build if kind == "build" else child_audit)(json.loads(payload))
        print(json.dumps(res), flush=True)
        return res

    from memaudit.engine.memory import parse_memory

    limit = parse_memory(args.memory_limit)
    assert limit is not None
    work = Path(args.work or tempfile.mkdtemp(prefix="memaudit-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"rows": args.rows, "subset": args.subset,
                               "factory": args.factory, "memory_limit": args.memory_limit,
                               "cpus": os.cpu_count()}
    try:
        t0 = time.perf_counter()
        files = write_synthetic(work / "data", args.rows, args.file_rows)
        results["write_data_s"] = round(time.perf_counter() - t0, 1)
        write_synthetic(work / "subset", args.subset, args.file_rows, total=args.rows)
        print(json.dumps({"data_files": len(files), "seconds": results["write_data_s"]}),
              flush=True)
        build = {"factory": args.factory, "shard_rows": args.shard_rows,
                 "train_sample": args.train_sample, "faiss_params": args.faiss_params,
                 "memory_limit": args.memory_limit, "calibrate": not args.no_calibrate}
        runs: dict[str, Any] = {}
        sub_src = str(work / "subset")  # the first `subset` rows of the whole set
        res = _run_child("build", {**build, "source": sub_src, "out": str(work / "idx-sub")},
                         env={"MEMAUDIT_INDEX_KEEP_SHARDS": "1"})
        runs["subset"] = _summary("build subset", args.subset, res, limit)
        results["compare_subset"] = compare_in_memory(work / "idx-sub",
                                                      work / "idx-sub.shards", args.queries)
        print(json.dumps({"bench": "in-memory path vs pieces, subset",
                          **results["compare_subset"]}), flush=True)
        res = _run_child("build", {**build, "source": str(work / "data"),
                                   "out": str(work / "idx-all")},
                         env={"MEMAUDIT_INDEX_KEEP_SHARDS": "1"})
        runs["all"] = _summary("build all", args.rows, res, limit)
        m = json.loads((work / "idx-all" / "manifest.json").read_text())
        from memaudit.index import TrainingIndex

        got_counts = TrainingIndex.open(work / "idx-all").groups.table[:, 1]
        want = known_groups(args.rows, args.rows)
        results["known_structure"] = {
            "rows": m["rows"], "groups": m["groups"], "expected_groups": len(want),
            "group_counts_equal": bool(np.array_equal(np.asarray(got_counts), want)),
            "largest_group": int(want.max())}
        print(json.dumps({"bench": "known duplicate structure", **results["known_structure"]}),
              flush=True)
        if args.refinalize_limit:  # both finalisations again, from their shards, tighter
            rlimit = parse_memory(args.refinalize_limit)
            for name, rows, src in (("sub", args.subset, sub_src),
                                    ("all", args.rows, str(work / "data"))):
                idx = work / f"idx-{name}"
                os.replace(idx.with_name(idx.name + ".shards"),
                           idx.with_name(idx.name + ".partial"))
                shutil.rmtree(idx.with_name(idx.name + ".partial") / "grouping")
                before = (idx / "items.parquet").read_bytes()
                res = _run_child("build", {**build, "memory_limit": args.refinalize_limit,
                                           "calibrate": False, "source": src,
                                           "out": str(idx)})
                r = _summary(f"finalise {name} again", rows, res, rlimit)
                r["items_identical"] = before == (idx / "items.parquet").read_bytes()
                runs[f"refinalize_{name}"] = r
                print(json.dumps({"bench": f"refinalise {name}: items identical",
                                  "items_identical": r["items_identical"]}), flush=True)
        for name in ("sub", "all"):
            shutil.rmtree(work / f"idx-{name}.shards", ignore_errors=True)
        results["builds"] = runs
        if not args.skip_audit and not args.no_calibrate:
            audits = {}
            for name, rows in (("sub", args.subset), ("all", args.rows)):
                res = _run_child("audit", {"plan": str(_audit_plan(work, work / f"idx-{name}",
                                                                   name))})
                audits[name] = {"bench": f"audit ({name})", "index_rows": rows,
                                "seconds": res["seconds"], "units": res["units"],
                                "peak_rss_mib": _mib(res["peak_rss"]),
                                "peak_anon_sampled_mib": _mib(res["peak_anon_sampled"]),
                                "peak_file_sampled_mib": _mib(res["peak_file_sampled"])}
                print(json.dumps(audits[name]), flush=True)
            audits["ratio_all_over_subset"] = round(
                audits["all"]["peak_rss_mib"] / audits["sub"]["peak_rss_mib"], 3)
            results["audits"] = audits
        growth = {"bench": "peak growth, subset -> all"}
        for key, (x, y) in {"build": ("subset", "all"),
                            "refinalize": ("refinalize_sub", "refinalize_all")}.items():
            if x in runs and y in runs:
                growth[key] = {"limit_mib": runs[y]["limit_mib"],
                               "subset_mib": runs[x]["peak_rss_mib"],
                               "all_mib": runs[y]["peak_rss_mib"],
                               "ratio": round(runs[y]["peak_rss_mib"]
                                              / runs[x]["peak_rss_mib"], 3)}
        if "audits" in results:
            growth["audit_ratio"] = results["audits"]["ratio_all_over_subset"]
        results["peak_growth"] = growth
        print(json.dumps(growth), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
