import math

import pytest
import torch

from iomm_scale import flow


def test_interpolation_and_target_are_the_papers():
    x, z = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = flow.interpolate(x, z, t)
    assert torch.equal(xt[0], x[0]) and torch.equal(xt[2], z[2])
    torch.testing.assert_close(xt[1], 0.75 * x[1] + 0.25 * z[1], rtol=0, atol=1e-7)
    # the target is the time derivative of the path
    torch.testing.assert_close(flow.velocity_target(x, z), z - x)
    eps = 1e-3
    ts = torch.full((3,), 0.5)
    fd = (flow.interpolate(x, z, ts + eps) - flow.interpolate(x, z, ts - eps)) / (2 * eps)
    torch.testing.assert_close(fd, z - x, rtol=1e-3, atol=1e-3)


def test_timestep_sampling_ranges_and_shift():
    cfg = flow.FlowConfig()
    t = flow.sample_timesteps(10000, cfg, 256)
    assert 0 <= t.min() and t.max() <= 1 and abs(t.mean().item() - 0.5) < 0.02
    cfg = flow.FlowConfig(timestep_sampling="logit_normal", shift=3.0)
    t = flow.sample_timesteps(10000, cfg, 256)
    assert t.mean() > 0.6  # shift > 1 moves mass towards noise
    assert flow.shift_timesteps(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]
    assert abs(flow.resolution_shift(256, cfg) - math.exp(0.5)) < 1e-9


def test_resolution_shift_is_fluxs_mu_between_its_endpoints():
    cfg = flow.FlowConfig(resolution_shift=True)  # base_shift 0.5 at 256 tokens, max_shift 1.15 at 4096
    assert flow.resolution_shift(4096, cfg) == pytest.approx(math.exp(1.15), rel=1e-12)
    assert flow.resolution_shift(2176, cfg) == pytest.approx(math.exp(0.825), rel=1e-12)  # halfway
    assert flow.effective_shift(cfg, 1024) == pytest.approx(math.exp(0.5 + 0.65 * 768 / 3840), rel=1e-12)
    assert flow.effective_shift(flow.FlowConfig(shift=3.0), 4096) == 3.0  # fixed shift unless resolution_shift


def test_logit_normal_timesteps_follow_logit_mean_and_std():
    g = torch.Generator().manual_seed(0)
    cfg = flow.FlowConfig(timestep_sampling="logit_normal", logit_mean=1.0, logit_std=0.5)
    logit = torch.logit(flow.sample_timesteps(20000, cfg, 256, generator=g).double())
    assert abs(logit.mean().item() - 1.0) < 0.02 and abs(logit.std().item() - 0.5) < 0.02


def test_sampler_is_exact_on_straight_paths():
    # v = (x - x0) / t is the field of the straight path from x0 (t=0) to the noise (t=1):
    # Euler follows a straight line exactly.
    x0 = torch.randn(2, 3)
    noise = torch.randn(2, 3)
    out = flow.euler_sample(lambda x, t, c: (x - x0) / t[:, None], noise, steps=7)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_sampler_converges_to_the_exact_solution_within_the_euler_bound():
    # dx/dt = a x integrated from t=1 (x=x1) to t=0: exact x(0) = x1 * exp(-a).
    a = 1.5
    x1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    exact = x1 * math.exp(-a)
    errors = []
    for n in (10, 20, 40):
        out = flow.euler_sample(lambda x, t, c: a * x, x1.clone(), steps=n)
        err = (out - exact).abs().max().item()
        # global Euler bound: h * M / (2L) * (e^{L T} - 1), M = max|x''| = a^2 max|x|, L = a, T = 1
        h = 1.0 / n
        bound = h * (a * a * x1.abs().max().item()) / (2 * a) * (math.exp(a) - 1)
        assert err <= bound, (n, err, bound)
        errors.append(err)
    # first order: halving the step roughly halves the error
    assert 1.7 < errors[0] / errors[1] < 2.3 and 1.7 < errors[1] / errors[2] < 2.3


def test_cfg_combines_branches():
    cond, null = torch.ones(2, 1), torch.zeros(2, 1)
    # velocity = condition value: guided velocity = null + w (cond - null) = w
    out = flow.euler_sample(lambda x, t, c: c.expand_as(x), torch.zeros(2, 3), steps=4, cond=cond, null_cond=null, cfg_scale=3.0)
    torch.testing.assert_close(out, torch.full((2, 3), -3.0))
