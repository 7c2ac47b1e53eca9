"""The engine registry and the local engine (the Ray engine: tests/test_ray.py)."""

from __future__ import annotations

import pytest

from memaudit.common import UserError
from memaudit.engine import LocalEngine, make_engine


class _Factory:
    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, device: str):
        self.calls.append(device)
        return lambda item: (item, device)


def test_local_engine_builds_one_worker_and_keeps_order():
    eng = make_engine("local", device="cpu")
    assert isinstance(eng, LocalEngine) and eng.describe() == {"name": "local"}
    f = _Factory()
    assert list(eng.map(f, [3, 1, 2])) == [(3, "cpu"), (1, "cpu"), (2, "cpu")]
    assert f.calls == ["cpu"]  # one model replica for all items
    assert list(eng.map(f, [])) == [] and f.calls == ["cpu"]  # none for no work


def test_engine_choice_errors_are_one_line():
    with pytest.raises(UserError, match="unknown engine 'spark'; choose one of local, ray"):
        make_engine("spark")
    with pytest.raises(UserError, match="--address and --actors need --engine ray"):
        make_engine("local", address="auto")


def test_a_ray_address_with_nothing_listening_fails_at_once_in_one_line():
    """issue 18: Ray retried a dead HOST:PORT for more than 10 minutes; memaudit now probes
    it first (a closed local port: refused at once) and fails before anything is written."""
    import socket

    from memaudit.engine.ray_engine import probe_address

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(UserError, match=f"cannot join Ray at {address}: .*refused"):
            probe_address(address, timeout=5)
    for bad in ("nohost", "host:port", "h:0", ":6379"):
        with pytest.raises(UserError, match="--address must be auto or HOST:PORT"):
            probe_address(bad)
    with socket.socket() as live:  # something listening: the probe passes
        live.bind(("127.0.0.1", 0))
        live.listen()
        probe_address(f"127.0.0.1:{live.getsockname()[1]}", timeout=5)
    probe_address("auto")  # left to Ray, which fails fast without a cluster
