"""`python -m memaudit.engine.bench`: the Ray engine against the local one on this machine.

The same work through both engines, interleaved (local, ray, local, ray...) so that a shared
machine's load falls on both alike; the best time of each is kept and the ratio of
throughputs (ray / local) printed as JSON lines (docs/benchmarks.md "Engines"):

1. index builds of `--rows` synthetic 64x64 JPEGs: the `pixels` embedder (16x16; decoding
   bound, so the engine's overhead shows) and a small SSCD-like model (ResNet-18 trunk at
   short edge 64; model bound);
2. an audit of the shipped canary (cfg, nl2) on the canary prompts x `--seeds` seeds, with
   the default quality stage (its `quality|cfg` unit runs on the driver in both cases).

Ray runs on a local instance over all cores (started once, its start-up time reported
apart); each Ray build or audit includes starting its actors and loading their model. Ray
starts its workers at niceness 15 (they yield to every other process); the bench sets
`RAY_worker_niceness=0` unless given, so that on a shared machine both engines compete for
the CPU on equal terms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def _best(times: list[float]) -> float:
    return min(times)


def bench_builds(rows: int, repeat: int, ray_engine: Any, work: Path) -> list[dict[str, Any]]:
    from memaudit.engine import LocalEngine
    from memaudit.index import build_index
    from memaudit.index.bench import small_sscd_like, synthetic_parquet

    src = synthetic_parquet(work / "build.parquet", rows, size=64)
    weights = small_sscd_like(work / "sscd_small.torchscript.pt")
    cases = [("pixels", {"size": 16}), ("sscd", {"weights": str(weights), "short_edge": 64})]
    out = []
    for embedder, opts in cases:
        times: dict[str, list[float]] = {"local": [], "ray": []}
        for _ in range(repeat):
            for name, eng in (("local", LocalEngine("cpu")), ("ray", ray_engine)):
                t0 = time.perf_counter()
                build_index(src, embedder, work / f"idx-{name}", device="cpu", batch_size=64,
                            embedder_opts=opts, calibrate=False, overwrite=True,
                            shard_rows=2048, engine=eng)
                times[name].append(time.perf_counter() - t0)
        loc, ray = _best(times["local"]), _best(times["ray"])
        r = {"bench": "index build", "embedder": embedder, "rows": rows, "shard_rows": 2048,
             "local_rows_per_s": round(rows / loc, 1), "ray_rows_per_s": round(rows / ray, 1),
             "ray_over_local": round(loc / ray, 3),
             "local_s": [round(t, 1) for t in times["local"]],
             "ray_s": [round(t, 1) for t in times["ray"]]}
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


def bench_audit(seeds: int, repeat: int, ray_engine: Any, work: Path) -> dict[str, Any]:
    from memaudit.audit import load_plan, run_audit
    from memaudit.canary.data import build_canary_data
    from memaudit.data.prompts import read_prompts
    from memaudit.engine import LocalEngine
    from memaudit.index import build_index

    data = work / "canary-data"
    build_canary_data(data)
    index = build_index(data / "train.parquet", "pixels", work / "canary-index", device="cpu")
    lists = sorted(data.glob("*.txt"))
    prompts = "".join(f'[[prompts]]\nfile = "{p}"\n' for p in lists)
    n_prompts = len({r.text for p in lists for r in read_prompts(p)})
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for i in range(repeat):
        for name, eng in (("local", LocalEngine("cpu")), ("ray", ray_engine)):
            plan = work / f"plan-{name}-{i}.toml"
            plan.write_text(f'out = "{work / f"audit-{name}-{i}"}"\nmodel = "canary"\n'
                            f'index = "{index}"\ncriteria = ["nl2"]\nmethods = ["cfg"]\n'
                            f"seeds = {seeds}\nsteps = 20\nbatch_size = 16\n"
                            f'alignment = "none"\n{prompts}')
            t0 = time.perf_counter()
            res = run_audit(load_plan(plan), device="cpu", engine=eng)
            times[name].append(time.perf_counter() - t0)
    loc, ray = _best(times["local"]), _best(times["ray"])
    r = {"bench": "audit", "model": "canary (shipped)", "prompts": n_prompts, "seeds": seeds,
         "steps": 20, "units": res.units_done, "images": n_prompts * seeds,
         "local_units_per_s": round(res.units_done / loc, 3),
         "ray_units_per_s": round(res.units_done / ray, 3),
         "ray_over_local": round(loc / ray, 3),
         "local_s": [round(t, 1) for t in times["local"]],
         "ray_s": [round(t, 1) for t in times["ray"]]}
    print(json.dumps(r), flush=True)
    return r


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--seeds", type=int, default=16, help="audit: seeds per prompt")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-audit", action="store_true")
    args = ap.parse_args(argv)

    import ray
    import torch

    from memaudit.engine.ray_engine import RayEngine

    os.environ.setdefault("MEMAUDIT_QUIET", "1")
    os.environ.setdefault("RAY_worker_niceness", "0")
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    info = {"cpus": os.cpu_count(), "torch_threads_local": torch.get_num_threads(),
            "ray_init_s": round(time.perf_counter() - t0, 1),
            "python": platform.python_version(), "ray": ray.__version__,
            "ray_worker_niceness": os.environ["RAY_worker_niceness"]}
    eng = RayEngine(device="cpu")
    info["ray_engine"] = eng.describe()
    print(json.dumps(info), flush=True)
    results: dict[str, Any] = {"info": info}
    try:
        with tempfile.TemporaryDirectory(prefix="memaudit-engine-bench-") as tmp:
            if not args.skip_build:
                results["build"] = bench_builds(args.rows, args.repeat, eng, Path(tmp))
            if not args.skip_audit:
                results["audit"] = bench_audit(args.seeds, args.repeat, eng, Path(tmp))
    finally:
        ray.shutdown()
    return results


if __name__ == "__main__":
    main()
