"""The fused q/k RMSNorm + RoPE Triton kernel (models/fused_norm_rope.py).

On CPU the kernel runs under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set
before Triton compiles anything); on a GPU (`pytest -m gpu`, benchmarks/gpu_check.sh) the same
cases run compiled, and a torch.compile'd block of each family (FLUX double and single, Z-Image's
S3-DiT, Qwen-Image) with the kernel is compared with the same block on the unfused code
(IOMM_FUSED_KERNELS=0)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from iomm_scale.models import fused_norm_rope
from iomm_scale.models.attention import apply_rope, rope_angles
from iomm_scale.models.layers import RMSNorm

HERE = os.path.dirname(os.path.abspath(__file__))
CHECK = os.path.join(HERE, "_fused_norm_rope_check.py")


@pytest.mark.parametrize("config", [None, "32,8,8,2"])
def test_kernel_matches_unfused_code_under_triton_interpreter(config):
    """The shipped rows x warps per program, and another (IOMM_NORM_ROPE_CONFIG, as gpu_check
    sets the sweep's fastest): 8 and 32 head vectors per program fill the last program partly
    in other ways, and the backward's weight-gradient partials come in other counts."""
    pytest.importorskip("triton", reason="Triton is part of the test extra on Linux")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("IOMM_NORM_ROPE_CONFIG", None)
    if config:
        env["IOMM_NORM_ROPE_CONFIG"] = config
    r = subprocess.run([sys.executable, CHECK, "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "6 cases and 4 blocks ok on cpu" in r.stdout and "opcheck ok" in r.stdout
    assert f"rows/warps per program {config or '8,2,64,8'}" in r.stdout


def test_bad_kernel_configuration_is_named():
    with pytest.raises(ValueError, match=r"IOMM_NORM_ROPE_CONFIG='16,4,16,3': expected 'fwd_rows,fwd_warps,"):
        fused_norm_rope.parse_config("16,4,16,3")
    assert fused_norm_rope.parse_config("8,2,32,8") == (8, 2, 32, 8)


def test_cpu_tensors_take_the_unfused_path():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 16)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
    cos, sin = rope_angles(torch.rand(5, 3), (8, 4, 4), 10000.0)
    assert not fused_norm_rope.available(x, norm.weight)
    torch.testing.assert_close(norm(x, (cos, sin)), apply_rope(norm(x), cos, sin), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_matches_unfused_code_on_gpu():
    sys.path.insert(0, HERE)
    from _fused_norm_rope_check import main

    assert main("cuda") == 0
    x = torch.randn(1, 4, 2, 128, device="cuda", dtype=torch.bfloat16)
    assert fused_norm_rope.available(x, torch.ones(128, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["double", "single", "s3dit", "qwen"])
def test_compiled_block_with_kernel_equals_unfused(kind, monkeypatch):
    """Each family's block, torch.compile'd, bf16 autocast: outputs and q/k-norm weight
    gradients with the kernel (IOMM_FUSED_KERNELS=1) equal the unfused code's within bf16
    tolerance; an eager call first counts the kernel's calls (each q and k norm)."""
    from torch import _dynamo

    sys.path.insert(0, HERE)
    from _fused_norm_rope_check import block_and_inputs

    block, inputs = block_and_inputs(kind, "cuda")
    calls = []
    real_op = fused_norm_rope.rms_norm_rope

    def run(fused: bool):
        monkeypatch.setenv("IOMM_FUSED_KERNELS", "1" if fused else "0")
        _dynamo.reset()
        block.zero_grad(set_to_none=True)
        leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                  and t.dim() == 3 else t for t in inputs]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = torch.compile(block, dynamic=False)(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        sum((o.float() ** 2).mean() for o in out).backward()
        norm_grads = [p.grad.clone() for n, p in block.named_parameters() if "norm" in n and p.grad is not None]
        return [o.detach().float() for o in out], norm_grads

    def counting(*args, **kwargs):
        calls.append(1)
        return real_op(*args, **kwargs)

    # eager, once: the block's q/k norms reach the kernel (2 per stream)
    monkeypatch.setattr(fused_norm_rope, "rms_norm_rope", counting)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        block(*inputs)
    monkeypatch.setattr(fused_norm_rope, "rms_norm_rope", real_op)
    assert len(calls) == (4 if kind in ("double", "qwen") else 2), calls
    out_f, g_f = run(True)
    out_u, g_u = run(False)
    assert len(g_f) == len(g_u) > 0
    for a, b_ in zip(out_f, out_u):
        torch.testing.assert_close(a, b_, rtol=3e-2, atol=3e-2)
    for a, b_ in zip(g_f, g_u):
        torch.testing.assert_close(a, b_, rtol=5e-2, atol=5e-2 * b_.abs().max().item())


def test_rope_tables_of_another_shape_are_refused_by_name():
    x, w = torch.randn(2, 5, 3, 16), torch.ones(16)
    for bad in (torch.zeros(4, 16), torch.zeros(5, 8), torch.zeros(3, 5, 16)):
        with pytest.raises(ValueError, match=r"rope tables must be \[S, D\] or \[B, S, D\] with B=2, S=5, D=16"):
            fused_norm_rope.rms_norm_rope(x, w, bad, bad, 1e-6)
    # tables on another device than x (a CUDA x with CPU tables: Triton's own error names no tensor);
    # checked where the launch geometry is read (a meta table would send the op to its fake kernel)
    with pytest.raises(ValueError, match=r"rope tables on meta, x on cpu: move them to x's device"):
        fused_norm_rope._geometry(x, torch.zeros(5, 16, device="meta"))
