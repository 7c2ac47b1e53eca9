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
    # Gsim's gain sigma / (1 - sigma)^2: moving v by gain * g moves x0_hat by
    # -g (sigma / (1 - sigma))^2 = -g / SNR, as the eps rule does at that SNR (derivation in
    # prediction.py; against autograd in tests/test_flow_rules.py); absent at sigma = 1
    assert torch.allclose(p.gain(t), torch.tensor([0.25 / 0.75 ** 2, 0.8 / 0.2 ** 2]))
    assert p.alpha_bar(t) is None
    assert float(p.gain(torch.tensor(1000.0))) == 0.0
    assert p.has_signal(t).all() and not bool(p.has_signal(torch.tensor(1000.0)))


def test_magnitudes_are_noise_prediction_magnitudes():
    """METHODS 0: at fixed x_t a flow model's noise estimate is x_t + (1 - sigma) v, so the
    magnitude of a velocity difference is ||(1 - sigma) d||; eps differences are their own.
    1 - sigma is floored at 1 / T where sigma = 1."""
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 4, 2, 2, generator=g)
    v_c, v_u = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([1000.0, 987.0, 300.0])
    sigma = (t / 1000).view(-1, 1, 1, 1)
    n_c, n_u = x_t + (1 - sigma) * v_c, x_t + (1 - sigma) * v_u
    got = FlowPrediction(1000).magnitude(v_c - v_u, t)
    want = (n_c - n_u).flatten(1).norm(dim=1)
    assert torch.allclose(got[1:], want[1:], atol=1e-5) and float(want[0]) == 0.0
    assert torch.allclose(got[0], 1e-3 * (v_c - v_u)[0].norm())
    one = FlowPrediction(1000).magnitude(v_c - v_u, torch.tensor(300.0))  # a scalar t
    assert torch.allclose(one, 0.7 * (v_c - v_u).flatten(1).norm(dim=1))
    e = EpsPrediction(torch.linspace(0.99, 0.01, 1000))
    assert torch.allclose(e.magnitude(v_c - v_u, t), (v_c - v_u).flatten(1).norm(dim=1))
