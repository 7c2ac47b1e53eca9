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
