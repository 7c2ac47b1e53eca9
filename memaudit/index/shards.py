"""One shard of an index build: the unit of work every engine computes (issue 9).

Input rows are cut into shards of `shard_rows`; `build_shard(spec, k, embedder)` reads shard
k's rows (memaudit.data.training_set, any layout), decodes + preprocesses + hashes them
in worker threads ahead of the model, embeds them, and saves the shard's files under
`DIR.partial/` (each written to a temporary name then renamed; the `.json` marker last, so a
shard with a marker is complete). The local engine calls it in this process, the Ray engine
on actors that each hold one model replica (`ShardFactory`); `memaudit.index.build` then
finalises from the shard files alone. Format: docs/index-format.md.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memaudit.data.parquet import decode_image
from memaudit.data.training_set import iter_training_batches
from memaudit.index.training_index import write_json_atomic

#: timings of the last build in this process (read by `memaudit index bench`): seconds the
#: model loop waited for decoded batches, and seconds spent in the model
last_build_stats: dict[str, float] = {}


@dataclass
class ShardSpec:
    """Everything a worker needs to produce any shard of one build (picklable)."""

    partial: Path
    source: str
    files: list[Path]
    counts: list[int]
    cols: dict[str, str | None]
    shard_rows: int
    total: int
    batch_size: int
    workers: int | None = None  # decoding threads (None: the worker's torch threads)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nshards(self) -> int:
        return -(-self.total // self.shard_rows)


def _pixel_hash(t) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(tuple(t.shape)).encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.digest()


def _prepare(embedder, rows) -> list[tuple[Any, Any, str | None, bytes, bytes]]:
    """Worker thread: decode + preprocess + hash one batch of rows."""
    out = []
    for r in rows:
        content = hashlib.sha256(r.image_bytes or b"").digest()
        img, reason = decode_image(r.image_bytes) if r.skip is None else (None, r.skip)
        t = None
        phash = b""
        if img is not None:
            try:
                t = embedder.preprocess(img)
                phash = _pixel_hash(t)
            except Exception:
                t, reason = None, "undecodable"
        out.append((r, t, reason, phash, content))
    return out


def prepared_batches(embedder, batches: Iterator[list], workers: int,
                     prefetch: int) -> Iterator[list]:
    """Read in a producer thread, decode/preprocess in `workers` threads, yield in order with
    up to `prefetch` batches ready ahead of the consumer (the model)."""
    q: queue.Queue[Future | BaseException | None] = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    with ThreadPoolExecutor(max_workers=max(1, workers),
                            thread_name_prefix="memaudit-decode") as ex:
        def produce() -> None:
            try:
                for b in batches:
                    if stop.is_set():
                        return
                    q.put(ex.submit(_prepare, embedder, b))
                q.put(None)
            except BaseException as e:  # surfaced in the consumer
                q.put(e)

        th = threading.Thread(target=produce, daemon=True, name="memaudit-read")
        th.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                res = item.result()
                last_build_stats["wait_s"] = (last_build_stats.get("wait_s", 0.0)
                                              + time.perf_counter() - t0)
                yield res
        finally:
            stop.set()
            while th.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            th.join()


class _Shard:
    def __init__(self, k: int):
        self.k = k
        self.items: list[tuple[str, str, str, int]] = []
        self.tensors: list = []  # preprocessed, waiting for a full model batch
        self.emb_parts: list[np.ndarray] = []
        self.shape_counts: dict[tuple[int, ...], int] = {}
        self.hashes: list[bytes] = []
        self.skipped: list[dict[str, Any]] = []
        self.digest = hashlib.sha256()

    def flush(self, embedder, batch_size: int) -> None:
        """Run the model on the waiting tensors."""
        if self.tensors:
            t0 = time.perf_counter()
            self.emb_parts.append(embedder.embed_list(self.tensors, batch_size))
            last_build_stats["model_s"] = (last_build_stats.get("model_s", 0.0)
                                           + time.perf_counter() - t0)
            self.tensors = []
            self.shape_counts = {}


def shard_paths(partial: Path, k: int) -> dict[str, Path]:
    base = partial / f"shard_{k:06d}"
    return {"emb": base.with_suffix(".emb.npy"), "hash": base.with_suffix(".hash.npy"),
            "items": base.with_suffix(".items.parquet"), "done": base.with_suffix(".json")}


def save_shard(partial: Path, shard: _Shard, embedder, batch_size: int) -> None:
    p = shard_paths(partial, shard.k)
    shard.flush(embedder, batch_size)
    emb = (np.concatenate(shard.emb_parts) if shard.emb_parts
           else np.zeros((0, embedder.dim), np.float32))
    hashes = (np.frombuffer(b"".join(shard.hashes), dtype=np.uint8).reshape(-1, 16)
              if shard.hashes else np.zeros((0, 16), np.uint8))
    for name, arr in (("emb", emb), ("hash", hashes)):
        tmp = p[name].with_name(p[name].name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, p[name])
    cols = list(zip(*shard.items, strict=True)) if shard.items else [[], [], [], []]
    table = pa.table({"key": pa.array(cols[0], pa.string()),
                      "caption": pa.array(cols[1], pa.string()),
                      "source_file": pa.array(cols[2], pa.string()),
                      "source_row": pa.array(cols[3], pa.int64())})
    tmp = p["items"].with_name(p["items"].name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, p["items"])
    write_json_atomic(p["done"], {"shard": shard.k, "items": len(shard.items),
                                  "skipped": shard.skipped,
                                  "content_digest": shard.digest.hexdigest()})


def build_shard(spec: ShardSpec, k: int, embedder,
                advance: Callable[[int], Any] | None = None) -> dict[str, int]:
    """Produce shard k (input rows [k * shard_rows, (k + 1) * shard_rows)) and save it."""
    start, stop = k * spec.shard_rows, min(spec.total, (k + 1) * spec.shard_rows)
    workers = spec.workers
    if workers is None:
        import torch

        workers = torch.get_num_threads()
    batches = iter_training_batches(spec.source, batch_rows=spec.batch_size, start_row=start,
                                    stop_row=stop, files=spec.files, counts=spec.counts,
                                    **spec.cols)
    shard = _Shard(k)
    batch_size = spec.batch_size
    for prepared in prepared_batches(embedder, batches, workers, 2 * workers):
        for r, t, reason, phash, content in prepared:
            shard.digest.update(r.key.encode() + b"\0" + r.caption.encode() + b"\0" + content)
            if t is None:
                shard.skipped.append({"key": r.key, "reason": reason, "row": r.row})
                continue
            shard.items.append((r.key, r.caption, r.source_file, r.source_row))
            shard.tensors.append(t)
            shard.hashes.append(phash)
            shape = tuple(t.shape)
            shard.shape_counts[shape] = shard.shape_counts.get(shape, 0) + 1
            # full model batches: one shape reached batch_size (aspect-keeping preprocessing
            # gives several shapes; wait for up to 4 batches' worth to group them)
            if (shard.shape_counts[shape] >= batch_size
                    or len(shard.tensors) >= 4 * batch_size):
                shard.flush(embedder, batch_size)
        if advance is not None:
            advance(len(prepared))
    save_shard(spec.partial, shard, embedder, batch_size)
    return {"shard": k, "rows": stop - start, "items": len(shard.items)}


class ShardFactory:
    """The engines' worker factory for index builds: `factory(device)` builds the embedder
    (one model replica) and returns `worker(k) -> build_shard(...)` stats. In this process it
    reuses the driver's embedder and progress callback, which are not pickled."""

    def __init__(self, spec: ShardSpec, embedder_name: str, embedder_config: dict[str, Any],
                 embedder=None, advance: Callable[[int], Any] | None = None):
        self.spec = spec
        self.embedder_name = embedder_name
        self.embedder_config = dict(embedder_config)
        self.embedder = embedder
        self.advance = advance

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "embedder": None, "advance": None}

    def __call__(self, device: str) -> Callable[[int], dict[str, int]]:
        emb = self.embedder
        if emb is None:
            from memaudit.embedders import make_embedder

            emb = make_embedder(self.embedder_name, **{**self.embedder_config,
                                                       "device": device})
        return lambda k: build_shard(self.spec, k, emb, self.advance)
