"""CUDA checks of the attention entry point (run by benchmarks/gpu_check.sh via `pytest -m gpu`;
skipped on CPU machines). flash-attn is an optional extra: its checks skip when it is not
installed on the GPU machine, and say so."""

from __future__ import annotations

import pytest
import torch

from iomm_scale.models.attention import attention, flash_available
from iomm_scale.models.flux_mmdit import FluxConfig, FluxMMDiT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BF16 = dict(rtol=2e-2, atol=2e-2)


def _backends():
    return ["sdpa", "flash"] if flash_available() else ["sdpa"]


def test_flash_varlen_matches_sdpa_on_real_tokens():
    if not flash_available():
        pytest.skip("flash-attn is not installed on this machine (optional 'gpu' extra)")
    torch.manual_seed(0)
    b, s, h, d = 2, 300, 4, 64
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(b, s, dtype=torch.bool, device="cuda")
    mask[0, :50] = False  # left padding, as the conditioner pads
    ref = attention(q, k, v, mask, "sdpa")
    out = attention(q, k, v, mask, "flash")
    torch.testing.assert_close(out[mask].float(), ref[mask].float(), **BF16)
    torch.testing.assert_close(attention(q, k, v, None, "flash").float(), attention(q, k, v, None, "sdpa").float(), **BF16)


@pytest.mark.parametrize("backend", _backends())
def test_flux_padded_condition_equals_unpadded_on_gpu(backend):
    torch.manual_seed(0)
    cfg = FluxConfig(in_channels=64, num_layers=1, num_single_layers=1, num_heads=2, head_dim=64, context_dim=32,
                     pooled_dim=32, axes_dims_rope=(16, 24, 24), attention_backend=backend)
    model = FluxMMDiT(cfg).cuda().eval()
    latents = torch.randn(2, 16, 8, 8, device="cuda")
    t = torch.rand(2, device="cuda")
    cond = torch.randn(2, 12, 32, device="cuda")
    mask = torch.ones(2, 12, dtype=torch.bool, device="cuda")
    mask[0, :5] = False
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        padded = model(latents, t, cond, mask)[0]
        alone = model(latents[:1], t[:1], cond[:1, 5:], None)[0]
    torch.testing.assert_close(padded.float(), alone.float(), **BF16)
