"""q/k RMSNorm + RoPE at IOMM-B shapes: the fused Triton kernel against the PyTorch code (issue 7).

    python benchmarks/bench_norm_rope.py            # CUDA (gpu_check.sh stage 'normrope')

q as a single-stream block produces it: a [B, S, H, D] view into the fused q|k|v|mlp projection
(micro-batch 32, 1024 + 256 tokens, 12 heads of 128, bf16), float32 weight, [S, D] tables.
Times forward and forward + backward (triton.testing.do_bench, median) of:
  eager      RMSNorm then apply_rope, eager PyTorch
  compiled   the same function under torch.compile (the kernels inductor generates in the blocks)
  fused      models/fused_norm_rope.py
and the effective bandwidth over the bytes each must move (forward: read x, write out;
backward: read x and the output gradient, write dL/dx). Prints a table; --out writes normrope.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "needs CUDA"
    from triton.testing import do_bench

    from iomm_scale.models import fused_norm_rope
    from iomm_scale.models.attention import apply_rope, rope_angles
    from iomm_scale.models.layers import RMSNorm

    b, n_img, n_txt, h, d = args.batch, 1024, 256, 12, 128
    s = n_img + n_txt
    dim = h * d
    fused_proj = torch.randn(b, s, 7 * dim, device="cuda", dtype=torch.bfloat16)
    x = fused_proj[..., dim: 2 * dim].unflatten(-1, (h, d)).requires_grad_(False)
    side = int(n_img ** 0.5)
    ids = torch.cat([torch.zeros(n_txt, 3), torch.stack([torch.zeros(n_img), torch.arange(n_img) // side,
                                                         torch.arange(n_img) % side], -1)]).cuda()
    cos, sin = rope_angles(ids, (16, 56, 56), 10000.0)
    norm = RMSNorm(d).cuda()
    g = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)

    def unfused(x):
        return apply_rope(norm(x), cos, sin)

    compiled = torch.compile(unfused, dynamic=False)

    def fused(x):
        return fused_norm_rope.rms_norm_rope(x, norm.weight, cos, sin, norm.eps)

    elems = b * s * h * d
    fwd_bytes = 2 * elems * 2
    bwd_bytes = 3 * elems * 2
    rows = []
    for name, fn in (("eager", unfused), ("compiled", compiled), ("fused", fused)):
        xg = x.detach().requires_grad_()

        def fwd():
            with torch.no_grad():
                fn(x)

        def fwd_bwd():
            out = fn(xg)
            out.backward(g)
            xg.grad = None
            norm.weight.grad = None

        fwd_bwd()
        t_f = do_bench(fwd, warmup=10, rep=100)
        t_fb = do_bench(fwd_bwd, warmup=10, rep=100)
        t_b = t_fb - t_f  # do_bench gives milliseconds
        rows.append((name, t_f, t_fb, fwd_bytes / (t_f * 1e-3) / 1e9, bwd_bytes / (max(t_b, 1e-6) * 1e-3) / 1e9))
    lines = [f"q/k RMSNorm + RoPE, x [{b}, {s}, {h}, {d}] bf16 (a view into the fused projection), "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}; per call (q or k of one block)", "",
             "| implementation | fwd ms | fwd+bwd ms | fwd GB/s | bwd GB/s |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {f:.3f} | {fb:.3f} | {bf:.0f} | {bb:.0f} |" for n, f, fb, bf, bb in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "normrope.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
