"""The Ray engine: work items on a pool of Ray actors (`memaudit[ray]`).

Each actor calls the factory once (loads one model replica: on its GPU when the cluster has
GPUs, else on CPU) and then runs items one at a time. The driver hands each ready actor up
to two items at a time, keeps what comes back, and yields the results in item order, so it
writes exactly what a local run writes, in the same order. Actors are spread over the nodes
(`SPREAD`). An actor that dies (its node lost, its process killed) is not restarted in place:
its unfinished items go back to the queue, to the actors left, and a replacement actor is
asked for, which takes work once it has started wherever the cluster has room; every item's
result is yielded exactly once. Paths in the items must be visible to every node (a shared
filesystem mounted at the same path), like the inputs themselves.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

from memaudit.common import UserError

#: Seconds to wait for a cluster's address to answer before giving up (Ray itself retries
#: for many minutes when nothing listens); MEMAUDIT_RAY_CONNECT_TIMEOUT overrides.
CONNECT_TIMEOUT_S = 15.0


def probe_address(address: str, timeout: float | None = None) -> None:
    """A one-line `UserError` unless something answers at `HOST:PORT` (or `ray://HOST:PORT`)
    within `timeout` seconds: called before anything is written, so a wrong or dead address
    fails at once instead of leaving Ray retrying and a half-started build behind. `auto`
    (a cluster this machine knows) is left to Ray, which fails fast when there is none."""
    import os
    import socket

    if address == "auto":
        return
    if timeout is None:
        timeout = float(os.environ.get("MEMAUDIT_RAY_CONNECT_TIMEOUT", CONNECT_TIMEOUT_S))
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--address must be auto or HOST:PORT of a running Ray cluster, got "
                        f"{address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except TimeoutError:
        raise UserError(f"cannot join Ray at {address}: no answer within {timeout:g} s "
                        "(is the cluster running and the port open?)") from None
    except OSError as e:
        raise UserError(f"cannot join Ray at {address}: {e.strerror or e} (is a Ray cluster "
                        "running there? start one with `ray start --head`)") from None


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

    def ready(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, item: bytes) -> bytes:
        if self.failed is not None:
            return pickle.dumps(self.failed, protocol=5)
        try:
            result = self.worker(pickle.loads(item))
        except UserError as e:
            result = _Failed(e)
        return pickle.dumps(result, protocol=5)


#: items handed to one actor at a time (one running, one waiting: the actor never idles)
_IN_FLIGHT = 2
#: an actor that dies while starting this many times in a row ends the map
_MAX_START_FAILURES = 3


class RayEngine:
    """Items on Ray actors (see the module docstring). `address`: None starts a local Ray
    instance (or uses the one this process already joined), "auto" or "HOST:PORT" joins a
    cluster; `actors`: the pool size (default: one per GPU, else one per CPU)."""

    name = "ray"

    def __init__(self, address: str | None = None, actors: int | None = None,
                 device: str | None = None):
        #: items computed per Ray node id in the last `map` (which nodes did the work)
        self.nodes_used: dict[str, int] = {}
        if actors is not None and actors < 1:
            raise UserError("--actors must be at least 1")
        if address is not None:
            probe_address(address)  # at once, before Ray retries for minutes
        self.ray = _import_ray()
        self.address = address
        self.requested_actors = actors
        self.device = device
        self._started = False
        self._plan: dict[str, Any] | None = None
        if address is not None:  # join now: a failed join leaves nothing written (.partial)
            self._connect()

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
                **({"nodes": len(self.nodes_used)} if self.nodes_used else {})}

    # -- the work --------------------------------------------------------------------------
    def _new_actor(self, factory_ref, p: dict[str, Any]):
        ray = self.ray
        opts: dict[str, Any] = {"num_cpus": p["cpus_per_actor"], "max_restarts": 0,
                                "scheduling_strategy": "SPREAD"}
        if p["gpus_per_actor"]:
            opts["num_gpus"] = 1
        actor = ray.remote(_Actor).options(**opts).remote(
            factory_ref, self.worker_device(), int(p["cpus_per_actor"]))
        return actor, actor.ready.remote()

    def map(self, factory, items: Sequence[Any], cpus: int = 1) -> Iterator[Any]:
        """Results of `factory(device)(item)` for every item, in item order (module
        docstring: lost actors' items are computed again by the others)."""
        if not items:
            return
        ray = self.ray
        from ray.exceptions import RayActorError

        p = self._connect()
        factory_ref = ray.put(factory)
        todo = list(range(len(items)))  # indices not yet handed out (front: first)
        starting: dict[Any, Any] = {}  # ready ref -> actor
        busy: dict[Any, tuple[Any, int]] = {}  # result ref -> (actor, item index)
        load: dict[Any, int] = {}  # live actor -> items handed to it
        node_of: dict[Any, str] = {}
        results: dict[int, Any] = {}
        start_failures, nxt = 0, 0
        self.nodes_used = {}
        for _ in range(min(p["actors"], len(items))):
            a, ref = self._new_actor(factory_ref, p)
            starting[ref] = a
        try:
            while nxt < len(items):
                for a in [a for a, n in load.items() if n < _IN_FLIGHT]:
                    while todo and load[a] < _IN_FLIGHT:
                        i = todo.pop(0)
                        busy[a.run.remote(pickle.dumps(items[i], protocol=5))] = (a, i)
                        load[a] += 1
                ready, _ = ray.wait([*starting, *busy], num_returns=1)
                ref = ready[0]
                if ref in starting:
                    a = starting.pop(ref)
                    try:
                        node_of[a] = ray.get(ref)
                        load[a] = 0
                        start_failures = 0
                    except RayActorError:  # died while starting (its node lost...)
                        start_failures += 1
                        if start_failures > _MAX_START_FAILURES:
                            raise
                        a, r = self._new_actor(factory_ref, p)
                        starting[r] = a
                    continue
                a, i = busy.pop(ref)
                try:
                    out = pickle.loads(ray.get(ref))
                except RayActorError:  # lost: its items back to the queue, a replacement
                    lost = sorted([i] + [j for r, (b, j) in list(busy.items()) if b is a])
                    for r in [r for r, (b, _) in busy.items() if b is a]:
                        del busy[r]
                    load.pop(a, None)
                    todo = sorted(set(todo) | set(lost))
                    a2, r2 = self._new_actor(factory_ref, p)
                    starting[r2] = a2
                    continue
                load[a] -= 1
                results[i] = out
                node = node_of.get(a, "")
                self.nodes_used[node] = self.nodes_used.get(node, 0) + 1
                while nxt in results:
                    result = results.pop(nxt)
                    nxt += 1
                    if isinstance(result, _Failed):
                        raise UserError(result.message, result.exit_code)
                    yield result
        finally:
            for a in [*load, *starting.values()]:
                ray.kill(a, no_restart=True)

    def close(self) -> None:
        """Shut down the Ray instance this engine started (not one it joined)."""
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False
        self._plan = None
