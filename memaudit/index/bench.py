"""`memaudit index bench`: index-build benchmarks (issue 2, "Performance"); figures go to
docs/benchmarks.md, never into a timed test.

1. Throughput: whole `build_index` (Parquet read + JPEG decode + preprocess in worker
   threads + model + shard writes + faiss) vs the bare embedder forward on pre-decoded,
   pre-preprocessed tensors, same batch size and device. Goal: ratio >= 0.9. Run for the
   `pixels` embedder and a small SSCD-like TorchScript model (ResNet-18 trunk + GeM p=3 +
   Linear(512, 512) + L2 norm, random weights) through the `sscd` embedder.
2. Peak memory (VmHWM of a fresh subprocess per build) building a pixels index from
   N1 vs N2 rows of small synthetic images, with the index vectors' own bytes subtracted;
   reported both as whole-process peaks and as growth above the import baseline (a
   subprocess that only imports torch/faiss/pyarrow/memaudit). Goal: ratio <= 1.3.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_parquet(path: Path, rows: int, size: int = 64, fmt: str = "JPEG",
                      seed: int = 0, row_group: int = 1000) -> Path:
    """`rows` distinct smooth random images (size x size) as encoded bytes, written in
    row groups (streamed: never all images in memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    schema = pa.schema([("jpg", pa.binary()), ("caption", pa.string()), ("key", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            blobs = []
            for _ in range(n):
                small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(small)
                if size != 8:
                    img = img.resize((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
                blobs.append(buf.getvalue())
            w.write_table(pa.table({
                "jpg": pa.array(blobs, pa.binary()),
                "caption": pa.array([f"synthetic {start + i}" for i in range(n)]),
                "key": pa.array([f"s{start + i:07d}" for i in range(n)]),
            }, schema=schema))
    return path


def small_sscd_like(path: Path) -> Path:
    """ResNet-18 trunk + GeM (p=3) + Linear(512, 512) + L2 norm, random weights, scripted."""
    import torch
    import torchvision

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            r = torchvision.models.resnet18(weights=None)
            self.trunk = torch.nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1,
                                             r.layer2, r.layer3, r.layer4)
            self.proj = torch.nn.Linear(512, 512)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.trunk(x).clamp(min=1e-6).pow(3.0)
            x = torch.nn.functional.adaptive_avg_pool2d(x, 1).pow(1.0 / 3.0).flatten(1)
            return torch.nn.functional.normalize(self.proj(x), dim=-1)

    torch.jit.script(Net().eval()).save(str(path))
    return path


def bench_throughput(source: Path, embedder: str, opts: dict, batch_size: int,
                     device: str | None, work: Path, repeat: int = 3) -> dict:
    """rows/s of build_index vs the bare forward on pre-decoded tensors; the two are
    measured alternately `repeat` times and the best of each is kept (shared machines)."""
    import torch

    from memaudit.data.parquet import decode_image, iter_training_rows
    from memaudit.embedders import make_embedder
    from memaudit.index import build_index

    emb = make_embedder(embedder, device=device, **opts)
    tensors = [emb.preprocess(decode_image(r.image_bytes)[0])
               for r in iter_training_rows(source)]
    n = len(tensors)
    batches = [torch.stack(tensors[i:i + batch_size]) for i in range(0, n, batch_size)]
    del tensors
    emb.embed_batch(batches[0])  # warm-up
    bare_t: list[float] = []
    build_t: list[float] = []
    stats: list[dict] = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        for b in batches:
            emb.embed_batch(b)
        bare_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        build_index(source, embedder, work / f"idx-{embedder}", device=device,
                    batch_size=batch_size, embedder_opts=opts, calibrate=False,
                    overwrite=True)
        build_t.append(time.perf_counter() - t0)
        from memaudit.index.build import last_build_stats

        stats.append(dict(last_build_stats))
    bare, whole = min(bare_t), min(build_t)
    best = stats[build_t.index(whole)]
    return {"embedder": embedder, "rows": n, "batch_size": batch_size, "repeat": repeat,
            "bare_rows_per_s": round(n / bare, 1), "build_rows_per_s": round(n / whole, 1),
            "ratio": round(bare / whole, 3),
            "bare_s": [round(t, 2) for t in bare_t], "build_s": [round(t, 2) for t in build_t],
            "best_build_model_s": round(best.get("model_s", 0.0), 3),
            "best_build_wait_for_decode_s": round(best.get("wait_s", 0.0), 3)}


_PEAK = """
def _peak_kb():
    # VmHWM: this process image's peak RSS (ru_maxrss would keep the parent's across exec)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

_MEM_CHILD = _PEAK + """
import json, sys
from memaudit.index import build_index
src, out = sys.argv[1], sys.argv[2]
build_index(src, "pixels", out, batch_size=256, shard_rows=4096, calibrate=False,
            embedder_opts={"size": 8}, overwrite=True)
peak = _peak_kb()
m = json.load(open(out + "/manifest.json"))
print(json.dumps({"maxrss_kb": peak, "vector_bytes": m["groups"] * m["dim"] * 4,
                  "rows": m["rows"]}))
"""

_BASE_CHILD = _PEAK + """
import json
import memaudit.index, memaudit.embedders.pixels, faiss, torch, pyarrow.parquet  # noqa
print(json.dumps({"maxrss_kb": _peak_kb()}))
"""


def bench_memory(rows: tuple[int, ...], work: Path) -> dict:
    """Peak RSS of a subprocess building a pixels index from each row count."""
    res: dict = {"runs": []}
    base = json.loads(subprocess.run([sys.executable, "-c", _BASE_CHILD], check=True,
                                     capture_output=True, text=True).stdout)
    base_bytes = base["maxrss_kb"] * 1024
    res["import_baseline_mb"] = round(base_bytes / 2**20, 1)
    for n in rows:
        src = synthetic_parquet(work / f"mem{n}.parquet", n, size=8, fmt="PNG", seed=n)
        r = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(src), str(work / f"m{n}")],
                           check=True, capture_output=True, text=True,
                           env={**os.environ, "MEMAUDIT_QUIET": "1"})
        d = json.loads(r.stdout.strip().splitlines()[-1])
        peak = d["maxrss_kb"] * 1024
        res["runs"].append({"rows": n, "peak_mb": round(peak / 2**20, 1),
                            "vector_mb": round(d["vector_bytes"] / 2**20, 1),
                            "peak_minus_vectors_mb": round((peak - d["vector_bytes"]) / 2**20,
                                                           1),
                            "build_mb": round((peak - base_bytes - d["vector_bytes"]) / 2**20,
                                              1)})
    if len(res["runs"]) >= 2:
        a, b = res["runs"][0], res["runs"][-1]
        res["ratio_minus_vectors"] = round(b["peak_minus_vectors_mb"]
                                           / a["peak_minus_vectors_mb"], 3)
        if a["build_mb"] > 0:  # growth above the import baseline, vectors excluded
            res["ratio_build_minus_vectors"] = round(b["build_mb"] / a["build_mb"], 3)
    return res


def run_bench(rows: int = 2000, batch_size: int = 64,
              mem_rows: tuple[int, ...] = (10_000, 100_000), device: str | None = None,
              memory: bool = True, throughput: bool = True, repeat: int = 3) -> dict:
    """Run the benchmarks and print the figures as JSON lines (pasted into docs)."""
    import platform

    import torch

    from memaudit.common import resolve_device

    device = resolve_device(device)
    results: dict = {"device": device, "torch_threads": torch.get_num_threads(),
                     "machine": platform.machine(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="memaudit-bench-") as tmp:
        work = Path(tmp)
        if throughput:
            src = synthetic_parquet(work / "tp.parquet", rows, size=64)
            weights = small_sscd_like(work / "sscd_small.torchscript.pt")
            results["throughput"] = [
                bench_throughput(src, "pixels", {"size": 64}, batch_size, device, work, repeat),
                bench_throughput(src, "sscd", {"weights": str(weights), "short_edge": 64},
                            batch_size, device, work, repeat),
            ]
            for r in results["throughput"]:
                print(json.dumps(r), flush=True)
        if memory:
            results["memory"] = bench_memory(mem_rows, work)
            print(json.dumps(results["memory"]), flush=True)
    return results
