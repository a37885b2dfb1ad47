"""The fused q/k RMSNorm + RoPE kernel against the unfused PyTorch code, forward and backward.

    TRITON_INTERPRET=1 python tests/models/_fused_norm_rope_check.py cpu   # Triton's interpreter (CPU tests)
    python tests/models/_fused_norm_rope_check.py cuda                     # compiled for the GPU (GPU tests)

Each case compares the output, dL/dx and dL/dweight with a float64 evaluation of the same
formula, and requires the kernel's error to be no larger than the unfused code's (plus a
float32-rounding allowance): the kernel skips one rounding, so it should be closer, never farther.
Cases cover a strided x (a slice of a fused q|k|v projection, as the blocks pass it) and output
gradient (a sequence slice of the double block's concatenated q / k gradient), shared
[S, D] and per-sample [B, S, D] tables, complex angles as S3-DiT / Qwen-Image pass them, a row
count that does not fill the last program, and float32 / bfloat16 (on the interpreter, which
truncates float32 -> bfloat16 stores, half-precision results are held to one unit in the last
place instead). Then one block of each family through RMSNorm.forward's own dispatch
(block_case). Prints one line per case and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from iomm_scale.models import fused_norm_rope, layers, qwen_mmdit, s3dit  # noqa: E402
from iomm_scale.models.attention import apply_complex_rope, apply_rope, rope_angles  # noqa: E402
from iomm_scale.models.flux_mmdit import DoubleStreamBlock, FluxConfig, SingleStreamBlock  # noqa: E402
from iomm_scale.models.layers import RMSNorm  # noqa: E402


def unfused(x, weight, rope, eps):
    """The models' unfused code: RMSNorm, then apply_rope with (cos, sin) tables (FLUX) or
    apply_complex_rope with complex angles (S3-DiT, Qwen-Image)."""
    norm = RMSNorm(x.shape[-1], eps=eps).to(x.device)
    with torch.no_grad():
        norm.weight.copy_(weight)
    norm.weight.requires_grad_(weight.requires_grad)
    if isinstance(rope, torch.Tensor):
        return apply_complex_rope(norm(x), rope.unsqueeze(-2)), norm.weight
    return apply_rope(norm(x), *rope), norm.weight


def kernel(x, weight, rope, eps):
    if isinstance(rope, torch.Tensor):
        return fused_norm_rope.rms_norm_complex_rope(x, weight, rope, eps), weight
    return fused_norm_rope.rms_norm_rope(x, weight, rope[0], rope[1], eps), weight


def grads(fn, x, weight, rope, eps, g):
    x = x.detach().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out, w_used = fn(x, w, rope, eps)
    out.backward(g)
    return out.detach().double(), x.grad.double(), (w_used.grad if w_used is not w else w.grad).double()


def run_case(device, dtype, b, s, h, d, per_sample_tables, strided, complex_angles=False, eps=1e-6, seed=0) -> str:
    """`strided`: x is a slice of a fused q|k|v projection and the output gradient a slice
    along the sequence of a longer one (a double block's two streams are concatenated).
    `complex_angles`: the angles as S3-DiT / Qwen-Image pass them, complex [(B,) S, D/2]."""
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
    cos, sin = rope_angles(pos, axes, 10000.0)
    if complex_angles:  # as S3-DiT / Qwen-Image build them: cos + i sin, complex64
        rope = torch.complex(cos[..., ::2], sin[..., ::2]).to(device)
        rope64 = rope.to(torch.complex128)
    else:
        rope = (cos.to(device), sin.to(device))
        rope64 = (rope[0].double(), rope[1].double())
    g = torch.randn(b, s + 7 if strided else s, h, d, generator=gen).to(device, dtype)[:, 7 if strided else 0:]

    # the same formula in float64 on the same (rounded) inputs: leaves in float64 too, so that
    # the reference gradients are not rounded back to x's dtype
    ref = grads(unfused, x.double(), weight.double(), rope64, eps, g.double())
    got = grads(kernel, x, weight, rope, eps, g)
    base = grads(unfused, x, weight, rope, eps, g)
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
            raise AssertionError(f"{dtype} b{b} s{s} h{h} d{d} per_sample={per_sample_tables} strided={strided} "
                                 f"complex={complex_angles}: {name}: fused error {err_f:.3e} > unfused {err_u:.3e} "
                                 f"(+{slack})")
    return (f"ok {str(dtype)[6:]} [{b},{s},{h},{d}] per_sample={per_sample_tables} strided={strided} "
            f"complex={complex_angles}: " + "; ".join(lines))


def block_and_inputs(kind: str, device: str):
    """A block of each kind that calls the kernel (head_dim 128, non-trivial q/k norm weights)
    and its inputs: FLUX double / single (real cos, sin tables), Z-Image's S3-DiT block
    (per-sample complex angles [B, S, D/2]), Qwen-Image's double block (complex [S, D/2])."""
    torch.manual_seed(0)
    b, n_img, n_txt = 2, 64, 16
    img_ids = torch.stack([torch.zeros(n_img), torch.arange(n_img) // 8, torch.arange(n_img) % 8], -1)
    txt_ids = torch.zeros(n_txt, 3)
    if kind in ("double", "single"):
        cfg = FluxConfig(num_heads=4, head_dim=128, axes_dims_rope=(16, 56, 56), attention_backend="sdpa")
        block = DoubleStreamBlock(cfg) if kind == "double" else SingleStreamBlock(cfg)
        rope = rope_angles(torch.cat([txt_ids, img_ids]), cfg.axes_dims_rope, cfg.rope_theta)
        d = cfg.hidden_size
        temb = torch.randn(b, d)
        inputs = ((torch.randn(b, n_img, d), torch.randn(b, n_txt, d), temb, rope, None) if kind == "double"
                  else (torch.randn(b, n_img + n_txt, d), temb, rope, None))
    elif kind == "s3dit":
        cfg = s3dit.S3DiTConfig(num_heads=4, head_dim=128, axes_dims=(32, 48, 48), attention_backend="sdpa")
        block = s3dit.S3DiTBlock(cfg)
        ids = img_ids[None].repeat(b, 1, 1) + torch.tensor([0.0, 1.0, 0.0]) * torch.arange(b)[:, None, None]
        rope = s3dit.rope_tables(ids, cfg.axes_dims, cfg.rope_theta)  # [B, S, D/2] complex
        inputs = (torch.randn(b, n_img, cfg.hidden_size), rope, None, torch.randn(b, cfg.adaln_dim))
    elif kind == "qwen":
        cfg = qwen_mmdit.QwenMMDiTConfig(num_heads=4, head_dim=128, attention_backend="sdpa")
        block = qwen_mmdit.QwenDoubleBlock(cfg)
        d = cfg.hidden_size
        inputs = (torch.randn(b, n_img, d), torch.randn(b, n_txt, d), torch.randn(b, d),
                  qwen_mmdit.rope_tables(img_ids, cfg.axes_dims_rope, cfg.rope_theta),
                  qwen_mmdit.rope_tables(txt_ids + 8, cfg.axes_dims_rope, cfg.rope_theta), None)  # [S, D/2] complex
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    def to(t):  # FLUX's rope is a (cos, sin) pair: it moves too (left on the CPU, the kernel got a CPU table)
        return t.to(device) if isinstance(t, torch.Tensor) else tuple(map(to, t)) if isinstance(t, tuple) else t

    return block.to(device), tuple(map(to, inputs))


BLOCKS = ("double", "single", "s3dit", "qwen")


def block_case(kind: str, device) -> str:
    """The block's forward and backward with the kernel (reached through RMSNorm.forward's own
    dispatch, on CPU pointed at the interpreted kernel) against the unfused code, in float32:
    outputs and the norm weights' gradients, relative to the largest value."""
    def run(kernel_on: bool):
        calls = []

        def fused_kernels(x, weight):
            if not kernel_on:
                return None
            calls.append(1)
            return fused_norm_rope

        layers.fused_kernels = fused_kernels
        try:
            block.zero_grad(set_to_none=True)
            leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                      and t.dim() == 3 else t for t in inputs]
            out = block(*leaves)
            out = out if isinstance(out, tuple) else (out,)
            sum((o.float() ** 2).mean() for o in out).backward()
        finally:
            layers.fused_kernels = real
        grads = [p.grad for n, p in block.named_parameters() if "norm" in n and p.grad is not None]
        return [o.detach() for o in out], grads, len(calls)

    real = layers.fused_kernels
    block, inputs = block_and_inputs(kind, device)
    out_k, grad_k, calls = run(True)
    out_u, grad_u, _ = run(False)
    expected = 4 if kind in ("double", "qwen") else 2  # q and k of each stream
    err_o = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out_k, out_u))
    err_g = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grad_k, grad_u))
    if calls != expected or not grad_u or err_o > 1e-5 or err_g > 1e-5:
        raise AssertionError(f"block {kind}: {calls} kernel calls (expected {expected}), output rel err {err_o:.2e}, "
                             f"norm weight grads rel err {err_g:.2e} (tolerance 1e-5)")
    return f"ok block {kind}: {calls} kernel calls, output rel err {err_o:.1e}, norm grads rel err {err_g:.1e}"


CASES = [
    # dtype, b, s, h, d, per-sample tables, strided x, complex angles
    (torch.float32, 2, 37, 3, 16, False, True, False),     # 222 rows: the last program half full
    (torch.float32, 3, 20, 2, 32, True, False, False),
    (torch.bfloat16, 2, 33, 4, 64, False, True, False),
    (torch.bfloat16, 1, 50, 2, 128, True, True, False),
    (torch.float32, 2, 29, 3, 32, True, True, True),       # S3-DiT: per-sample complex angles
    (torch.bfloat16, 2, 21, 2, 64, False, True, True),     # Qwen-Image: shared complex angles
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
    angles = torch.view_as_real(torch.complex(cos[..., ::2], sin[..., ::2])).flatten(-2)
    torch.library.opcheck(fused_norm_rope.rms_norm_rope, (x, w, angles, angles, 1e-6, True))
    print("opcheck ok")
    for kind in BLOCKS:
        print(block_case(kind, dev), flush=True)
    print(f"fused norm+rope: {len(CASES)} cases and {len(BLOCKS)} blocks ok on {device}, rows/warps per program "
          f"{fused_norm_rope.config_text()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
