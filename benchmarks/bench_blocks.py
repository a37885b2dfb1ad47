"""Forward + backward time of our generator blocks against diffusers' (issue 3).

One block of each family (FLUX double, FLUX single, Z-Image, Qwen-Image), ours and diffusers',
same weights (converted by our adapters), same inputs, same process, CPU fp32; then whole
models at a small config. Repeats are interleaved in back-to-back pairs (ours / diffusers,
order alternating) so load on a shared machine hits both alike; medians are reported, the
ratio as the median of the per-pair ratios.

    python benchmarks/bench_blocks.py [--repeats 7] [--threads N] [--only NAME]

Wall-clock time is what the table reports first; on a shared machine it is noisy, so the
ratio of process CPU time (less sensitive to other load, best with --threads 1) is printed
beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, ZImageTransformer2DModel
from iomm_scale.models.adapters import flux as flux_adapter
from iomm_scale.models.adapters import qwen_image as qwen_adapter
from iomm_scale.models.adapters import zimage as zimage_adapter
from iomm_scale.models.adapters.common import load_into
from iomm_scale.models.attention import rope_angles
from iomm_scale.models.flux_mmdit import FluxMMDiT, pack_latents
from iomm_scale.models.qwen_mmdit import QwenMMDiT, qwen_positions
from iomm_scale.models.qwen_mmdit import rope_tables as qwen_rope
from iomm_scale.models.s3dit import S3DiT
from iomm_scale.models.s3dit import rope_tables as zimage_rope

B, N_IMG, N_TXT = 2, 1024, 256  # batch, image tokens (32 x 32), condition tokens
HEADS, HEAD_DIM = 4, 128  # hidden 512


def ours_from(ref, adapter, model_cls):
    """Our model with the diffusers model's weights (converted in memory)."""
    cfg = adapter.config_from_diffusers(dict(ref.config), attention_backend="sdpa")
    ours = model_cls(cfg)
    load_into(ours, adapter.key_maps(cfg), ref.state_dict().items())
    return ours


def leaf(*shape, g):
    return torch.randn(*shape, generator=g).requires_grad_(True)


def fwd_bwd(module, make_args):
    """One forward + backward; inputs that require grad get gradients too (as inside a model)."""
    args = make_args()
    for p in module.parameters():
        p.grad = None
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            a.grad = None
    out = module(*args)
    outs = out if isinstance(out, (tuple, list)) else [out]
    sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor)).backward()


def time_pair(ours, theirs, repeats: int, warmup: int = 2):
    """fwd+bwd timed in back-to-back pairs (order alternating), so both sides of a pair see the
    same load from other jobs. Returns median wall seconds (ours, diffusers) and the medians of
    the per-pair ratios ours / diffusers in wall and in process CPU time."""
    for _ in range(warmup):
        fwd_bwd(*ours)
        fwd_bwd(*theirs)
    wall, ratio_wall, ratio_cpu = {"ours": [], "diffusers": []}, [], []
    for r in range(repeats):
        order = (("ours", ours), ("diffusers", theirs)) if r % 2 == 0 else (("diffusers", theirs), ("ours", ours))
        w, c = {}, {}
        for name, case in order:
            w0, c0 = time.perf_counter(), time.process_time()
            fwd_bwd(*case)
            w[name], c[name] = time.perf_counter() - w0, time.process_time() - c0
            wall[name].append(w[name])
        ratio_wall.append(w["ours"] / w["diffusers"])
        ratio_cpu.append(c["ours"] / c["diffusers"])
    med = statistics.median
    return med(wall["ours"]), med(wall["diffusers"]), med(ratio_wall), med(ratio_cpu)


class Call(torch.nn.Module):
    """Adapts a block to `module(*args)` with fixed keyword arguments."""

    def __init__(self, block, fn):
        super().__init__()
        self.block, self.fn = block, fn

    def forward(self, *args):
        return self.fn(self.block, *args)


def flux_cases(g):
    dim = HEADS * HEAD_DIM
    ref = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                 attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=dim,
                                 pooled_projection_dim=dim, axes_dims_rope=(16, 56, 56))
    ours = ours_from(ref, flux_adapter, FluxMMDiT)
    _, img_ids = pack_latents(torch.zeros(1, 16, 64, 64))
    ids = torch.cat([torch.zeros(N_TXT, 3), img_ids], 0)
    ref_rope = ref.pos_embed(ids)
    our_rope = rope_angles(ids, (16, 56, 56), 10000.0)
    img, txt, temb = leaf(B, N_IMG, dim, g=g), leaf(B, N_TXT, dim, g=g), torch.randn(B, dim, generator=g)
    x = torch.cat([txt, img], 1).detach().requires_grad_(True)
    double = (
        (Call(ours.double_blocks[0], lambda b, i, t: b(i, t, temb, our_rope, None)), lambda: (img, txt)),
        (Call(ref.transformer_blocks[0], lambda b, i, t: b(i, t, temb, ref_rope)), lambda: (img, txt)),
    )
    single = (
        (Call(ours.single_blocks[0], lambda b, x: b(x, temb, our_rope, None)), lambda: (x,)),
        (Call(ref.single_transformer_blocks[0], lambda b, i, t: b(i, t, temb, ref_rope)), lambda: (img, txt)),
    )
    return {"FLUX double block": double, "FLUX single block": single}


def zimage_cases(g):
    dim = HEADS * HEAD_DIM
    ref = ZImageTransformer2DModel(dim=dim, n_layers=1, n_refiner_layers=0, n_heads=HEADS, n_kv_heads=HEADS,
                                   cap_feat_dim=dim, axes_dims=[32, 48, 48])
    ours = ours_from(ref, zimage_adapter, S3DiT)
    # unified sequence [image 32 x 32 | condition], ids as Z-Image builds them
    hw = torch.stack(torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.full((N_IMG, 1), N_TXT + 1), hw], 1)
    cap_ids = torch.stack([torch.arange(1, N_TXT + 1), torch.zeros(N_TXT, dtype=torch.long), torch.zeros(N_TXT, dtype=torch.long)], 1)
    ids = torch.cat([img_ids, cap_ids], 0)
    ref_rope = ref.rope_embedder(ids)[None].expand(B, -1, -1)
    our_rope = zimage_rope(ids[None].expand(B, -1, -1), (32, 48, 48), 256.0)
    x, temb = leaf(B, N_IMG + N_TXT, dim, g=g), torch.randn(B, 256, generator=g)
    return {"Z-Image block": (
        (Call(ours.layers[0], lambda b, x: b(x, our_rope, None, temb)), lambda: (x,)),
        (Call(ref.layers[0], lambda b, x: b(x, None, ref_rope, temb)), lambda: (x,)),
    )}


def qwen_cases(g):
    dim = HEADS * HEAD_DIM
    ref = QwenImageTransformer2DModel(num_layers=1, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                      joint_attention_dim=dim)
    ours = ours_from(ref, qwen_adapter, QwenMMDiT)
    shapes = [(1, 32, 32)]
    ref_rope = ref.pos_embed(shapes, max_txt_seq_len=N_TXT, device=torch.device("cpu"))
    img_ids, txt_ids = qwen_positions(shapes, N_TXT)
    img_rope, txt_rope = qwen_rope(img_ids, (16, 56, 56), 10000.0), qwen_rope(txt_ids, (16, 56, 56), 10000.0)
    img, txt, temb = leaf(B, N_IMG, dim, g=g), leaf(B, N_TXT, dim, g=g), torch.randn(B, dim, generator=g)
    return {"Qwen-Image block": (
        (Call(ours.double_blocks[0], lambda b, i, t: b(i, t, temb, img_rope, txt_rope, None)), lambda: (img, txt)),
        (Call(ref.transformer_blocks[0], lambda b, i, t: b(i, t, None, temb, ref_rope)), lambda: (img, txt)),
    )}


def whole_model_cases(g):
    """Small whole models, called through forward_tokens (our diffusers-shaped entry point)."""
    dim, heads, hd = 256, 4, 64
    latent, n_txt = torch.randn(B, 16, 32, 32, generator=g), 64  # 256 image tokens of 2 x 2 latent patches
    cases = {}

    ref = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=hd,
                                 num_attention_heads=heads, joint_attention_dim=dim, pooled_projection_dim=dim,
                                 axes_dims_rope=(16, 24, 24))
    ours = ours_from(ref, flux_adapter, FluxMMDiT)
    tokens, img_ids = pack_latents(latent)
    c, pooled, t, txt_ids = torch.randn(B, n_txt, dim, generator=g), torch.randn(B, dim, generator=g), torch.rand(B), torch.zeros(n_txt, 3)
    cases["FLUX model (2 double + 4 single, hidden 256)"] = (
        (Call(ours, lambda m, x: m.forward_tokens(x, c, pooled, t, img_ids, txt_ids)), lambda: (tokens,)),
        (Call(ref, lambda m, x: m(x, c, pooled, t, img_ids, txt_ids, return_dict=False)[0]), lambda: (tokens,)),
    )

    ref = ZImageTransformer2DModel(dim=dim, n_layers=4, n_refiner_layers=1, n_heads=heads, n_kv_heads=heads, cap_feat_dim=dim,
                                   axes_dims=[16, 24, 24])
    ours = ours_from(ref, zimage_adapter, S3DiT)
    xs, caps = [lat[:, None] for lat in latent], [torch.randn(n_txt, dim, generator=g) for _ in range(B)]
    cases["Z-Image model (1+1 refiners + 4 layers, hidden 256)"] = (
        (Call(ours, lambda m, t: m.forward_tokens(xs, t, caps)), lambda: (torch.rand(B),)),
        (Call(ref, lambda m, t: m(xs, t, caps, return_dict=False)[0]), lambda: (torch.rand(B),)),
    )

    ref = QwenImageTransformer2DModel(num_layers=4, attention_head_dim=hd, num_attention_heads=heads, joint_attention_dim=dim,
                                      axes_dims_rope=(16, 24, 24))
    ours = ours_from(ref, qwen_adapter, QwenMMDiT)
    shapes = [[(1, 16, 16)]] * B
    cases["Qwen-Image model (4 layers, hidden 256)"] = (
        (Call(ours, lambda m, x: m.forward_tokens(x, c, None, t, shapes)), lambda: (tokens,)),
        (Call(ref, lambda m, x: m(x, c, None, t, shapes, return_dict=False)[0]), lambda: (tokens,)),
    )
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cases = {**flux_cases(g), **zimage_cases(g), **qwen_cases(g), **whole_model_cases(g)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32, median of {args.repeats} interleaved "
          f"repeats; blocks: batch {B}, {N_IMG} image + {N_TXT} condition tokens, hidden {HEADS * HEAD_DIM} "
          f"({HEADS} heads x {HEAD_DIM}); whole models: batch {B}, 256 image + 64 condition tokens")
    print("| forward + backward | ours wall (s) | diffusers wall (s) | ours / diffusers (wall) | ours / diffusers (CPU time) |")
    print("|---|---|---|---|---|")
    for name, (ours, theirs) in cases.items():
        if args.only and args.only not in name:
            continue
        a, b, rw, rc = time_pair(ours, theirs, args.repeats)
        print(f"| {name} | {a:.3f} | {b:.3f} | {rw:.2f} | {rc:.2f} |", flush=True)


if __name__ == "__main__":
    main()
