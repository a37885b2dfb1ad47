"""The single-process EMA and the learning-rate schedule against their formulas (the
distributed EMA is compared with this one in tests/parallel, so this one must be right)."""

import math
import os

import pytest
import torch
import torch.nn as nn

from iomm_scale.config import load_config
from iomm_scale.optim.builder import EMA, lr_factor

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml")


def test_ema_is_the_exponential_average_and_stays_float32():
    p0, p1, p2 = (torch.randn(4, 3) for _ in range(3))
    ema = EMA({"w": p0.to(torch.bfloat16)}, 0.9)
    ema.shadow["w"] = p0.clone()  # exact start (bf16 rounding aside)
    ema.update({"w": p1})
    ema.update({"w": p2})
    # s1 = 0.9 p0 + 0.1 p1; s2 = 0.9 s1 + 0.1 p2
    torch.testing.assert_close(ema.shadow["w"], 0.81 * p0 + 0.09 * p1 + 0.1 * p2, rtol=1e-6, atol=1e-6)
    assert ema.shadow["w"].dtype == torch.float32


def test_ema_swap_restore_and_state_dict_roundtrip():
    model = nn.Linear(3, 2)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(dict(model.named_parameters()), 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(dict(model.named_parameters()))  # shadow = live + 0.5
    backup = ema.swap_into(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), live[n] + 0.5)
    ema.restore(model, backup)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), live[n] + 1.0)
    other = EMA({n: torch.zeros_like(p) for n, p in model.named_parameters()}, 0.1)
    own = dict(other.shadow)
    other.load_state_dict(ema.state_dict())
    # the saved shadow, copied into its own tensors (they stay on the parameters' device); the
    # decay stays the resuming run's optim.ema_decay
    assert other.decay == 0.1 and all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.shadow)
    assert all(other.shadow[n] is own[n] for n in own)
    with pytest.raises(KeyError, match="differ from the trainable parameters"):
        other.load_state_dict({"decay": 0.5, "shadow": {"weight": ema.shadow["weight"]}})
    with pytest.raises(ValueError, match="weight has shape"):
        other.load_state_dict({"decay": 0.5, "shadow": {"weight": torch.zeros(1, 3), "bias": ema.shadow["bias"]}})


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_warmup_then_constant_or_cosine(schedule):
    cfg = load_config(TINY, ["train.steps=110", "optim.warmup_steps=10", f"optim.schedule={schedule}",
                             "optim.min_lr_ratio=0.1"])
    assert [lr_factor(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    if schedule == "constant":
        assert lr_factor(10, cfg) == lr_factor(109, cfg) == 1.0
        return
    # cosine from 1 at the end of warm-up to min_lr_ratio at train.steps, halfway at the middle
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg) == pytest.approx(0.1) and lr_factor(500, cfg) == pytest.approx(0.1)
