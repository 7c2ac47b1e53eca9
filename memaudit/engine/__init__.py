"""Where work runs: the engines (`--engine local|ray`).

An engine maps a *worker factory* over a list of work items and yields the results in item
order; it decides only where the work is computed. The work itself is the same function on
every engine: one index shard (`memaudit.index.shards.build_shard`) or one audit unit
(`memaudit.audit.units`), and the driver keeps everything that must have one writer (shard
bookkeeping and finalisation, the DuckDB transactions).

- `local`: one worker in this process (the factory is called once, here).
- `ray`: a pool of Ray actors, each holding one worker (one model replica per GPU, or one
  per CPU), spread over the nodes of a local Ray instance or a cluster
  (`--address auto|HOST:PORT`); a lost actor's items are computed again by the others.
  Needs the optional extra `memaudit[ray]`.

A factory is a picklable callable `factory(device) -> worker`, `worker(item) -> result`;
items and results are picklable and small (paths, ids, scores), never images or tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from memaudit.common import UserError, resolve_device

ENGINES = ("local", "ray")

Factory = Callable[[str], Callable[[Any], Any]]


class LocalEngine:
    """Runs every item in this process, one after the other."""

    name = "local"

    def __init__(self, device: str | None = None):
        self.device = device

    def worker_device(self) -> str:
        """The device the workers use (the driver's own here)."""
        return resolve_device(self.device)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def map(self, factory: Factory, items: Sequence[Any], cpus: int = 1) -> Iterator[Any]:
        if not items:
            return
        worker = factory(self.worker_device())
        for item in items:
            yield worker(item)

    def close(self) -> None:
        pass


def make_engine(name: str | None = "local", address: str | None = None,
                actors: int | None = None, device: str | None = None):
    """The engine called `name` ("local" or "ray"); `address` and `actors` are Ray's."""
    name = name or "local"
    if name == "local":
        if address is not None or actors is not None:
            raise UserError("--address and --actors need --engine ray")
        return LocalEngine(device)
    if name == "ray":
        from memaudit.engine.ray_engine import RayEngine

        return RayEngine(address=address, actors=actors, device=device)
    raise UserError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Factory", "LocalEngine", "make_engine"]
