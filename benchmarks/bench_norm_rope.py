"""q/k RMSNorm + RoPE at IOMM-B shapes: the fused Triton kernel against the PyTorch code (issue 7).

    python benchmarks/bench_norm_rope.py            # CUDA (gpu_check.sh stage 'normrope')

q as a single-stream block produces it: a [B, S, H, D] view into the fused q|k|v|mlp projection
(micro-batch 32, 1024 + 256 tokens, 12 heads of 128, bf16), float32 weight, [S, D] tables.
Times forward and forward + backward (triton.testing.do_bench, median) of:
  eager      RMSNorm then apply_rope, eager PyTorch
  compiled   the same function under torch.compile (the kernels inductor generates in the blocks)
  fused      models/fused_norm_rope.py
each also with the angles as S3-DiT (IOMM-XL) and Qwen-Image pass them (complex [S, D/2]:
apply_complex_rope, rms_norm_complex_rope), and the effective bandwidth over the bytes each must move (forward: read x, write out;
backward: read x and the output gradient, write dL/dx). Prints a table; --out writes normrope.md.

--sweep also times the kernels alone (the custom ops, no autograd) for head vectors per program
(8-64) x warps per program (2-16), forward and backward, to choose FWD_ROWS / FWD_WARPS /
BWD_ROWS / BWD_WARPS in models/fused_norm_rope.py (shipped: its fastest on an H200, forward
8 x 2, backward 64 x 8, fourteenth session). The gradient is a sequence
slice of a longer one, as a double block's is. With --out it writes the fastest forward and
backward choice as `IOMM_NORM_ROPE_CONFIG=fr,fw,br,bw` to OUT/normrope_best.env (gpu_check's
later stages run with it).
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
    ap.add_argument("--sweep", action="store_true", help="also time the kernels alone per (rows, warps) per program")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "needs CUDA"
    from triton.testing import do_bench

    from iomm_scale.models import fused_norm_rope
    from iomm_scale.models.attention import apply_complex_rope, apply_rope, rope_angles
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
    # the output gradient as a double block hands it back: a slice (the image stream) of the
    # concatenated streams' gradient
    g = torch.randn(b, s + n_txt, h, d, device="cuda", dtype=torch.bfloat16)[:, n_txt:]

    def unfused(x):
        return apply_rope(norm(x), cos, sin)

    compiled = torch.compile(unfused, dynamic=False)

    def fused(x):
        return fused_norm_rope.rms_norm_rope(x, norm.weight, cos, sin, norm.eps)

    freqs = torch.complex(cos[..., ::2], sin[..., ::2])  # S3-DiT / Qwen-Image: cos + i sin, [S, D/2]

    def unfused_complex(x):
        return apply_complex_rope(norm(x), freqs.unsqueeze(-2))

    def fused_complex(x):
        return fused_norm_rope.rms_norm_complex_rope(x, norm.weight, freqs, norm.eps)

    elems = b * s * h * d
    fwd_bytes = 2 * elems * 2
    bwd_bytes = 3 * elems * 2
    rows = []
    for name, fn in (("eager", unfused), ("compiled", compiled), ("fused", fused),
                     ("eager, complex angles", unfused_complex),
                     ("compiled, complex angles", torch.compile(unfused_complex, dynamic=False)),
                     ("fused, complex angles", fused_complex)):
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
    best = None
    if args.sweep:
        sweep_lines, best = sweep(x, norm, cos, sin, g, fwd_bytes, bwd_bytes, do_bench)
        lines += sweep_lines
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "normrope.md"), "w") as f:
            f.write(text + "\n")
        if best is not None:
            with open(os.path.join(args.out, "normrope_best.env"), "w") as f:
                f.write(f"IOMM_NORM_ROPE_CONFIG={best}\n")
    return 0


def sweep(x, norm, cos, sin, g, fwd_bytes, bwd_bytes, do_bench) -> tuple[list[str], str | None]:
    """The custom ops alone for each (head vectors, warps) per program -> (table lines, the
    fastest forward and backward as "fr,fw,br,bw", None when nothing ran)."""
    from iomm_scale.models import fused_norm_rope as f

    shipped = (f.FWD_ROWS, f.FWD_WARPS, f.BWD_ROWS, f.BWD_WARPS)
    w = norm.weight.detach()
    timed = []
    lines = ["", "kernels alone (no autograd), per call:", "",
             "| rows x warps | fwd ms | fwd TB/s | bwd ms | bwd TB/s |", "|---|---|---|---|---|"]
    try:
        # each pair is one more Triton compilation of both kernels (~1-2 s); 64 rows: fewer weight-
        # gradient partials in the backward (programs x D floats), more registers per program
        for rows, warps in [(r, nw) for r in (8, 16, 32) for nw in (2, 4, 8)] + [(64, 4), (64, 8), (64, 16)]:
            f.FWD_ROWS = f.BWD_ROWS = rows
            f.FWD_WARPS = f.BWD_WARPS = warps
            try:
                t_f = do_bench(lambda: f.rms_norm_rope(x, w, cos, sin, norm.eps), warmup=5, rep=50)
                t_b = do_bench(lambda: f.rms_norm_rope_backward(g, x, w, cos, sin, norm.eps), warmup=5, rep=50)
            except Exception as e:  # noqa: BLE001 - a configuration the compiler refuses (registers)
                lines.append(f"| {rows} x {warps} | failed: {type(e).__name__} | | | |")
                continue
            lines.append(f"| {rows} x {warps} | {t_f:.3f} | {fwd_bytes / t_f / 1e9:.2f} | {t_b:.3f} | "
                         f"{bwd_bytes / t_b / 1e9:.2f} |")
            timed.append((rows, warps, t_f, t_b))
    finally:
        f.FWD_ROWS, f.FWD_WARPS, f.BWD_ROWS, f.BWD_WARPS = shipped
    if not timed:
        return lines, None
    fwd = min(timed, key=lambda r: r[2])
    bwd = min(timed, key=lambda r: r[3])
    best = f"{fwd[0]},{fwd[1]},{bwd[0]},{bwd[1]}"
    lines += ["", f"fastest: forward {fwd[0]} x {fwd[1]} ({fwd[2]:.3f} ms), backward {bwd[0]} x {bwd[1]} "
                  f"({bwd[3]:.3f} ms): IOMM_NORM_ROPE_CONFIG={best} (the running one: {f.config_text()})"]
    return lines, best


if __name__ == "__main__":
    raise SystemExit(main())
