"""What a prediction means (memaudit/models/prediction.py; METHODS.md 0): x0 estimates, the
guidance gain and the conversions to eps, on small tensors against the defining equations."""

from __future__ import annotations

import torch

from memaudit.models.prediction import EpsPrediction, FlowPrediction


def test_eps_x0_gain_and_conversions():
    abar_all = torch.linspace(0.99, 0.01, 1000)
    p = EpsPrediction(abar_all)
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([100, 900])
    abar = abar_all[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * n
    assert torch.allclose(p.x0(x_t, n, t), x0, atol=1e-5)
    assert torch.allclose(p.gain(t), (1 - abar_all[t]).sqrt())
    v = abar.sqrt() * n - (1 - abar).sqrt() * x0  # Salimans & Ho 2022
    assert torch.allclose(EpsPrediction.to_eps(v, x_t, abar_all[t], "v_prediction"), n,
                          atol=1e-5)
    assert torch.allclose(EpsPrediction.to_eps(x0, x_t, abar_all[t], "sample"), n, atol=1e-4)
    assert torch.equal(EpsPrediction.to_eps(n, x_t, abar_all[t], "epsilon"), n)


def test_flow_x0_and_gain():
    p = FlowPrediction(1000)
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    t = torch.tensor([250.0, 800.0])
    sigma = (t / 1000).view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * n
    v = n - x0
    assert torch.allclose(p.x0(x_t, v, t), x0, atol=1e-5)
    # gain = sigma / (1 - sigma) = -dv/dscore: v = (-sigma score - x_t) / (1 - sigma) holds
    # with the conditional score -n / sigma
    s = -n / sigma
    v_of = (-sigma * s - x_t) / (1 - sigma)
    assert torch.allclose(v_of, v, atol=1e-5)
    assert torch.allclose(p.gain(t), torch.tensor([0.25 / 0.75, 0.8 / 0.2]))
    assert p.alpha_bar(t) is None
    assert abs(float(p.gain(torch.tensor(1000.0))) - 1000.0) < 1e-3
    # 1 - sigma floored at 1/T at sigma = 1 (pure noise)
