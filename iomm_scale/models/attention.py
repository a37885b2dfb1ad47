"""One attention entry point for every family, plus the rotary-embedding helpers.

Tensors are sequence-first per head, as flash-attn wants them: q, k, v are [B, S, H, D].
`key_padding_mask` is [B, S_k] bool, True for real tokens. Backends:

    sdpa   torch.nn.functional.scaled_dot_product_attention (any device)
    flash  flash-attn 2 or 3 on CUDA, fp16/bf16; with a padding mask it packs the real
           tokens and calls the variable-length kernel, so padding costs no FLOPs
    math   explicit softmax(QK^T / sqrt(D)) V in float32 (a reference, slow)
    auto   flash when importable, on CUDA and in half precision; else sdpa

Asking for a backend that cannot run here is a clear error (`AttentionBackendError`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash", "math")


class AttentionBackendError(RuntimeError):
    pass


def _import_flash():
    """Return (flash_attn_func, flash_attn_varlen_func, version) or None."""
    try:  # flash-attn 3 (Hopper)
        from flash_attn_interface import flash_attn_func, flash_attn_varlen_func  # type: ignore

        return flash_attn_func, flash_attn_varlen_func, 3
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore

        return flash_attn_func, flash_attn_varlen_func, 2
    except ImportError:
        return None


_FLASH = _import_flash()


def flash_available() -> bool:
    return _FLASH is not None and torch.cuda.is_available()


def check_backend(backend: str) -> None:
    """Fail early (at config time) if `backend` cannot run on this machine."""
    if backend not in BACKENDS:
        raise AttentionBackendError(f"attention_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "flash" and not flash_available():
        why = "flash-attn is not installed" if _FLASH is None else "no CUDA device is visible"
        raise AttentionBackendError(
            f"attention_backend 'flash' is unavailable: {why}. Install the 'gpu' extra on a CUDA machine, "
            "or use 'auto' / 'sdpa'."
        )


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend == "auto":
        if _FLASH is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return "flash"
        return "sdpa"
    if backend == "flash" and not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        check_backend("flash")
        raise AttentionBackendError(f"flash attention needs CUDA fp16/bf16 tensors, got {q.dtype} on {q.device}")
    return backend


def none_if_unpadded(mask: torch.Tensor | None) -> torch.Tensor | None:
    """None when nothing is padded, so attention takes the fast unmasked kernels. Models call it
    once per forward (one host sync), not inside each block: there it would sync once per block
    and break a torch.compile'd block's graph."""
    return None if mask is None or bool(mask.all()) else mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-head attention over [B, S, H, D] tensors; returns [B, S_q, H, D]."""
    backend = resolve_backend(backend, q)
    if backend == "sdpa":
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)
    if backend == "math":
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)
    if backend == "flash":
        return _flash_attention(q, k, v, key_padding_mask)
    raise AttentionBackendError(f"unknown attention backend {backend!r}")


def _flash_attention(q, k, v, key_padding_mask):
    flash_func, varlen_func, version = _FLASH
    if key_padding_mask is None:
        out = flash_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    # Pack the real tokens of every sample into one sequence: padded keys cost nothing.
    # Queries are packed with the same mask only when q and k are the same sequence;
    # otherwise all queries are kept.
    b, sq, h, d = q.shape
    sk = k.shape[1]
    lens_k = key_padding_mask.sum(-1, dtype=torch.int32)
    cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
    k_packed, v_packed = k[key_padding_mask], v[key_padding_mask]
    if sq == sk:
        q_packed, lens_q, cu_q = q[key_padding_mask], lens_k, cu_k
    else:
        q_packed = q.reshape(b * sq, h, d)
        lens_q = torch.full((b,), sq, dtype=torch.int32, device=q.device)
        cu_q = F.pad(lens_q.cumsum(0, dtype=torch.int32), (1, 0))
    out = varlen_func(q_packed, k_packed, v_packed, cu_q, cu_k, int(lens_q.max()), int(lens_k.max()))
    out = out[0] if isinstance(out, tuple) else out
    if sq == sk:
        full = torch.zeros_like(q)
        full[key_padding_mask] = out
        return full
    return out.reshape(b, sq, h, d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x [B, S, H, D] by angles given as
    cos/sin of shape [S, D] or [B, S, D] (each angle repeated for both members of a pair).

    Computed in float32 (float64 stays float64), as FLUX, Qwen-Image and Z-Image all do. Eager: one
    complex multiply, bit-identical to the cos/sin formula and about 3x cheaper. Compiled: the
    real form (`rotate_pairs`), because inductor generates no code for complex ops and would run
    the complex multiply as separate eager kernels inside the compiled block.
    cos/sin stay real tensors so pipeline stages can pass them along."""
    cos, sin = cos[..., ::2], sin[..., ::2]
    cos, sin = (cos[None, :, None], sin[None, :, None]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    if torch.compiler.is_compiling():
        return rotate_pairs(x, cos, sin)
    freqs = torch.complex(cos.contiguous(), sin.contiguous())
    xr = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xc = torch.view_as_complex(xr.unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs.to(xc.dtype)).flatten(-2).to(x.dtype)


def apply_complex_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, D] by complex freqs broadcastable to [B, S, H, D/2]
    (S3-DiT and Qwen-Image keep their tables complex), in float32; the real form when compiled."""
    if torch.compiler.is_compiling():
        angles = torch.view_as_real(freqs)
        return rotate_pairs(x, angles[..., 0], angles[..., 1])
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs).flatten(-2).to(x.dtype)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The real form of the rotation: pairs (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), with
    cos/sin broadcastable to [..., D/2]; in float32 (float64 stays float64). Elementwise only,
    so inductor fuses it with the casts and the q/k norm around it into one kernel."""
    xr = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    x0, x1 = xr.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.to(xr.dtype), sin.to(xr.dtype)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2).to(x.dtype)


def rope_angles(positions: torch.Tensor, axes_dims, theta: float, dtype=torch.float64):
    """cos/sin tables for multi-axis RoPE: positions [..., n_axes] -> two [..., sum(axes_dims)]
    tensors, each axis contributing axes_dims[i] interleaved entries. float64 angles (as FLUX)
    except on devices without float64 (MPS), cast to float32 at the end."""
    if positions.device.type == "mps":
        dtype = torch.float32
    cos_parts, sin_parts = [], []
    for i, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype, device=positions.device) / dim))
        angles = positions[..., i].to(dtype)[..., None] * freqs
        cos_parts.append(angles.cos().repeat_interleave(2, dim=-1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=-1))
    return torch.cat(cos_parts, dim=-1).float(), torch.cat(sin_parts, dim=-1).float()
