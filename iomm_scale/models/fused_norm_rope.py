"""q/k RMSNorm + rotary embedding in one Triton kernel (forward and backward), for CUDA.

What it computes is `apply_rope(RMSNorm(x), cos, sin)` of models/layers.py and attention.py:
per head vector of x [B, S, H, D], in float32, y = x * rsqrt(mean(x^2) + eps) * weight, then
the interleaved pairs (y0, y1), (y2, y3), ... rotated by the position's angles; the result in
x's dtype. The one difference: the unfused code rounds y to x's dtype between the norm and
the rotation, the kernel keeps it in float32 (so it is the more exact of the two).
The angles come as FLUX keeps them (real cos / sin tables [S, D] or [B, S, D], each angle
repeated for both members of a pair: `rms_norm_rope`) or as Z-Image (S3-DiT) and Qwen-Image
keep them (complex cos + i sin [S, D/2] or [B, S, D/2]: `rms_norm_complex_rope`, which reads
the complex tensor's float view in place: the same rotation, no table is built).

Why: in the compiled IOMM-B generator the inductor-generated norm + RoPE kernels (forward,
and the backward with its weight-gradient reduction) took ~41 ms of a 520 ms forward +
backward at micro-batch 32 on an H200, about 4x the time their bytes need; this kernel's take
~18 ms there (benchmarks/RESULTS.md). It reads x once and writes the output once; its backward
recomputes the norm from x (nothing else is saved) and reads x and the output gradient once,
each in the layout it comes in (any batch / sequence / head strides, no copy first).

It is a `torch.library` custom op (`iomm::rms_norm_rope`, with a fake implementation and an
autograd formula), so torch.compile'd blocks call it as one opaque kernel. Used on CUDA when
Triton imports (`available`); `IOMM_FUSED_KERNELS=0` turns it off. It also runs on CPU
tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how the CPU tests check it.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the unfused PyTorch code is used
    triton = None

MAX_HEAD_DIM = 256
# Head vectors and warps per program: (forward rows, forward warps, backward rows, backward warps).
# The fastest of benchmarks/bench_norm_rope.py --sweep on an H200 (fourteenth session: forward
# 8 x 2 at 3.3 TB/s, was 16 x 4 at 2.0; backward 64 x 8 at 2.0 TB/s, was 16 x 4 at 1.8: 64 rows
# also write 4x fewer weight-gradient partials). IOMM_NORM_ROPE_CONFIG="fr,fw,br,bw" overrides
# these (gpu_check's later stages run with the sweep's fastest on the card at hand).
SHIPPED_CONFIG = (8, 2, 64, 8)


def parse_config(text: str) -> tuple[int, int, int, int]:
    """"fwd_rows,fwd_warps,bwd_rows,bwd_warps" -> the 4 ints; ValueError naming the variable."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if (len(values) != 4 or any(v < 1 or v & (v - 1) for v in values) or max(values[0], values[2]) > 128
            or max(values[1], values[3]) > 16):
        raise ValueError(f"IOMM_NORM_ROPE_CONFIG={text!r}: expected 'fwd_rows,fwd_warps,bwd_rows,bwd_warps', "
                         f"powers of two, rows <= 128, warps <= 16 (the shipped: {','.join(map(str, SHIPPED_CONFIG))})")
    return values  # type: ignore[return-value]


FWD_ROWS, FWD_WARPS, BWD_ROWS, BWD_WARPS = (parse_config(os.environ["IOMM_NORM_ROPE_CONFIG"])
                                            if os.environ.get("IOMM_NORM_ROPE_CONFIG") else SHIPPED_CONFIG)


def config_text() -> str:
    """The configuration the kernels launch with now, as IOMM_NORM_ROPE_CONFIG writes it."""
    return ",".join(map(str, (FWD_ROWS, FWD_WARPS, BWD_ROWS, BWD_WARPS)))


def available(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether the fused kernel can take this call (else the caller runs the unfused code)."""
    d = x.shape[-1]
    return (triton is not None and x.is_cuda and weight is not None and x.dim() == 4
            and d <= MAX_HEAD_DIM and d >= 2 and d & (d - 1) == 0
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and os.environ.get("IOMM_FUSED_KERNELS", "1") != "0")


if triton is not None:

    @triton.jit
    def _swap_pairs(v, ROWS: tl.constexpr, D: tl.constexpr):
        """(v1, v0, v3, v2, ...) of each row of v [ROWS, D], in registers (split / join of the pairs;
        fetching the partners by a second load instead measured 2.6x slower forward on an H200)."""
        even, odd = tl.split(tl.reshape(v, (ROWS, D // 2, 2)))
        return tl.reshape(tl.join(odd, even), (ROWS, D))

    @triton.jit
    def _head_vectors(pid, x_ptr, cos_ptr, sin_ptr, n_rows, H, S, x_sb, x_ss, x_sh, c_sb, c_ss, eps,
                      D: tl.constexpr, BLOCK_R: tl.constexpr, COMPLEX: tl.constexpr):
        """This program's BLOCK_R head vectors (rows of B x S x H): x in float32, 1 / rms(x), the
        rows' cos / sin, the row mask, the rows' offsets in a contiguous [B, S, H, D] tensor and
        their (b, s, h) indices. COMPLEX: cos_ptr is the float view of complex angles, (cos, sin)
        of pair j at 2j, 2j + 1 (sin_ptr unused); else two tables with cos / sin of pair j at 2j
        and 2j + 1 each."""
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = (rows < n_rows)[:, None]
        h = rows % H
        s = (rows // H) % S
        b = (rows // H // S).to(tl.int64)
        cols = tl.arange(0, D)[None, :]
        x_off = (b * x_sb + s * x_ss + h * x_sh)[:, None]
        x = tl.load(x_ptr + x_off + cols, mask=rmask, other=0.0).to(tl.float32)  # whole head vectors
        rstd = (1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps))[:, None]
        if COMPLEX:
            c_off = (b * c_sb + s * c_ss)[:, None] + (cols // 2) * 2
            cos = tl.load(cos_ptr + c_off, mask=rmask, other=0.0).to(tl.float32)
            sin = tl.load(cos_ptr + c_off + 1, mask=rmask, other=0.0).to(tl.float32)
        else:
            c_off = (b * c_sb + s * c_ss)[:, None] + cols  # the tables repeat each angle for both members of a pair
            cos = tl.load(cos_ptr + c_off, mask=rmask, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + c_off, mask=rmask, other=0.0).to(tl.float32)
        o_off = rows.to(tl.int64)[:, None] * D + cols
        return cols, rmask, x, rstd, cos, sin, o_off, b, s, h

    @triton.jit
    def _rms_norm_rope_fwd(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, H, S,
                           x_sb, x_ss, x_sh, c_sb, c_ss, eps,
                           D: tl.constexpr, BLOCK_R: tl.constexpr, COMPLEX: tl.constexpr):
        cols, rmask, x, rstd, cos, sin, o_off, _, _, _ = _head_vectors(
            tl.program_id(0), x_ptr, cos_ptr, sin_ptr, n_rows, H, S, x_sb, x_ss, x_sh, c_sb, c_ss, eps, D, BLOCK_R,
            COMPLEX)
        y = x * rstd * tl.load(w_ptr + cols).to(tl.float32)
        y_partner = _swap_pairs(y, BLOCK_R, D)
        sign = tl.where(cols % 2 == 0, -1.0, 1.0)  # out[2j] = y[2j] cos - y[2j+1] sin; out[2j+1] = y[2j+1] cos + y[2j] sin
        out = y * cos + sign * y_partner * sin
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=rmask)

    @triton.jit
    def _rms_norm_rope_bwd(x_ptr, w_ptr, cos_ptr, sin_ptr, go_ptr, gx_ptr, gw_ptr, n_rows, H, S,
                           x_sb, x_ss, x_sh, c_sb, c_ss, eps, g_sb, g_ss, g_sh,
                           D: tl.constexpr, BLOCK_R: tl.constexpr, COMPLEX: tl.constexpr):
        pid = tl.program_id(0)
        cols, rmask, x, rstd, cos, sin, o_off, b, s, h = _head_vectors(
            pid, x_ptr, cos_ptr, sin_ptr, n_rows, H, S, x_sb, x_ss, x_sh, c_sb, c_ss, eps, D, BLOCK_R, COMPLEX)
        # the output gradient in its own layout: in a double block it is a slice of the
        # concatenated streams' gradient (a copy to make it contiguous would cost a pass)
        g = tl.load(go_ptr + (b * g_sb + s * g_ss + h * g_sh)[:, None] + cols, mask=rmask, other=0.0).to(tl.float32)
        # the rotation's transpose: gy[2j] = g[2j] cos + g[2j+1] sin; gy[2j+1] = g[2j+1] cos - g[2j] sin
        g_partner = _swap_pairs(g, BLOCK_R, D)
        gy = g * cos - tl.where(cols % 2 == 0, -1.0, 1.0) * g_partner * sin
        # then the norm's backward
        xh = x * rstd
        tl.store(gw_ptr + pid * D + cols, tl.sum(gy * xh, 0)[None, :])  # this program's share of dL/dw
        gh = gy * tl.load(w_ptr + cols).to(tl.float32)
        dot = (tl.sum(gh * xh, 1) / D)[:, None]
        tl.store(gx_ptr + o_off, (rstd * (gh - xh * dot)).to(gx_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=rmask)


def _geometry(x: torch.Tensor, cos: torch.Tensor):
    b, s, h, d = x.shape
    if cos.shape[-2:] != (s, d) or cos.dim() not in (2, 3) or (cos.dim() == 3 and cos.shape[0] not in (1, b)):
        raise ValueError(f"rms_norm_rope: rope tables must be [S, D] or [B, S, D] with B={b}, S={s}, D={d}; "
                         f"got {tuple(cos.shape)}")
    if cos.device != x.device:  # Triton would fail on the pointer with a message naming no tensor
        raise ValueError(f"rms_norm_rope: rope tables on {cos.device}, x on {x.device}: move them to x's device")
    c_sb = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0
    return (b * s * h, h, s, x.stride(0), x.stride(1), x.stride(2), c_sb, cos.stride(-2))


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # head vectors are read as rows; any batch / sequence / head strides are fine
    return x if x.stride(-1) == 1 else x.contiguous()


def _tables(cos: torch.Tensor, sin: torch.Tensor):
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


@torch.library.custom_op("iomm::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float, complex_angles: bool = False) -> torch.Tensor:
    """apply_rope(RMSNorm(x) with `weight`, cos, sin) for x [B, S, H, D]; returns a contiguous
    tensor of x's dtype. cos / sin: [S, D] or [B, S, D] tables (rope_angles). `complex_angles`:
    `cos` is instead the float view of complex angles (rms_norm_complex_rope) and `sin` unread."""
    cos, sin = _tables(cos, sin)
    x = _unit_last_stride(x)
    geo = _geometry(x, cos)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(geo[0], FWD_ROWS),)
    _rms_norm_rope_fwd[grid](x, weight, cos, sin, out, *geo, eps, D=x.shape[-1], BLOCK_R=FWD_ROWS,
                             COMPLEX=complex_angles, num_warps=FWD_WARPS)
    return out


@rms_norm_rope.register_fake
def _(x, weight, cos, sin, eps, complex_angles=False):
    return x.new_empty(x.shape)


def rms_norm_complex_rope(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, eps: float) -> torch.Tensor:
    """apply_complex_rope(RMSNorm(x) with `weight`, freqs) for x [B, S, H, D] and complex angles
    freqs [S, D/2] or [B, S, D/2] (S3-DiT, Qwen-Image): the kernel reads their float view, in
    which pair j's cos and sin sit at 2j and 2j + 1 (no table is built)."""
    angles = torch.view_as_real(freqs).flatten(-2)
    return rms_norm_rope(x, weight, angles, angles, eps, True)


@torch.library.custom_op("iomm::rms_norm_rope_backward", mutates_args=())
def rms_norm_rope_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, eps: float, complex_angles: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = _tables(cos, sin)
    x = _unit_last_stride(x)
    geo = _geometry(x, cos)
    grad = _unit_last_stride(grad)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    programs = triton.cdiv(geo[0], BWD_ROWS)
    gw_parts = torch.empty(programs, x.shape[-1], dtype=torch.float32, device=x.device)
    _rms_norm_rope_bwd[(programs,)](x, weight, cos, sin, grad, gx, gw_parts, *geo, eps, *grad.stride()[:3],
                                    D=x.shape[-1], BLOCK_R=BWD_ROWS, COMPLEX=complex_angles, num_warps=BWD_WARPS)
    return gx, gw_parts.sum(0).to(weight.dtype)


@rms_norm_rope_backward.register_fake
def _(grad, x, weight, cos, sin, eps, complex_angles=False):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, cos, sin, eps, complex_angles = inputs
    ctx.save_for_backward(x, weight, cos, sin)
    ctx.eps, ctx.complex_angles = eps, complex_angles


def _backward(ctx, grad):
    x, weight, cos, sin = ctx.saved_tensors
    gx, gw = rms_norm_rope_backward(grad, x, weight, cos, sin, ctx.eps, ctx.complex_angles)
    return gx, gw, None, None, None, None


rms_norm_rope.register_autograd(_backward, setup_context=_setup_context)
