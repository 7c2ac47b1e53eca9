"""The Ray engine: work items on a pool of Ray actors through Ray Data (`memaudit[ray]`).

Each actor calls the factory once (loads one model replica: on its GPU when the cluster has
GPUs, else on CPU) and then runs items one at a time; Ray Data streams the items to the pool
and the results back to the driver in item order (`preserve_order`), so the driver writes
exactly what a local run writes, in the same order. Paths in the items must be visible to
every node (a shared filesystem mounted at the same path), like the inputs themselves.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

from memaudit.common import UserError


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UserError("--engine ray needs Ray: pip install 'memaudit[ray]'") from e
    return ray


class _Failed:
    """A `UserError` raised in a worker, carried back as a result (Ray's exception wrappers
    keep only its text inside a traceback)."""

    def __init__(self, err: UserError):
        self.message, self.exit_code = str(err), err.exit_code


class _Actor:
    """One Ray actor: one worker (model replica) built by the factory."""

    def __init__(self, factory, device: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.failed: _Failed | None = None
        try:
            self.worker = factory(device)
        except UserError as e:  # e.g. missing weights: reported by the first item
            self.failed = _Failed(e)

    def _run(self, item: Any) -> Any:
        if self.failed is not None:
            return self.failed
        try:
            return self.worker(item)
        except UserError as e:
            return _Failed(e)

    def __call__(self, batch):
        import pyarrow as pa
        import ray

        out = [pickle.dumps(self._run(pickle.loads(b)), protocol=5)
               for b in batch.column("item").to_pylist()]
        node = ray.get_runtime_context().get_node_id()
        return pa.table({"i": batch.column("i"), "r": pa.array(out, pa.binary()),
                         "node": pa.array([node] * len(out), pa.string())})


class RayEngine:
    """Items on Ray actors (see the module docstring). `address`: None starts a local Ray
    instance (or uses the one this process already joined), "auto" or "HOST:PORT" joins a
    cluster; `actors`: the pool size (default: one per GPU, else one per CPU)."""

    name = "ray"

    def __init__(self, address: str | None = None, actors: int | None = None,
                 device: str | None = None, memory: int | None = None):
        self.ray = _import_ray()
        #: bytes each actor reserves (Ray's `memory` resource; --memory-limit), or None
        self.memory = memory
        #: items computed per Ray node id in the last `map` (which nodes did the work)
        self.nodes_used: dict[str, int] = {}
        if actors is not None and actors < 1:
            raise UserError("--actors must be at least 1")
        self.address = address
        self.requested_actors = actors
        self.device = device
        self._started = False
        self._plan: dict[str, Any] | None = None

    # -- the cluster -----------------------------------------------------------------------
    def _connect(self) -> dict[str, Any]:
        ray = self.ray
        if self._plan is not None:
            return self._plan
        if not ray.is_initialized():
            try:
                if self.address is None:
                    ray.init(include_dashboard=False, logging_level=logging.WARNING,
                             configure_logging=False)
                else:
                    ray.init(address=self.address, logging_level=logging.WARNING,
                             configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = self.address or "a local instance"
                raise UserError(f"cannot start or join Ray at {where}: "
                                f"{str(e).strip().splitlines()[0]}") from e
            self._started = True
        res = ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 1.0)), int(res.get("GPU", 0))
        dev = (self.device or "auto").lower()
        if dev.startswith("cuda") and gpus == 0:
            raise UserError(f"device {self.device!r} requested but the Ray cluster has no GPU")
        use_gpu = gpus > 0 and dev != "cpu"
        actors = self.requested_actors or (gpus if use_gpu else max(1, int(cpus)))
        if use_gpu and actors > gpus:
            raise UserError(f"--actors {actors} but the Ray cluster has {gpus} GPUs "
                            "(one model replica per GPU)")
        per = cpus / actors if actors > cpus else float(max(1, math.floor(cpus / actors)))
        self._plan = {"actors": actors, "gpus_per_actor": 1 if use_gpu else 0,
                      "cpus_per_actor": per, "cluster_cpus": cpus, "cluster_gpus": gpus}
        return self._plan

    def worker_device(self) -> str:
        return "cuda" if self._connect()["gpus_per_actor"] else "cpu"

    def describe(self) -> dict[str, Any]:
        p = self._connect()
        return {"name": self.name, "address": self.address or "local",
                "actors": p["actors"], "gpus_per_actor": p["gpus_per_actor"],
                "cpus_per_actor": p["cpus_per_actor"],
                **({"memory_per_actor": self.memory} if self.memory else {}),
                **({"nodes": len(self.nodes_used)} if self.nodes_used else {})}

    # -- the work --------------------------------------------------------------------------
    def map(self, factory, items: Sequence[Any], cpus: int = 1) -> Iterator[Any]:
        """Results of `factory(device)(item)` for every item, in item order."""
        if not items:
            return
        import ray.data

        p = self._connect()
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        ctx.execution_options.preserve_order = True
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ctx.enable_progress_bars = False
        try:
            rows = [{"i": i, "item": pickle.dumps(it, protocol=5)} for i, it in enumerate(items)]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            gpu = {"num_gpus": 1} if p["gpus_per_actor"] else {}
            mem = {"memory": int(self.memory)} if self.memory else {}
            # replicas spread over the nodes; an actor lost with its node is restarted
            # elsewhere and its item retried (Ray Data's defaults: max_restarts and
            # max_task_retries -1), so a node loss costs time, not results
            ds = ds.map_batches(
                _Actor, fn_constructor_args=(factory, self.worker_device(),
                                             int(p["cpus_per_actor"])),
                batch_size=1, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=min(p["actors"], len(rows))),
                num_cpus=p["cpus_per_actor"], scheduling_strategy="SPREAD", **gpu, **mem)
            expect = 0
            self.nodes_used = {}
            for row in ds.iter_rows():
                if row["i"] != expect:  # preserve_order is a contract; check it
                    raise RuntimeError(f"Ray returned item {row['i']}, expected {expect}")
                expect += 1
                self.nodes_used[row["node"]] = self.nodes_used.get(row["node"], 0) + 1
                result = pickle.loads(row["r"])
                if isinstance(result, _Failed):
                    raise UserError(result.message, result.exit_code)
                yield result
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved

    def close(self) -> None:
        """Shut down the Ray instance this engine started (not one it joined)."""
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False
        self._plan = None
