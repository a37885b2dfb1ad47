"""Muon for hidden matrices and AdamW for everything else, as one torch optimizer.

The Muon update, per matrix W with gradient g (torch.optim.Muon's and Keller Jordan's form):

    B <- B.lerp(g, 1 - mu)                      momentum, mu = 0.95
    U <- g.lerp(B, mu)  if nesterov else B      Nesterov
    O <- NewtonSchulz(U)                        per *block*, see below
    W <- W * (1 - lr * wd)                      decoupled weight decay (unscaled lr, as torch)
    W <- W - lr * ratio(block) * O              "original":        sqrt(max(1, rows / cols))
                                                "match_rms_adamw": 0.2 * sqrt(max(rows, cols))

A block is the whole matrix, except for fused projections (a module tagged with
`tp_fused_sizes`, e.g. q|k|v): those are orthogonalised per segment, optionally per attention
head, because q, k and v are separate linear maps that happen to share storage. With the same
settings on unfused 2-D parameters this is torch.optim.Muon exactly (bitwise with bf16
Newton-Schulz on CPU; tests/optim/test_muon.py).

Newton-Schulz (quintic, 5 steps, bf16 by default; `ns_dtype="float32"` for exact comparisons):
    X <- U / max(||U||_F, eps) [/ safety]; then per step (a, b, c): A = X X^T; X <- a X + (b A + c A^2) X,
    on the transpose when rows > cols (fewer FLOPs).
  * "keller" (default): (3.4445, -4.7750, 2.0315) every step (Keller Jordan, torch.optim.Muon).
  * "polar_express": per-step coefficients from "The Polar Express: Optimal Matrix Sign Methods
    and Their Application to the Muon Algorithm" (Amsel, Persson, Musco, Gower, 2025,
    arXiv:2505.16932), the 5-step schedule as used in modded-nanogpt's train_gpt.py, which
    divides the input by 1.02 * ||U||_F (the safety factor those coefficients were fitted for).

Routing (`build_muon_param_groups`): hidden 2-D weights -> Muon; the model's
`non_hidden_modules` (embedders, final layers), norms, biases, 1-D/scalar params, >2-D params,
nn.Embedding weights and anything named like `queries` (the Residual Query Adapter) -> AdamW;
AdaLN modulation (`modulation_suffixes`) -> either, by choice; frozen parameters are left out.
The AdamW half is torch.optim.AdamW itself (it shares this optimizer's param-group dicts and
state), so it equals torch.optim.AdamW exactly and LR schedulers see one optimizer.

Distributed variants (data-parallel ownership, tensor-parallel gather) live in muon_dist.py and
reuse the step below through three hooks: `_owns`, `_full_updates`, `_shard`.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
from torch.optim import Optimizer

# Keller Jordan's quintic coefficients (https://kellerjordan.github.io/posts/muon/), torch.optim.Muon's default.
KELLER_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Polar Express, 5 steps: arXiv:2505.16932 (method), coefficients as shipped in
# KellerJordan/modded-nanogpt train_gpt.py (`polar_express_coeffs`), which normalises the input
# by ||X||_F * (1 + 2e-2); the safety factor is part of how they were fitted.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_NORM_SAFETY = 1.02

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16, "float64": torch.float64}
NS_DTYPES = (*_DTYPES, "auto")


def ns_dtype_for(name: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on accelerators, fp32 on CPU (CPUs without native bf16 matmul run bf16
    Newton-Schulz ~10x slower than fp32: benchmarks/RESULTS.md, Muon)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return _DTYPES[name]


# ----------------------------------------------------------------------------------------------
# Newton-Schulz
# ----------------------------------------------------------------------------------------------
def resolve_ns_schedule(coefficients: Any, steps: int, norm_scale: float | None = None):
    """-> (tuple of per-step (a, b, c), norm_scale).

    `coefficients`: "keller" / None, "polar_express", one (a, b, c) triple used every step, or a
    sequence of triples (one per step; the last repeats if `steps` is longer, as in the Polar
    Express reference code). `norm_scale` None picks 1.02 for Polar Express, else 1.0.
    """
    if not 0 < steps < 100:
        raise ValueError(f"ns_steps must be in 1..99, got {steps}")
    if coefficients is None or coefficients == "keller":
        table, default_scale = (KELLER_COEFFICIENTS,), 1.0
    elif coefficients == "polar_express":
        table, default_scale = POLAR_EXPRESS_COEFFICIENTS, POLAR_EXPRESS_NORM_SAFETY
    elif isinstance(coefficients, str):
        raise ValueError(f"unknown ns_coefficients {coefficients!r}: use 'keller', 'polar_express' or numbers")
    elif len(coefficients) == 3 and all(isinstance(x, (int, float)) for x in coefficients):
        table, default_scale = (tuple(float(x) for x in coefficients),), 1.0
    else:
        table = tuple(tuple(float(x) for x in abc) for abc in coefficients)
        if not table or any(len(abc) != 3 for abc in table):
            raise ValueError("ns_coefficients must be (a, b, c) or a sequence of (a, b, c) triples")
        default_scale = 1.0
    schedule = tuple(table[min(i, len(table) - 1)] for i in range(steps))
    return schedule, float(default_scale if norm_scale is None else norm_scale)


def newton_schulz(G: torch.Tensor, schedule: Sequence[tuple[float, float, float]], eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16, norm_scale: float = 1.0) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T (2-D, or a batch [n, rows, cols] of equal blocks).

    The 2-D path is torch.optim.Muon's `_zeropower_via_newtonschulz` op for op (addmm with the
    same beta/alpha), so it matches it bitwise. Returns `dtype`; never modifies G.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"Newton-Schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    X = G.to(dtype, copy=True)  # copy: G may be the momentum buffer itself (nesterov=False)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    norm = X.norm() if X.ndim == 2 else X.norm(dim=(-2, -1), keepdim=True)
    norm = norm.clamp(min=eps)
    if norm_scale != 1.0:
        norm = norm * norm_scale
    X.div_(norm)
    for a, b, c in schedule:
        if X.ndim == 2:
            gram = X @ X.T
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            X = torch.addmm(X, poly, X, beta=a)
        else:
            gram = X @ X.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            X = torch.baddbmm(X, poly, X, beta=a)
    return X.mT if transposed else X


def lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """Update scale for a rows x cols block (torch.optim.muon._adjust_lr without the lr)."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


# ----------------------------------------------------------------------------------------------
# Matrix layouts: how a parameter splits into blocks, and how a tensor-parallel shard maps to it
# ----------------------------------------------------------------------------------------------
# A layout is a plain dict (it is saved in the optimizer's param groups, so it must survive
# torch.load(weights_only=True)):
#   dim       the dim the segments (and the tensor-parallel split) lie along: 0 column, 1 row
#   segments  global segment sizes along `dim` (fused q|k|v...), or None for one segment
#   blocks    per segment, the block size to split it into for Newton-Schulz (a head), or None
#   tp_dim    the dim tensor parallelism shards (== dim), or None when the weight is replicated
# Under tensor parallelism with T ranks, rank r holds the r-th 1/T of every segment, concatenated.
def _segments(layout: dict | None, global_len: int) -> list[int]:
    segs = list(layout["segments"]) if layout and layout.get("segments") else [global_len]
    if sum(segs) != global_len:
        raise ValueError(f"fused segments {segs} do not add up to the weight's width {global_len}")
    return segs


def block_intervals(layout: dict | None, shape: Sequence[int]) -> list[tuple[int, int]]:
    """(start, size) along layout['dim'] of every Newton-Schulz block of the full matrix."""
    dim = layout["dim"] if layout else 0
    segs = _segments(layout, shape[dim])
    sizes = list(layout.get("blocks") or [None] * len(segs)) if layout else [None]
    out, offset = [], 0
    for seg, block in zip(segs, sizes):
        step = block or seg
        if seg % step:
            raise ValueError(f"segment of {seg} does not split into blocks of {step}")
        out += [(offset + k, step) for k in range(0, seg, step)]
        offset += seg
    return out


def shard_pieces(layout: dict | None, global_len: int, world: int, rank: int) -> list[tuple[int, int, int]]:
    """(global_start, local_start, length) along layout['dim'] of what tensor-parallel rank
    `rank` of `world` holds: the rank-th 1/world of every segment (the [q_r | k_r | v_r] layout)."""
    out, g, l = [], 0, 0
    for seg in _segments(layout, global_len):
        if seg % world:
            raise ValueError(f"segment of {seg} does not split evenly over {world} tensor-parallel ranks")
        n = seg // world
        out.append((g + rank * n, l, n))
        g, l = g + seg, l + n
    return out


def assemble_full(chunks: Sequence[torch.Tensor], layout: dict | None) -> torch.Tensor:
    """Full matrix from every tensor-parallel rank's local shard (in rank order)."""
    world, dim = len(chunks), layout["dim"] if layout else 0
    global_len = chunks[0].size(dim) * world
    per_rank = [shard_pieces(layout, global_len, world, r) for r in range(world)]
    parts = []
    for s in range(len(per_rank[0])):
        for r in range(world):
            _, local_start, n = per_rank[r][s]
            parts.append(chunks[r].narrow(dim, local_start, n))
    return torch.cat(parts, dim)


def orthogonalize(full: torch.Tensor, layout: dict | None, group: dict) -> tuple[torch.Tensor, list]:
    """Newton-Schulz on every block of the full update matrix.

    -> (O with full's shape in ns dtype, [(start, size, ratio)] along layout['dim']). Blocks of
    equal shape are orthogonalised as one batch (per-head on GPU is then one kernel, not H).
    """
    schedule, norm_scale = resolve_ns_schedule(group["ns_coefficients"], group["ns_steps"], group["ns_norm_scale"])
    dtype = ns_dtype_for(group["ns_dtype"], full.device)
    dim = layout["dim"] if layout else 0
    intervals = block_intervals(layout, full.shape)

    def shape_of(size):
        return (size, full.size(1)) if dim == 0 else (full.size(0), size)

    blocks = [(start, size, lr_ratio(group["adjust_lr_fn"], *shape_of(size))) for start, size in intervals]
    if len(intervals) == 1:
        return newton_schulz(full, schedule, group["eps"], dtype, norm_scale), blocks
    out = torch.empty(full.shape, dtype=dtype, device=full.device)
    by_size: dict[int, list[int]] = defaultdict(list)
    for start, size in intervals:
        by_size[size].append(start)
    for size, starts in by_size.items():
        if len(starts) == 1:
            ortho = newton_schulz(full.narrow(dim, starts[0], size), schedule, group["eps"], dtype, norm_scale)[None]
        else:
            batch = torch.stack([full.narrow(dim, s, size) for s in starts])
            ortho = newton_schulz(batch, schedule, group["eps"], dtype, norm_scale)
        for k, s in enumerate(starts):
            out.narrow(dim, s, size).copy_(ortho[k])
    return out, blocks


def apply_update(param: torch.Tensor, ortho: torch.Tensor, blocks: list, layout: dict | None,
                 lr: float, weight_decay: float, tp_world: int = 1, tp_rank: int = 0) -> None:
    """W <- W (1 - lr wd) - lr ratio O on the part of the full matrix `param` holds.

    Elementwise, so it gives the same bits whether `param` is the whole matrix or a shard.
    """
    param.mul_(1 - lr * weight_decay)
    dim = layout["dim"] if layout else 0
    world = tp_world if layout and layout.get("tp_dim") is not None else 1
    pieces = shard_pieces(layout, param.size(dim) * world, world, tp_rank if world > 1 else 0)
    for b_start, b_size, ratio in blocks:
        for g_start, l_start, n in pieces:
            lo, hi = max(b_start, g_start), min(b_start + b_size, g_start + n)
            if lo < hi:
                param.narrow(dim, l_start + lo - g_start, hi - lo).add_(
                    ortho.narrow(dim, lo, hi - lo), alpha=-(lr * ratio))


# ----------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------
class MuonWithAdamW(Optimizer):
    """One optimizer, two kinds of param group: `use_muon=True` (Muon) and `use_muon=False`
    (torch.optim.AdamW, run by an inner AdamW that shares these group dicts and this state).

    `params`: groups from `build_muon_param_groups`, groups with a `use_muon` key, or plain
    tensors (2-D -> Muon, others -> AdamW). Muon defaults are torch.optim.Muon's, AdamW defaults
    torch.optim.AdamW's; per-group keys override them. Muon-group keys: lr, momentum, nesterov,
    weight_decay, ns_coefficients, ns_steps, ns_dtype ("bfloat16" | "float32" | "auto"), ns_norm_scale,
    eps, adjust_lr_fn, layouts (per-param, see `block_intervals`).
    """

    def __init__(self, params: Iterable, *, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, ns_coefficients: Any = "keller", ns_steps: int = 5,
                 ns_dtype: str = "bfloat16", ns_norm_scale: float | None = None, eps: float = 1e-7,
                 adjust_lr_fn: str | None = None, adamw_lr: float = 1e-3,
                 adamw_betas: tuple[float, float] = (0.9, 0.999), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float = 1e-2, adamw_kwargs: dict | None = None):
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {ns_dtype!r}")
        resolve_ns_schedule(ns_coefficients, ns_steps, ns_norm_scale)  # fail early on bad coefficients
        self._muon_defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                   ns_coefficients=ns_coefficients, ns_steps=ns_steps, ns_dtype=ns_dtype,
                                   ns_norm_scale=ns_norm_scale, eps=eps, adjust_lr_fn=adjust_lr_fn)
        self._adamw_defaults = dict(lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay,
                                    **(adamw_kwargs or {}))
        self._adamw: torch.optim.AdamW | None = None
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [g for g in ({"params": [p for p in groups if p.ndim == 2], "use_muon": True},
                                  {"params": [p for p in groups if p.ndim != 2], "use_muon": False}) if g["params"]]
        super().__init__(groups, {})

    def add_param_group(self, param_group: dict) -> None:
        if "use_muon" not in param_group:
            raise ValueError("every param group needs use_muon=True (Muon) or False (AdamW)")
        defaults = self._muon_defaults if param_group["use_muon"] else self._adamw_defaults
        for key, value in defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)
        if param_group["use_muon"]:
            param_group.setdefault("layouts", [None] * len(param_group["params"]))
            if len(param_group["layouts"]) != len(param_group["params"]):
                raise ValueError("a Muon group's `layouts` must have one entry per parameter")
            for p in param_group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")
        elif self._adamw is None:
            # The inner AdamW fills its own defaults (amsgrad, foreach, fused...) into this dict.
            self._adamw = torch.optim.AdamW([param_group], **self._adamw_defaults)
            self._adamw.state = self.state
        else:
            self._adamw.add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # load_state_dict builds new group dicts and a new state dict: point the inner AdamW at them.
        if self._adamw is not None:
            self._adamw.param_groups = [g for g in self.param_groups if not g["use_muon"]]
            self._adamw.state = self.state

    # --- hooks for muon_dist.py -----------------------------------------------------------------
    def _owns(self, param: torch.Tensor) -> bool:
        """Whether this rank runs Newton-Schulz for (and keeps the momentum of) `param`."""
        return True

    def _full_updates(self, items: list, updates: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """The full matrices of `updates` (one device: they are already full)."""
        return updates

    def _shard(self) -> tuple[int, int]:
        """(tensor-parallel world size, rank)."""
        return 1, 0

    def _after_muon_group(self, group: dict, stepped: list[torch.Tensor]) -> None:
        """Called once per Muon group after the owned params were updated (one device: nothing)."""

    # --- the step -------------------------------------------------------------------------------
    def _momentum(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        grad = p.grad
        if grad.is_sparse or torch.is_complex(p):
            raise RuntimeError("Muon supports dense real parameters only")
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - group["momentum"])
        return grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def _muon_group_step(self, group: dict) -> None:
        items = [(p, layout) for p, layout in zip(group["params"], group["layouts"])
                 if p.grad is not None and self._owns(p)]
        updates = [self._momentum(p, group) for p, _ in items]
        fulls = self._full_updates(items, updates, group)
        tp_world, tp_rank = self._shard()
        for (p, layout), full in zip(items, fulls):
            ortho, blocks = orthogonalize(full, layout, group)
            apply_update(p, ortho, blocks, layout, group["lr"], group["weight_decay"], tp_world, tp_rank)
        self._after_muon_group(group, [p for p, _ in items])

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group_step(group)
        if self._adamw is not None:
            self._adamw.step()
        return loss


# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------
# Name rules for models that do not declare `non_hidden_modules` (any nn.Module).
FALLBACK_NON_HIDDEN = re.compile(r"(embed|^lm_head$|^head$|^final_layer$|^proj_out$|^output$)")
FALLBACK_MODULATION = re.compile(r"modulation")
_QUERIES = re.compile(r"queries")


def _declared(model: nn.Module, attr: str) -> list[tuple[str, tuple[str, ...]]]:
    """(module path, value) for every module in the tree that declares `attr` (wrappers work)."""
    return [(name, tuple(getattr(m, attr))) for name, m in model.named_modules() if getattr(m, attr, None)]


def _route_one(name: str, p: nn.Parameter, module: nn.Module, module_name: str, non_hidden: list[str] | None,
               modulation_suffixes: list[str] | None, modulation: str) -> tuple[str, str]:
    parts = name.split(".")
    if any(_QUERIES.search(part) for part in parts):
        return "adamw", "queries"
    if non_hidden is not None:
        # a listed module's parameters, or a listed parameter itself (e.g. S3-DiT's pad tokens)
        if any(n == m or n.startswith(m + ".") for m in non_hidden for n in (module_name, name)):
            return "adamw", "non_hidden"
    elif any(FALLBACK_NON_HIDDEN.search(part) for part in parts[:-1]):
        return "adamw", "non_hidden"
    if p.ndim < 2:
        if parts[-1] == "bias":
            return "adamw", "bias"
        is_norm = "norm" in type(module).__name__.lower() or "norm" in parts[-2 if len(parts) > 1 else -1].lower()
        return "adamw", "norm" if is_norm else "vector"
    if p.ndim > 2:
        return "adamw", f"{p.ndim}-D"
    if isinstance(module, nn.Embedding):
        return "adamw", "non_hidden"
    is_mod = (any(module_name.endswith(s) for s in modulation_suffixes) if modulation_suffixes is not None
              else bool(FALLBACK_MODULATION.search(module_name)))
    if is_mod:
        return modulation, "modulation"
    return "muon", "hidden"


def _layout(module: nn.Module, pname: str, p: nn.Parameter, reason: str, split_fused: bool,
            per_head: bool, head_dim: int | None) -> dict:
    style = getattr(module, "tp_style", None)
    fused = getattr(module, "tp_fused_sizes", None) if pname == "weight" else None
    dim = 1 if style == "row" else 0
    layout = {"dim": dim, "segments": None, "blocks": None,
              "tp_dim": dim if style in ("column", "row") else None}
    if split_fused and fused:
        layout["segments"] = [int(s) for s in fused]
    segs = layout["segments"]
    if per_head and segs and style == "column" and len(segs) >= 3:
        # By the layers.py convention the first three segments of a column-fused projection are q|k|v.
        layout["blocks"] = [head_dim if i < 3 and s % head_dim == 0 else None for i, s in enumerate(segs)]
    return layout


def build_muon_param_groups(model: nn.Module, *, modulation: str = "adamw", split_fused: bool = True,
                            per_head: bool = False, head_dim: int | None = None,
                            override: Callable[[str, nn.Parameter], str | None] | None = None,
                            muon: dict | None = None, adamw: dict | None = None) -> list[dict]:
    """Route every trainable parameter of `model` to a Muon or an AdamW group.

    modulation   "adamw" (default) or "muon" for AdaLN modulation weights (split per chunk).
    split_fused  orthogonalise fused projections per segment (True) or as one matrix.
    per_head     split the q|k|v segments further into heads of `head_dim` (default model.cfg.head_dim).
    override     (name, param) -> "muon" | "adamw" | None to force a route (None: the rules decide).
    muon, adamw  extra keys for each group (lr, weight_decay, ...).
    Each group carries `param_names` and `reasons` (what `routing_table` prints).
    """
    if modulation not in ("muon", "adamw"):
        raise ValueError(f"modulation must be 'muon' or 'adamw', got {modulation!r}")
    if per_head and head_dim is None:
        head_dim = getattr(getattr(model, "cfg", None), "head_dim", None)
        if head_dim is None:
            raise ValueError("per_head=True needs head_dim (the model has no cfg.head_dim)")
    declared = _declared(model, "non_hidden_modules")
    non_hidden = [f"{root}.{m}" if root else m for root, mods in declared for m in mods] if declared else None
    declared_mod = _declared(model, "modulation_suffixes")
    mod_suffixes = [s for _, sufs in declared_mod for s in sufs] if declared_mod else None

    groups = {"muon": {"params": [], "param_names": [], "reasons": [], "layouts": [], "use_muon": True,
                       "name": "muon", **(muon or {})},
              "adamw": {"params": [], "param_names": [], "reasons": [], "use_muon": False,
                        "name": "adamw", **(adamw or {})}}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue  # tied weights once; frozen never
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            route, reason = _route_one(name, p, module, module_name, non_hidden, mod_suffixes, modulation)
            forced = override(name, p) if override else None
            if forced is not None:
                if forced not in ("muon", "adamw"):
                    raise ValueError(f"override returned {forced!r} for {name}")
                route, reason = forced, f"override ({reason})" if forced != route else reason
            if route == "muon" and p.ndim != 2:
                raise ValueError(f"{name}: only 2-D parameters can go to Muon, got shape {tuple(p.shape)}")
            g = groups[route]
            g["params"].append(p)
            g["param_names"].append(name)
            g["reasons"].append(reason)
            if route == "muon":
                g["layouts"].append(_layout(module, pname, p, reason, split_fused, per_head, head_dim))
    return [g for g in groups.values() if g["params"]]


def _fmt_layout(layout: dict | None) -> str:
    if not layout or not layout.get("segments"):
        return ""
    segs = layout["segments"]
    blocks = layout.get("blocks") or [None] * len(segs)
    text = "|".join(f"{s}" if not b else f"{s}/{b}" for s, b in zip(segs, blocks))
    return f"  per-segment along dim {layout['dim']}: {text}"


def routing_table(groups: Sequence[dict], model: nn.Module | None = None) -> str:
    """Human-readable routing: counts and every parameter name per group (print at start-up)."""
    lines = []
    for g in groups:
        kind = "muon" if g["use_muon"] else "adamw"
        names = g.get("param_names") or [f"<param {i}>" for i in range(len(g["params"]))]
        reasons = g.get("reasons") or [""] * len(names)
        layouts = g.get("layouts") or [None] * len(names)
        numel = sum(p.numel() for p in g["params"])
        by_reason: dict[str, int] = defaultdict(int)
        for r in reasons:
            by_reason[r or "-"] += 1
        summary = ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items()))
        lines.append(f"[{g.get('name', kind)}] {kind}: {len(names)} tensors, {numel:,} params ({summary})")
        for name, p, reason, layout in zip(names, g["params"], reasons, layouts):
            lines.append(f"    {name:<48} {str(list(p.shape)):<14} {reason}{_fmt_layout(layout)}")
    if model is not None:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        lines.append(f"[frozen] not optimised: {len(frozen)} tensors, "
                     f"{sum(p.numel() for p in model.parameters() if not p.requires_grad):,} params")
        lines += [f"    {n}" for n in frozen]
    return "\n".join(lines)


def build_muon_optimizer(model: nn.Module, cfg, *, dp_group: Any = None, tp_group: Any = None) -> MuonWithAdamW:
    """The run config's Muon (`optim.name: muon`): Muon and AdamW share optim.lr and
    optim.weight_decay (with the default `match_rms_adamw` scaling AdamW's values carry over,
    Moonlight's recipe); AdamW takes optim.betas / optim.eps; Newton-Schulz runs in bf16 on
    GPUs and fp32 on CPUs ("auto") unless optim.muon.ns_dtype says otherwise. With a DP or TP process group the
    result is a `DistributedMuon`. The routing table is kept as `optimizer.routing_table`."""
    o = cfg.optim
    m = o.muon
    gen_cfg = getattr(getattr(model, "generator", model), "cfg", None)  # an IOMMModel's cfg is the run config
    groups = build_muon_param_groups(model, modulation=getattr(m, "modulation", "adamw"),
                                     per_head=getattr(m, "per_head", False),
                                     head_dim=getattr(gen_cfg, "head_dim", None))
    kwargs = dict(lr=o.lr, momentum=m.momentum, nesterov=m.nesterov, weight_decay=o.weight_decay,
                  ns_steps=m.ns_steps, ns_coefficients=getattr(m, "ns_coefficients", "keller"),
                  ns_dtype=getattr(m, "ns_dtype", "auto"),
                  adjust_lr_fn=m.scaling, adamw_lr=o.lr, adamw_betas=tuple(o.betas), adamw_eps=o.eps,
                  adamw_weight_decay=o.weight_decay)
    if dp_group is not None or tp_group is not None:
        from .muon_dist import DistributedMuon

        optimizer = DistributedMuon(groups, dp_group=dp_group, tp_group=tp_group, **kwargs)
    else:
        optimizer = MuonWithAdamW(groups, **kwargs)
    optimizer.routing_table = routing_table(groups, model)
    return optimizer
