"""The fused q/k RMSNorm + RoPE kernel against the unfused PyTorch code, forward and backward.

    TRITON_INTERPRET=1 python tests/models/_fused_norm_rope_check.py cpu   # Triton's interpreter (CPU tests)
    python tests/models/_fused_norm_rope_check.py cuda                     # compiled for the GPU (GPU tests)

Each case compares the output, dL/dx and dL/dweight with a float64 evaluation of the same
formula, and requires the kernel's error to be no larger than the unfused code's (plus a
float32-rounding allowance): the kernel skips one rounding, so it should be closer, never farther.
Cases cover a strided x (a slice of a fused q|k|v projection, as the blocks pass it) and output
gradient (a sequence slice of the double block's concatenated q / k gradient), shared
[S, D] and per-sample [B, S, D] tables, a row count that does not fill the last program, and
float32 / bfloat16 (on the interpreter, which truncates float32 -> bfloat16 stores, half-precision
results are held to one unit in the last place instead). Prints one line per case and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from iomm_scale.models import fused_norm_rope  # noqa: E402
from iomm_scale.models.attention import apply_rope, rope_angles  # noqa: E402
from iomm_scale.models.layers import RMSNorm  # noqa: E402


def unfused(x, weight, cos, sin, eps):
    norm = RMSNorm(x.shape[-1], eps=eps).to(x.device)
    with torch.no_grad():
        norm.weight.copy_(weight)
    norm.weight.requires_grad_(weight.requires_grad)
    out = apply_rope(norm(x), cos, sin)
    return out, norm.weight


def grads(fn, x, weight, cos, sin, eps, g):
    x = x.detach().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out, w_used = fn(x, w, cos, sin, eps)
    out.backward(g)
    return out.detach().double(), x.grad.double(), (w_used.grad if w_used is not w else w.grad).double()


def run_case(device, dtype, b, s, h, d, per_sample_tables, strided, eps=1e-6, seed=0) -> str:
    """`strided`: x is a slice of a fused q|k|v projection and the output gradient a slice
    along the sequence of a longer one (a double block's two streams are concatenated)."""
    gen = torch.Generator().manual_seed(seed)
    if strided:  # q as the blocks see it: one third of a fused [B, S, 3 * H * D] projection
        fused = torch.randn(b, s, 3 * h * d, generator=gen) * 3
        x = fused.to(device, dtype)[..., h * d: 2 * h * d].unflatten(-1, (h, d))
    else:
        x = (torch.randn(b, s, h, d, generator=gen) * 3).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(d, generator=gen)).to(device)
    axes = (d // 2, d // 4, d // 4)  # every axis even, summing to d
    pos = torch.stack([torch.zeros(s), torch.arange(s) // 5, torch.arange(s) % 5], -1)
    if per_sample_tables:
        pos = pos[None].repeat(b, 1, 1) + torch.arange(b)[:, None, None]
    cos, sin = (t.to(device) for t in rope_angles(pos, axes, 10000.0))
    g = torch.randn(b, s + 7 if strided else s, h, d, generator=gen).to(device, dtype)[:, 7 if strided else 0:]

    def fused_fn(x, w, cos, sin, eps):
        return fused_norm_rope.rms_norm_rope(x, w, cos, sin, eps), w

    # the same formula in float64 on the same (rounded) inputs: leaves in float64 too, so that
    # the reference gradients are not rounded back to x's dtype
    ref = grads(unfused, x.double(), weight.double(), cos.double(), sin.double(), eps, g.double())
    got = grads(fused_fn, x, weight, cos, sin, eps, g)
    base = grads(unfused, x, weight, cos, sin, eps, g)
    names = ("out", "grad_x", "grad_w")
    slack = 1e-5 if dtype == torch.float32 else 1e-3
    # Triton's interpreter (CPU) truncates float32 -> bfloat16 on store where the GPU rounds to
    # nearest: there a half-precision result may be off by up to one unit in the last place
    # (2^-7 of the largest value), and the check is only that bound.
    truncating = device.type == "cpu" and dtype != torch.float32
    lines = []
    for name, r, f, u in zip(names, ref, got, base):
        scale = r.abs().max().item() + 1e-12
        err_f = (f - r).abs().max().item() / scale
        err_u = (u - r).abs().max().item() / scale
        lines.append(f"{name} rel err fused {err_f:.2e} unfused {err_u:.2e}")
        if not (err_f <= 2.0 ** -7 if truncating else err_f <= err_u * 1.05 + slack):
            raise AssertionError(f"{dtype} b{b} s{s} h{h} d{d} per_sample={per_sample_tables} strided={strided}: "
                                 f"{name}: fused error {err_f:.3e} > unfused {err_u:.3e} (+{slack})")
    return f"ok {str(dtype)[6:]} [{b},{s},{h},{d}] per_sample={per_sample_tables} strided={strided}: " + "; ".join(lines)


CASES = [
    # dtype, b, s, h, d, per-sample tables, strided x
    (torch.float32, 2, 37, 3, 16, False, True),     # 222 rows: the last program half full
    (torch.float32, 3, 20, 2, 32, True, False),
    (torch.bfloat16, 2, 33, 4, 64, False, True),
    (torch.bfloat16, 1, 50, 2, 128, True, True),
]


def main(device: str) -> int:
    dev = torch.device(device)
    for case in CASES:
        print(run_case(dev, *case), flush=True)
    # the custom op's registration: schema, fake (meta) implementation, autograd formula, and
    # AOTAutograd tracing (what torch.compile does with it)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 2, 16, generator=gen).to(dev).requires_grad_()
    w = (1 + torch.randn(16, generator=gen)).to(dev).requires_grad_()
    cos, sin = (t.to(dev) for t in rope_angles(torch.rand(6, 3) * 4, (8, 4, 4), 10000.0))
    torch.library.opcheck(fused_norm_rope.rms_norm_rope, (x, w, cos, sin, 1e-6))
    print("opcheck ok")
    print(f"fused norm+rope: {len(CASES)} cases ok on {device}, rows/warps per program "
          f"{fused_norm_rope.config_text()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
