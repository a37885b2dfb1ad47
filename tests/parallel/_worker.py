"""Multi-process parity worker, launched by tests/parallel/test_*.py under torchrun.

    torchrun --nproc_per_node N tests/parallel/_worker.py OUT.json SCENARIO [SCENARIO ...]

One process group runs several scenarios (start-up dominates on CPU). Each scenario
builds a tiny model, trains it 3 steps under a layout through ParallelRuntime, and
compares with a single-process reference computed on every rank on the same global
batch (same per-(dp rank, micro-batch) seeds): losses of every step, and the final
trainable parameters (gathered to single-device shapes). Results (max relative
differences) go to OUT.json from rank 0; the pytest side asserts the tolerances.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import types
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("DS_BUILD_OPS", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from iomm_scale.parallel.config import ParallelConfig  # noqa: E402
from iomm_scale.parallel.groups import init_distributed, init_parallel_state  # noqa: E402
from iomm_scale.parallel.runtime import ParallelRuntime, default_loss_fn, dp_slice, micro_seed, split_batch  # noqa: E402

STEPS = int(os.environ.get("IOMM_TEST_STEPS", "3"))
LR, EPS = 1e-3, 1e-6
CLIP = float(os.environ.get("IOMM_TEST_CLIP", "0.05"))
EMA_DECAY = 0.9  # the formula is decay-independent; 0.9 makes 3 steps move the EMA measurably
SEED = 1234


# --------------------------------------------------------------------------- models/data
def flux_cfg(**kw):
    from iomm_scale.models.flux_mmdit import FluxConfig

    base = dict(in_channels=16, num_layers=2, num_single_layers=2, num_heads=4, head_dim=16, context_dim=32,
                pooled_dim=32, axes_dims_rope=(4, 6, 6), latent_patch=2, attention_backend="sdpa")
    base.update(kw)
    return FluxConfig(**base)


def build_generator(family="flux", **flux_kw):
    torch.manual_seed(0)
    if family == "flux":
        from iomm_scale.models.flux_mmdit import FluxMMDiT

        return FluxMMDiT(flux_cfg(**flux_kw))
    from iomm_scale.models.registry import FAMILIES

    cfg_cls, model_cls = FAMILIES[family]
    return model_cls(tiny_family_cfg(family, cfg_cls))


def tiny_family_cfg(family, cfg_cls):
    if family == "s3dit":
        return cfg_cls(**_s3dit_kwargs())
    if family == "qwen_mmdit":
        return cfg_cls(**_qwen_kwargs())
    raise KeyError(family)


def _s3dit_kwargs():
    return dict(in_channels=4, num_layers=4, num_refiner_layers=1, num_heads=4, head_dim=16, context_dim=32,
                axes_dims=(4, 6, 6), attention_backend="sdpa")


def _qwen_kwargs():
    return dict(in_channels=16, out_channels=4, num_layers=4, num_heads=4, head_dim=16, context_dim=32,
                axes_dims_rope=(4, 6, 6), attention_backend="sdpa")


def generator_batch(gen, step: int, n: int) -> dict:
    g = torch.Generator().manual_seed(SEED + step)
    c = getattr(gen.cfg, "latent_channels", 4)
    x = torch.randn(n, c, 8, 8, generator=g)
    noise = torch.randn(n, c, 8, 8, generator=g)
    t = torch.rand(n, generator=g)
    ctx = gen.cfg.context_dim
    cond = torch.randn(n, 6, ctx, generator=g)
    mask = torch.ones(n, 6, dtype=torch.bool)
    mask[1::3, 4:] = False
    tt = t.view(-1, 1, 1, 1)
    return {"x_t": (1 - tt) * x + tt * noise, "t": t, "cond": cond, "cond_mask": mask, "target": noise - x}


def build_iomm_model(config: str = "tiny.yaml", resolution: int = 16):
    from iomm_scale.config import load_config
    from iomm_scale.iomm import build_iomm

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", config),
                      [f"data.resolution={resolution}", "flow.cond_dropout=0.25"])
    return build_iomm(cfg)


def iomm_batch(model, step: int, n: int, captions: bool = False) -> dict:
    """Random images; with `captions`, a mixed batch: a third of the samples captioned, where
    (step + j) % 3 == 1 (prompts of other lengths, left-padded to the micro-batch's longest), so
    data-parallel ranks' slices hold different numbers of captions (ZeRO-3 deadlocked on that)."""
    g = torch.Generator().manual_seed(SEED + step)
    res = model.cfg.data.resolution
    batch = {"pixels": torch.rand(n, 3, res, res, generator=g) * 2 - 1}
    if captions:
        batch["captions"] = [None if (step + j) % 3 != 1 else "a small red square" + " on blue" * ((step + j) % 4)
                             for j in range(n)]
    return batch


def optimizer_fn(params):
    # weight_decay 0 (the paper's setting): DeepSpeed's flat optimizers decay parameters that
    # got no gradient (e.g. the unused text stream of Qwen's last block), torch skips them.
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=0.0)


# --------------------------------------------------------------------------- reference
def reference(model, make_batch, dp: int, m: int, steps: int, loss_fn=default_loss_fn, start_state=None,
              make_opt=None, clip=None, ema_decay=None, ema_out=None, norms_out=None, skip_steps=()):
    """Single process: walks the same (dp rank, micro-batch) slices with the same seeds.
    `make_opt(model)` builds the optimizer (default: AdamW over the trainable parameters).
    `ema_decay`: the single-process trainer's EMA (optim/builder.EMA) after every step, its
    shadow appended to the list `ema_out` per step. `norms_out`: the global gradient norm
    before clipping appended per step (what the runtime reports: clip and AdamW undo a uniform
    gradient scale in the parameters, the norm shows it). `skip_steps`: steps that apply no update
    (what a non-finite step does, train/nonfinite.py); their batches and seeds are still used up."""
    from iomm_scale.optim.builder import EMA

    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_opt(model) if make_opt is not None else optimizer_fn(params)
    trainable = lambda: {n: p for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    ema = EMA(trainable(), ema_decay) if ema_decay else None
    clip = CLIP if clip is None else clip
    losses, history = [], []
    for step in range(steps):
        batch = make_batch(model, step)
        total = 0.0
        for r in range(dp):
            for i, mb in enumerate(split_batch(dp_slice(batch, dp, r), m)):
                torch.manual_seed(micro_seed(0, step, r, i))
                loss = loss_fn(model, mb)
                (loss / (dp * m)).backward()
                total += loss.item() / (dp * m)
        if norms_out is not None:
            norms_out.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params
                                                                          if p.grad is not None]))))
        if step in skip_steps:
            opt.zero_grad(set_to_none=True)
            losses.append(total)
            history.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
            continue
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(trainable())
            ema_out.append({n: v.clone() for n, v in ema.shadow.items()})
        losses.append(total)
        history.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    return losses, history


def absmax(t: torch.Tensor) -> float:
    """max |t| as a float, NaN read as inf: Python's max() drops a NaN in second place
    (max(0.0, nan) == 0.0), which would let NaN weights pass every comparison below."""
    v = float(t.abs().max())
    return math.inf if math.isnan(v) else v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return absmax(a - b) / max(absmax(b), 1e-12)


def run_layout(model, make_batch, pcfg, micro_batch, steps=STEPS, opt_fn=optimizer_fn, clip=CLIP,
               persistence_threshold=0, after_build=None, **build_kw):
    lay = init_parallel_state(pcfg)
    rt = ParallelRuntime.build(copy.deepcopy(model), pcfg, opt_fn, micro_batch=micro_batch, grad_clip=clip,
                               persistence_threshold=persistence_threshold, **build_kw)
    if after_build is not None:
        after_build(rt)
    losses, rt.test_grad_norms, rt.test_applied = [], [], []
    for step in range(rt.step, rt.step + steps):
        batch = dp_slice(make_batch(model, step), lay.dp, lay.dp_rank)
        out = rt.train_step(batch)
        losses.append(out["loss"])
        rt.test_grad_norms.append(out["grad_norm"])
        rt.test_applied.append(out["applied"])
    return rt, losses


def compare(rt, losses, ref_losses, ref_params, init_params=None) -> dict:
    """Max relative differences: losses, final params, and (with init_params) the total
    update final - initial, which is the sharper check (it is ~lr*steps, not ~|param|)."""
    from iomm_scale.parallel.reshard import full_state

    full = full_state(rt, with_moments=False)["params"]
    # param_rel: max |p - p_ref| over all params / max |p_ref| over all params (global scale);
    # update_rel: per param max |dp - dp_ref| / max(max |dp_ref|, lr / 100), worst param.
    worst_abs, scale, worst_name, worst_upd, moved = 0.0, 0.0, "", 0.0, 0.0
    for name, v in full.items():
        ref = ref_params[name]
        if init_params is not None:
            moved = max(moved, absmax(ref - init_params[name]))
        d = absmax(v - ref)
        scale = max(scale, absmax(ref))
        if d > worst_abs:
            worst_abs, worst_name = d, name
        if init_params is not None:
            du, dr = v - init_params[name], ref - init_params[name]
            worst_upd = max(worst_upd, absmax(du - dr) / max(absmax(dr), LR / 100))
            if os.environ.get("IOMM_TEST_DEBUG"):
                print(f"[rank {dist.get_rank()}] {name} upd_rel={absmax(du - dr) / max(absmax(dr), LR / 100):.3g}", flush=True)
    t = torch.tensor([worst_abs, worst_upd])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    sc = torch.tensor([scale])
    dist.all_reduce(sc, op=dist.ReduceOp.MAX)
    t[0] = t[0] / sc[0]
    n = torch.tensor([len(full)])
    dist.all_reduce(n)
    loss_diff = max(math.inf if math.isnan(a - b) else abs(a - b) / max(abs(b), 1e-12)
                    for a, b in zip(losses, ref_losses))
    return {"loss_rel": loss_diff, "param_rel": float(t[0]), "update_rel": float(t[1]), "worst_param": worst_name,
            "losses": losses,
            "ref_losses": ref_losses, "n_params_checked": int(n[0]), "ref_update_max": moved}


def compare_eval(rt, model, ref_params: dict, micro: int, n: int, ref_ema: dict | None = None) -> dict:
    """Held-out evaluation (train/evaluate.py) through the runtime, micro-batches dealt out over
    the DP replicas, against the single-process evaluation of the reference's final weights, on
    a mixed set (image-only and captioned samples);
    with `ref_ema`, also with the runtime's EMA swapped into the engine's weights (and the live
    weights restored bit for bit afterwards)."""
    from iomm_scale.parallel.reshard import full_state
    from iomm_scale.train.evaluate import EvalSet, evaluate

    batches = [iomm_batch(model, 1000 + k, micro, captions=True) for k in range(-(-n // micro))]
    eval_set = EvalSet.from_batches(batches, seed=5, limit=n)
    share = copy.copy(eval_set)  # what a launcher's rank keeps: its replica's micro-batches (and batch 0)
    share.keep_share(rt.layout.dp, rt.layout.dp_rank)
    group = rt.layout.dp_group()

    def distributed(prefix):
        return evaluate(share, rt.sample_losses, dp=rt.layout.dp, dp_rank=rt.layout.dp_rank,
                        all_reduce=lambda v: dist.all_reduce(v, group=group), prefix=prefix)

    def single_process(weights, prefix):
        single = copy.deepcopy(model)
        with torch.no_grad():
            for name, prm in single.named_parameters():
                if name in weights:
                    prm.copy_(weights[name])
            return evaluate(eval_set, single.sample_losses, prefix=prefix)

    got, want = distributed("eval/"), single_process(ref_params, "eval/")
    out = {"eval_samples": got["eval/samples"], "eval_batches": len(eval_set.batches)}
    if ref_ema is not None:
        before = full_state(rt, with_moments=False)["params"]
        backup = rt.ema.swap_in()
        got.update(distributed("eval_ema/"))
        rt.ema.restore(backup)
        after = full_state(rt, with_moments=False)["params"]
        want.update(single_process(ref_ema, "eval_ema/"))
        out["eval_live_restored"] = before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                                          for k in before)
        out["eval_ema_vs_live"] = abs(want["eval_ema/loss"] - want["eval/loss"]) / want["eval/loss"]
        persistent = [p for p in rt.module.parameters() if p.requires_grad and getattr(p, "ds_persist", False)]
        out["persistent_trainable"] = len(persistent)
    keys = [k for k in want if "/loss" in k]
    out.update(eval_rel=max(abs(got[k] - want[k]) / abs(want[k]) for k in keys), eval_keys=len(keys))
    return out


def compare_samples(rt, model, ref_params: dict, ref_ema: dict | None = None) -> dict:
    """Mid-run sample grids (eval.sample_every under the launchers): every rank samples in place
    through the runtime (rt.sample_grid: TP collectives, ZeRO-3 gathers, pipeline stages) with
    the EMA swapped in when kept, as DistributedTrainer.write_step_samples does; on the first
    stage against one process sampling the reference's final weights (EMA) with the same
    references and seed."""
    from iomm_scale.train.evaluate import rng_devices
    from iomm_scale.train.trainer import sample_grid

    from iomm_scale import flow

    cfg, dev = model.cfg, torch.device("cpu")
    backup = rt.ema.swap_in() if ref_ema is not None else None
    rows, euler_sample = [], flow.euler_sample  # the rows this rank samples (its share of the grid)
    flow.euler_sample = lambda velocity, noise, *a, **k: (rows.append(noise.shape[0]), euler_sample(velocity, noise, *a, **k))[1]
    try:
        with torch.random.fork_rng(devices=rng_devices(dev)):
            refs, images = rt.sample_grid(cfg, dev)
    finally:
        flow.euler_sample = euler_sample
        if backup is not None:
            rt.ema.restore(backup)
    if images is None:  # a later pipeline stage: it served the first stage's velocity calls
        return {"samples_on_this_stage": False}
    def single_process(weights):
        single = copy.deepcopy(model).eval()
        with torch.no_grad():
            for name, prm in single.named_parameters():
                if name in weights:
                    prm.copy_(weights[name])
        with torch.random.fork_rng(devices=rng_devices(dev)):
            return sample_grid(single, cfg, dev)

    want_refs, want = single_process(ref_ema if ref_ema is not None else ref_params)
    out = {"samples_shape": list(images.shape), "samples_rel": rel(images, want), "samples_rows_here": rows,
           "samples_refs_equal": bool(torch.equal(refs, want_refs)), "samples_spread": float(images.std())}
    if ref_ema is not None:  # the EMA's samples are other ones: the swap is not vacuous
        out["samples_ema_vs_live"] = rel(single_process(ref_params)[1], want)
    return out


def compare_ema(rt, ref_ema: dict, init_params: dict, ref_params: dict | None = None) -> dict:
    """The runtime's EMA (gathered to single-device shapes, this rank's stage) against the
    single-process EMA: ema_rel = max |e - e_ref| / max |e_ref| (global, like param_rel);
    ema_update_rel = per tensor max |(e - e0) - (e_ref - e0)| / max(max |e_ref - e0|, lr / 100),
    worst tensor (like update_rel); ema_vs_live = max |e_ref - p_ref| / max |e_ref - e0|: how far
    the EMA is from the live weights, so that the check is not vacuous."""
    full = rt.ema.full(rt.module)
    worst_abs, scale, worst_upd, vs_live = 0.0, 0.0, 0.0, 0.0
    for name, v in full.items():
        ref, e0 = ref_ema[name], init_params[name]
        worst_abs = max(worst_abs, absmax(v - ref))
        scale = max(scale, absmax(ref))
        moved = max(absmax(ref - e0), LR / 100)
        worst_upd = max(worst_upd, absmax((v - e0) - (ref - e0)) / moved)
        if ref_params is not None:
            vs_live = max(vs_live, absmax(ref - ref_params[name]) / moved)
    t = torch.tensor([worst_abs, worst_upd, vs_live, scale])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    n = torch.tensor([len(full)])
    dist.all_reduce(n)
    return {"ema_rel": float(t[0] / t[3]), "ema_update_rel": float(t[1]), "ema_vs_live": float(t[2]),
            "ema_tensors_checked": int(n[0])}


def ema_bytes(rt) -> list[list[int]]:
    """Per global rank: [EMA bytes held, trainable elements of this rank's (TP-local, stage)
    parameters, 1 if the EMA covers exactly the trainable parameters (no frozen one), pp rank]."""
    local = [q for q in rt.module.parameters() if q.requires_grad]
    numel = sum(int(q.ds_numel) if hasattr(q, "ds_numel") else q.numel() for q in local)
    names_ok = set(rt.ema.shadow) == {n for n, q in rt.module.named_parameters() if q.requires_grad}
    return _gather_ints([rt.ema.local_bytes(), numel, int(names_ok), rt.layout.pp_rank])


def teardown(rt):
    try:
        rt.engine.destroy()
    except Exception:
        pass
    from iomm_scale.parallel.groups import destroy_parallel_state

    destroy_parallel_state()


# --------------------------------------------------------------------------- scenarios
@contextlib.contextmanager
def _compile_enabled(on: bool):
    """The launch sets TORCH_COMPILE_DISABLE (DeepSpeed's compiled Muon kernels would cost minutes
    of inductor on CPU); a compile scenario turns dynamo back on for itself only."""
    import torch._dynamo

    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = before and not on
    if on:  # a fresh dynamo cache: earlier scenarios' graphs count against the recompile limit
        torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.config.disable = before


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _layout(p: dict) -> tuple[int, int, int]:
    """(dp, micro-batches per step, micro-batch size) of a scenario's layout keywords (pops `micro`)."""
    dp = dist.get_world_size() // (p.get("tp", 1) * p.get("pp", 1))
    return dp, p.get("num_microbatches", 1), p.pop("micro", 2)


def scenario_generator(name: str, family="flux", **p) -> dict:
    dp, m, micro = _layout(p)
    ema_decay = p.pop("ema_decay", None)
    compile_backend = p.pop("compile_backend", None)
    clip = p.pop("clip", CLIP)
    pcfg = ParallelConfig(**p)
    gen = build_generator(family)
    make = lambda model, step: generator_batch(gen, step, dp * m * micro)  # noqa: E731
    ref_ema: list = []
    ref_norms: list = []
    ref_losses, hist = reference(gen, make, dp, m, STEPS, clip=clip, ema_decay=ema_decay, ema_out=ref_ema,
                                 norms_out=ref_norms)
    init = {n: q.detach().clone() for n, q in gen.named_parameters()}
    graphs_before = _dynamo_graphs()
    with _compile_enabled(compile_backend is not None):
        rt, losses = run_layout(gen, make, pcfg, micro, clip=clip, ema_decay=ema_decay,
                                compile_backend=compile_backend)
        out = compare(rt, losses, ref_losses, hist[-1], init)
    out["grad_norms"], out["ref_grad_norms"] = rt.test_grad_norms, ref_norms
    out["compiled_blocks"] = rt.info.get("compiled_blocks", 0)
    out["dynamo_graphs"] = _dynamo_graphs() - graphs_before  # this scenario's
    out["compile_notes"] = rt.info.get("compile_notes", [])
    if ema_decay:
        out.update(compare_ema(rt, ref_ema[-1], init, hist[-1]))
        out["ema_bytes"] = ema_bytes(rt)
    out["checkpointing"] = rt.info.get("checkpointing")
    out["tp_partial_grad"] = len(rt.info.get("tp_partial_grad", []))
    out["offload"] = [bool(rt.engine.zero_offload_optimizer()), bool(rt.engine.zero_offload_param())]
    teardown(rt)
    return out


def poison_first_linear(model, when) -> str:
    """A forward hook making the output of this rank's first linear layer NaN while `when()`
    holds (a real NaN through the real backward, optimizer and collectives); returns its name."""
    gen = getattr(model, "generator", model)
    name, layer = next((n, m) for n, m in gen.named_modules()
                       if isinstance(m, torch.nn.Linear) or type(m).__name__.endswith("ParallelLinear"))

    def hook(module, args, output):
        if not when():
            return None
        if isinstance(output, tuple):  # megatron's parallel linears return (output, bias)
            return (output[0] * float("nan"),) + tuple(output[1:])
        return output * float("nan")

    layer.register_forward_hook(hook)
    return name


def poison_loss(rt, when) -> str:
    """Adds NaN to this rank's micro-batch losses while `when()` holds: a constant, so the loss is
    NaN while its gradients stay finite (a term without gradient gone bad); returns where."""
    nan = lambda: float("nan") if when() else 0.0  # noqa: E731
    if rt.pipeline is not None:
        loss_fn = rt.pipeline.loss_fn
        rt.pipeline.loss_fn = lambda pred, target: loss_fn(pred, target) + nan()
        return "pipeline loss"
    loss_fn = rt.module._loss_fn
    object.__setattr__(rt.module, "_loss_fn", lambda model, batch: loss_fn(model, batch) + nan())
    return "loss"


def scenario_nonfinite(name: str, nan_step: int = 1, steps: int = 4, loss_only: bool = False, **p) -> dict:
    """A NaN in one rank's forward at step `nan_step` (on the last DP replica, in the first pipeline
    stage): every rank skips that step's update (train/nonfinite.py: DeepSpeed's overflow check at
    ZeRO 1-3, our optimizer-step guard at ZeRO-0) and the later steps apply as usual, so the final
    weights equal the single-process run that skipped that step (and its losses the reference's).
    Without the skip the weights would be NaN. `loss_only`: instead a NaN added to the loss of the
    last DP replica's last stage, gradients finite (poison_loss): skipped alike."""
    dp, m, micro = _layout(p)
    clip = p.pop("clip", CLIP)
    pcfg = ParallelConfig(**p)
    gen = build_generator()
    make = lambda model, step: generator_batch(gen, step, dp * m * micro)  # noqa: E731
    ref_losses, hist = reference(gen, make, dp, m, steps, clip=clip, skip_steps=(nan_step,))
    init = {n: q.detach().clone() for n, q in gen.named_parameters()}
    poisoned = []

    def poison(rt):
        if loss_only and rt.layout.dp_rank == rt.layout.dp - 1 and rt.layout.pp_rank == rt.layout.pp - 1:
            poisoned.append(poison_loss(rt, lambda: rt.step == nan_step))
        elif not loss_only and rt.layout.dp_rank == rt.layout.dp - 1 and rt.layout.pp_rank == 0:
            poisoned.append(poison_first_linear(rt.model, lambda: rt.step == nan_step))

    rt, losses = run_layout(gen, make, pcfg, micro, steps=steps, clip=clip, after_build=poison)
    kept = [i for i in range(steps) if i != nan_step]
    out = compare(rt, [losses[i] for i in kept], [ref_losses[i] for i in kept], hist[-1], init)
    out["applied"] = rt.test_applied
    out["skipped_loss"], out["skipped_grad_norm"] = losses[nan_step], rt.test_grad_norms[nan_step]
    n = torch.tensor([len(poisoned)])
    dist.all_reduce(n)
    out["poisoned_ranks"] = int(n[0])
    out["full_state_aliases"] = full_state_aliases(rt)
    teardown(rt)
    return out


def full_state_aliases(rt) -> list[str]:
    """Which of reshard.full_state's tensors change when the live weights and moments do (at
    ZeRO-0 on CPU .float() / .cpu() return the live tensors themselves): should be none."""
    from iomm_scale.parallel.reshard import _inner_optimizer, full_state

    full = full_state(rt)
    before = {(k, n): t.clone() for k in ("params", "exp_avg") for n, t in full[k].items()}
    live = [t for p in rt.module.parameters() if p.requires_grad
            for t in (p.data, _inner_optimizer(rt.engine).state.get(p, {}).get("exp_avg"))]
    with torch.no_grad():
        for t in live:
            if t is not None:
                t.add_(1.0)
    changed = sorted(f"{k}:{n}" for (k, n), t in before.items() if not torch.equal(full[k][n], t))
    with torch.no_grad():
        for t in live:
            if t is not None:
                t.sub_(1.0)
    return changed


def scenario_nonfinite_bf16(name: str, zero_stage: int, nan_step: int = 1, steps: int = 4) -> dict:
    """DeepSpeed's bf16 mode (`train.precision: bf16` with AdamW under the launchers, with
    `precision_extra`'s check_grad_overflow): a NaN on DP rank 1 at step `nan_step` leaves the
    fp32 master weights (gathered by `full_state`) bit for bit as the step before left them, and
    the later steps move them again. Per ZeRO stage DeepSpeed uses another wrapper (ZeRO-0
    FP16_UnfusedOptimizer, ZeRO-1 BF16_Optimizer, ZeRO-2 / 3 the ZeRO optimizers)."""
    from iomm_scale.parallel.dist_trainer import precision_extra
    from iomm_scale.parallel.reshard import full_state

    gen = build_generator()
    make = lambda model, step: {k: v.bfloat16() if v.is_floating_point() else v  # noqa: E731
                                for k, v in generator_batch(gen, step, 4).items()}
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(precision="bf16"), optim=types.SimpleNamespace(name="adamw"))
    extra = precision_extra(cfg, None)
    pcfg = ParallelConfig(zero_stage=zero_stage)
    lay = init_parallel_state(pcfg)
    rt = ParallelRuntime.build(copy.deepcopy(gen), pcfg, optimizer_fn, micro_batch=2, grad_clip=CLIP, ds_extra=extra)
    poison_first_linear(rt.model, lambda: rt.step == nan_step and lay.dp_rank == 1)
    states, applied, losses = [], [], []
    for step in range(steps):
        out = rt.train_step(dp_slice(make(gen, step), lay.dp, lay.dp_rank))
        applied.append(out["applied"])
        losses.append(out["loss"])
        # cloned: at ZeRO-0 on CPU full_state hands out the fp32 masters themselves
        states.append({n: v.clone() for n, v in full_state(rt, with_moments=False)["params"].items()})
    before, skipped, last = states[nan_step - 1], states[nan_step], states[-1]
    res = {"wrapper": type(rt.engine.optimizer).__name__, "applied": applied, "losses": losses,
           "skipped_step_unchanged": all(torch.equal(skipped[n], before[n]) for n in before),
           "moved_after": max(absmax(last[n] - skipped[n]) for n in before),
           "finite": all(bool(torch.isfinite(v).all()) for v in last.values())}
    teardown(rt)
    return res


def _dist_trainer(run_dir: str, *overrides):
    """launchers/pretrain.py's DistributedTrainer on configs/tiny.yaml, built inside this process
    group (what the launcher does after its argument parsing)."""
    from iomm_scale.parallel.dist_trainer import DistributedTrainer, split_parallel_args

    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml")
    cfg, pcfg = split_parallel_args(config, ["train.log_every=1", "data.batch_size=2", "data.resolution=16",
                                             "data.builtin.crops_per_photo=1", "train.num_samples=0",
                                             "train.progress_bar=false", *overrides])
    return DistributedTrainer(cfg, pcfg, run_dir=run_dir)


def _raised(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test reads its type and message
        return f"{type(e).__name__}: {e}"
    return ""


def scenario_nonfinite_checkpoints(name: str) -> dict:
    """DistributedTrainer never writes non-finite weights and refuses to resume from them.
    ZeRO-3: a weight of rank 1's partition overflowed to inf after step 2 (written there: what an
    applied update with an lr far too high does), so the periodic save at step 2 is refused on every
    rank, naming the newest good checkpoint (step 1), which stays. ZeRO-0: a DeepSpeed checkpoint
    holding NaN (written by the runtime's own save, past the trainer's check) is refused on resume."""
    run_dir = _shared_tmpdir()
    out = {}
    trainer = _dist_trainer(run_dir, "parallel.zero_stage=3", "train.steps=1")
    trainer.fit()
    teardown(trainer.rt)
    trainer = _dist_trainer(run_dir, "parallel.zero_stage=3", "train.steps=3", "train.ckpt_every=2")
    step = trainer.rt.train_step

    def overflowing(batch):
        res = step(batch)
        if res["step"] == 2 and dist.get_rank() == 1:
            p = next(q for q in trainer.rt.module.parameters() if q.requires_grad and q.ds_tensor.numel())
            p.ds_tensor.data[0] = float("inf")
        return res

    trainer.rt.train_step = overflowing
    out["save_error"] = _raised(trainer.fit)
    out["checkpoints"] = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    out["newest"] = os.path.join(run_dir, "checkpoints", "step_00000001")
    teardown(trainer.rt)

    run_dir = _shared_tmpdir()
    trainer = _dist_trainer(run_dir, "parallel.zero_stage=0", "train.steps=1")
    trainer.fit()
    with torch.no_grad():
        next(q for q in trainer.rt.module.parameters() if q.requires_grad)[0].fill_(float("nan"))
    trainer.rt.step = 2
    trainer.rt.save(str(trainer.ckpt_root), tag="step_00000002")  # the engine's save: no check
    teardown(trainer.rt)
    out["resume_error"] = _raised(lambda: _dist_trainer(run_dir, "parallel.zero_stage=0", "train.steps=3"))
    out["corrupt"] = os.path.join(run_dir, "checkpoints", "step_00000002")
    from iomm_scale.parallel.groups import destroy_parallel_state

    destroy_parallel_state()  # the refused trainer's layout
    return out


def scenario_iomm(name: str, **p) -> dict:
    dp, m, micro = _layout(p)
    config, resolution = p.pop("config", "tiny.yaml"), p.pop("resolution", 16)
    ema_decay = p.pop("ema_decay", None)
    compile_backend, compile_mllm = p.pop("compile_backend", None), p.pop("compile_mllm", False)
    eval_samples = p.pop("eval_samples", 0)
    samples = p.pop("samples", False)  # mid-run sample grids through the runtime
    captions = p.pop("captions", False)
    persistence = p.pop("persistence_threshold", 0)
    pcfg = ParallelConfig(**p)
    model = build_iomm_model(config, resolution)
    make = lambda mdl, step: iomm_batch(model, step, dp * m * micro, captions)  # noqa: E731
    ref_ema: list = []
    ref_losses, hist = reference(model, make, dp, m, STEPS, ema_decay=ema_decay, ema_out=ref_ema)
    frozen_before = {n: t.clone() for n, t in model.conditioner.mllm.state_dict().items()}
    base_before = {n: q.detach().clone() for n, q in model.generator.named_parameters() if not q.requires_grad}
    init = {n: q.detach().clone() for n, q in model.named_parameters()}
    with _compile_enabled(compile_backend is not None):
        rt, losses = run_layout(model, make, pcfg, micro, ema_decay=ema_decay,
                                compile_backend=compile_backend, compile_mllm=compile_mllm,
                                persistence_threshold=persistence)
        out = compare(rt, losses, ref_losses, hist[-1], init)
    out["compiled_blocks"] = rt.info.get("compiled_blocks", 0)
    out["compiled_mllm_layers"] = rt.info.get("compiled_mllm_layers", 0)
    out["dynamo_graphs"] = _dynamo_graphs()
    if ema_decay:  # EMA parity, and what it holds per rank (the planner's `ema` term is checked in pytest)
        out.update(compare_ema(rt, ref_ema[-1], init, hist[-1]))
        out["ema_bytes"] = ema_bytes(rt)
    if eval_samples:
        out.update(compare_eval(rt, model, hist[-1], micro, eval_samples, ref_ema[-1] if ema_decay else None))
    if samples:
        out.update(compare_samples(rt, model, hist[-1], ref_ema[-1] if ema_decay else None))
    # frozen parts: no optimizer state, not trained
    from iomm_scale.parallel.reshard import _inner_optimizer

    inner = _inner_optimizer(rt.engine)
    out["optimizer_numel_local"] = sum(p.numel() for g in inner.param_groups for p in g["params"])
    out["optimizer_state_numel_local"] = sum(v.numel() for st in inner.state.values() for v in st.values()
                                             if isinstance(v, torch.Tensor) and v.dim() > 0)
    out["frozen_numel"] = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    from iomm_scale.parallel.deepspeed_engine import optimized_parameters

    managed = {id(q) for q in optimized_parameters(rt.engine)}
    local_trainable = [q for q in rt.module.parameters() if q.requires_grad]
    local_frozen = [q for q in rt.module.parameters() if not q.requires_grad]
    flags = torch.tensor([int(all(id(q) in managed for q in local_trainable)),
                          int(not any(id(q) in managed for q in local_frozen)), len(local_frozen)])
    dist.all_reduce(flags[:2], op=dist.ReduceOp.MIN)
    out["all_trainable_optimized"], out["no_frozen_optimized"] = bool(flags[0]), bool(flags[1])
    out["frozen_params_on_rank0"] = int(flags[2])
    out["dp"] = dp
    out["tp"] = pcfg.tp
    out["trainable_numel"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rt.layout.is_first_stage and rt.layout.rank == 0 and pcfg.zero_stage < 3:
        after = rt.model.conditioner.mllm.state_dict()
        out["frozen_unchanged"] = all(torch.equal(after[k], v) for k, v in frozen_before.items())
        base_after = dict(rt.model.generator.named_parameters())  # a LoRA base: frozen too
        out["generator_base_frozen"] = len(base_before)
        out["generator_base_unchanged"] = all(torch.equal(base_after[k], v) for k, v in base_before.items())
    teardown(rt)
    return out


def scenario_reshard(name: str, save: dict, load: dict, native: dict | None = None, ema_decay=None,
                     muon: bool = False) -> dict:
    """Train 2 steps under `save`, write a layout-free checkpoint, resume under `load`
    for 2 more steps; compare with 4 uninterrupted single-process steps (and, with
    `ema_decay`, the EMA carried through the checkpoint with the single-process EMA).
    `muon`: our Muon (DistributedMuon, ZeRO-0) instead of AdamW, against the single-process
    MuonWithAdamW: the momenta go through the file from their owners under `save` to their
    owners under `load` (reported: how many matrices each rank owns and keeps momenta for)."""
    world = dist.get_world_size()
    gen = build_generator()
    opt_kw, ref_kw = {}, {}
    if muon:
        from iomm_scale.optim.muon import build_muon_optimizer
        from iomm_scale.parallel.dist_trainer import optimizer_factory

        cfg = muon_cfg()
        opt_kw = {"opt_fn": optimizer_factory(cfg)}
        ref_kw = {"make_opt": lambda mdl: build_muon_optimizer(mdl, cfg)}

    def layout_dp(p):
        return world // (p.get("tp", 1) * p.get("pp", 1))

    micro = 2
    dp_a, m_a = layout_dp(save), save.get("num_microbatches", 1)
    dp_b, m_b = layout_dp(load), load.get("num_microbatches", 1)
    if dp_a * m_a != dp_b * m_b:
        raise ValueError("the two layouts must see the same global batch")
    # The reference walks the slices of the *first* layout for steps 0-1 and of the second
    # for steps 2-3 (per-slice seeds only matter for in-model randomness; none here).
    make = lambda model, step: generator_batch(gen, step, dp_a * m_a * micro)  # noqa: E731
    ref_ema: list = []
    ref_losses, hist = reference(gen, make, dp_a, m_a, 4, ema_decay=ema_decay, ema_out=ref_ema, **ref_kw)
    init = {n: q.detach().clone() for n, q in gen.named_parameters()}
    rt, losses_a = run_layout(gen, make, ParallelConfig(**save), micro, steps=2, ema_decay=ema_decay, **opt_kw)
    ckpt_dir = _shared_tmpdir()
    rt.save_full(ckpt_dir)
    teardown(rt)
    rt, losses_b = run_layout(gen, make, ParallelConfig(**load), micro, steps=2, resume_full=ckpt_dir, ema_decay=ema_decay, **opt_kw)
    out = compare(rt, losses_a + losses_b, ref_losses, hist[-1], init)
    out["resumed_step"] = rt.step
    if muon:
        from iomm_scale.parallel.runtime import our_muon

        opt = our_muon(rt.engine)
        group = next(g for g in opt.param_groups if g["use_muon"])
        owned = [r == rt.layout.dp_rank for r in opt.owners(group)]
        kept = ["momentum_buffer" in opt.state[q] for q in group["params"]]
        # per rank: [matrices owned, momenta kept, momenta kept for matrices it does not own]
        out["muon_ownership"] = _gather_ints([sum(owned), sum(kept), sum(k and not o for k, o in zip(kept, owned))])
        out["muon_matrices"] = len(group["params"])
        if dist.get_rank() == 0:
            saved = torch.load(os.path.join(ckpt_dir, "full_pp0.pt"), map_location="cpu", weights_only=True)
            out["saved_optimizer"] = saved["optimizer"]
            out["saved_momenta"] = len(saved["momentum_buffer"])
            out["saved_nonzero_momenta"] = sum(int(v.abs().max() > 0) for v in saved["momentum_buffer"].values())
        teardown(rt)
        # the same checkpoint into an AdamW run: refused (Muon momenta are no Adam moments)
        try:
            run_layout(gen, make, ParallelConfig(**load), micro, steps=0, resume_full=ckpt_dir)
            out["adamw_resume_error"] = None
        except Exception as e:  # noqa: BLE001 - the message is the result
            out["adamw_resume_error"] = f"{type(e).__name__}: {e}"
        from iomm_scale.parallel.groups import destroy_parallel_state

        destroy_parallel_state()
        return out
    if ema_decay:
        out.update(compare_ema(rt, ref_ema[-1], init, hist[-1]))
        out["ema_restored"] = rt.info.get("ema_restored")
        out["ema_zero_stage"] = rt.ema.zero_stage
    teardown(rt)
    return out


def scenario_ema(name: str, export=False, flux_kw=None, **p) -> dict:
    """EMA (parallel/ema.py) under a layout, on the tiny FLUX generator, decay EMA_DECAY:
    3 steps, EMA (and params) against the single-process EMA (optim/builder.EMA) of the same
    run; DeepSpeed checkpoint + per-rank EMA files, rebuilt from zeroed weights, loaded: every
    rank's EMA tensors bit-identical to the saved ones; 1 more step, against the reference's
    4th. `export`: export_ema after that, rank 0 reads ema.safetensors / state.pt back."""
    dp, m, micro = _layout(p)
    pcfg = ParallelConfig(**p)
    gen = build_generator(**(flux_kw or {}))
    make = lambda model, step: generator_batch(gen, step, dp * m * micro)  # noqa: E731
    ref_ema: list = []
    ref_losses, hist = reference(gen, make, dp, m, STEPS + 1, ema_decay=EMA_DECAY, ema_out=ref_ema)
    init = {n: q.detach().clone() for n, q in gen.named_parameters()}
    rt, losses = run_layout(gen, make, pcfg, micro, ema_decay=EMA_DECAY)
    out = compare(rt, losses, ref_losses[:STEPS], hist[STEPS - 1], init)
    out.update(compare_ema(rt, ref_ema[STEPS - 1], init, hist[STEPS - 1]))
    out["ema_bytes"] = ema_bytes(rt)
    out["n_uneven"] = sum(1 for q in gen.parameters() if q.requires_grad and q.numel() % dp)
    out["ema_zero_stage"] = rt.ema.zero_stage
    saved = {n: t.detach().cpu().clone() for n, t in rt.ema.shadow.items()}
    ckpt_dir = _shared_tmpdir()
    rt.save(ckpt_dir, tag="s")
    files = sorted(f for f in os.listdir(os.path.join(ckpt_dir, "s")) if f.startswith("ema_"))
    teardown(rt)
    gen2 = copy.deepcopy(gen)
    with torch.no_grad():
        for prm in gen2.parameters():
            prm.zero_()
    lay = init_parallel_state(pcfg)
    rt = ParallelRuntime.build(gen2, pcfg, optimizer_fn, micro_batch=micro, grad_clip=CLIP, persistence_threshold=0,
                               ema_decay=EMA_DECAY)
    zeroed = all(absmax(t) == 0 for t in rt.ema.shadow.values() if t.numel())
    rt.load(ckpt_dir, tag="s")
    same = zeroed and rt.info.get("ema_restored") is True and set(saved) == set(rt.ema.shadow) and all(
        torch.equal(saved[n], t.cpu()) for n, t in rt.ema.shadow.items())
    flag = torch.tensor([int(same)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    out["ema_resume_bitwise"] = bool(flag[0])
    out["ema_files"] = files
    losses = losses + [rt.train_step(dp_slice(make(gen, STEPS), lay.dp, lay.dp_rank))["loss"]]
    after = compare(rt, losses, ref_losses, hist[STEPS], init)
    after.update(compare_ema(rt, ref_ema[STEPS], init, hist[STEPS]))
    out["after_resume"] = {k: after[k] for k in ("loss_rel", "param_rel", "update_rel", "ema_rel", "ema_update_rel",
                                                 "ema_tensors_checked")}
    if export:
        from iomm_scale.parallel.ema import export_ema

        out_dir = os.path.join(_shared_tmpdir(), "ema")
        wrote = export_ema(rt, out_dir, config={"scenario": name})
        if dist.get_rank() == 0:
            from safetensors.torch import load_file

            tensors = load_file(os.path.join(out_dir, "ema.safetensors"))
            state = torch.load(os.path.join(out_dir, "state.pt"), map_location="cpu", weights_only=False)
            ref, live = ref_ema[STEPS], hist[STEPS]
            scale = max(absmax(v) for v in ref.values())
            out["export"] = {
                "dir_returned": wrote == out_dir,
                "names_equal": set(tensors) == set(ref) and set(state["ema"]["shadow"]) == set(ref)
                and set(state["model"]) == set(live),
                "shapes_equal": all(tensors[n].shape == ref[n].shape for n in ref),
                "ema_rel": max(absmax(tensors[n] - ref[n]) for n in ref) / scale,
                "state_matches_file": all(torch.equal(state["ema"]["shadow"][n], tensors[n]) for n in ref),
                "model_rel": max(absmax(state["model"][n] - live[n]) for n in live) /
                max(absmax(v) for v in live.values()),
                "step": state["step"], "decay": state["ema"]["decay"],
                "leftover": sorted(f for f in os.listdir(out_dir) if f not in ("ema.safetensors", "state.pt")),
            }
    teardown(rt)
    return out


def scenario_native_ckpt(name: str, **p) -> dict:
    """DeepSpeed engine save/load under one layout (ZeRO-3 with a frozen MLLM: #3090)."""
    world = dist.get_world_size()
    tp, pp = p.get("tp", 1), p.get("pp", 1)
    dp = world // (tp * pp)
    micro = 2
    pcfg = ParallelConfig(**p)
    model = build_iomm_model()
    make = lambda mdl, step: iomm_batch(model, step, dp * micro)  # noqa: E731
    ref_losses, hist = reference(model, make, dp, 1, 4)
    rt, losses_a = run_layout(model, make, pcfg, micro, steps=2)
    ckpt_dir = _shared_tmpdir()
    rt.save(ckpt_dir, tag="s2")
    teardown(rt)
    # Fresh model with DIFFERENT frozen weights: the load must restore them.
    model2 = copy.deepcopy(model)
    with torch.no_grad():
        for prm in model2.conditioner.mllm.parameters():
            prm.add_(1.0)
        for prm in model2.parameters():
            if prm.requires_grad:
                prm.zero_()
    lay = init_parallel_state(pcfg)
    from iomm_scale.parallel.runtime import ParallelRuntime as PR

    rt = PR.build(model2, pcfg, optimizer_fn, micro_batch=micro, grad_clip=CLIP, persistence_threshold=0)
    rt.load(ckpt_dir, tag="s2")
    losses_b = [rt.train_step(dp_slice(make(model, s), lay.dp, lay.dp_rank))["loss"] for s in (2, 3)]
    out = compare(rt, losses_a + losses_b, ref_losses, hist[-1])
    # frozen weights equal to the original (gathered under ZeRO-3)
    from iomm_scale.parallel.deepspeed_engine import zero3_gathered

    mllm = rt.model.conditioner.mllm
    ok = True
    with zero3_gathered(list(mllm.parameters())):
        orig = dict(model.conditioner.mllm.named_parameters())
        for n_, prm in mllm.named_parameters():
            ok &= torch.equal(prm.detach(), orig[n_].detach())
    t = torch.tensor([1 if ok else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    out["frozen_restored"] = bool(t[0])
    out["step"] = rt.step
    teardown(rt)
    return out


def scenario_managed_refused(name: str) -> dict:
    """Our runtime refuses an engine with managed gradient accumulation re-enabled."""
    pcfg = ParallelConfig()
    init_parallel_state(pcfg)
    gen = build_generator()
    try:
        ParallelRuntime.build(gen, pcfg, optimizer_fn, micro_batch=2, ds_extra={"managed_gradient_accumulation": True})
        return {"refused": False}
    except RuntimeError as e:
        return {"refused": "managed_gradient_accumulation" in str(e)}
    finally:
        from iomm_scale.parallel.groups import destroy_parallel_state

        destroy_parallel_state()




# --------------------------------------------------------------------------- Muon
# The launchers' own wiring (dist_trainer.optimizer_factory / deepspeed_muon_extra /
# precision_extra) on the tiny IOMM model (frozen MLLM + RQA + FLUX generator), against the
# single-process MuonWithAdamW (build_muon_optimizer) on the same global batch with the same
# gradient clipping. Settings exercise every layout path: per-head q|k|v blocks, AdaLN chunks
# to Muon, weight decay; Newton-Schulz in fp32 (CPU "auto").
MUON_OVERRIDES = ["optim.name=muon", "optim.lr=1e-3", "optim.weight_decay=0.1", "optim.eps=1e-6",
                  "optim.muon.per_head=true", "optim.muon.ns_dtype=float32"]


def muon_cfg(extra=()):
    from iomm_scale.config import load_config

    return load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml"),
                       ["data.resolution=16", "flow.cond_dropout=0.25", *MUON_OVERRIDES, *extra])


def per_shard(factory):
    """The DeepSpeed #7807 pattern, for the check that must fail: Newton-Schulz on each TP rank's
    local shard as if it were the whole matrix (no TP gather; fused segments scaled to the shard)."""

    def make(module):
        opt = factory(module)
        for g in opt.param_groups:
            if not g["use_muon"]:
                continue
            for i, lay in enumerate(g["layouts"]):
                if lay and lay.get("tp_dim") is not None:
                    lay = dict(lay, tp_dim=None, blocks=None)
                    if lay.get("segments"):
                        lay["segments"] = [x // opt.tp_world for x in lay["segments"]]
                    g["layouts"][i] = lay
        opt.tp_group, opt.tp_world, opt.tp_rank = None, 1, 0
        return opt

    make.wants_module = True
    return make


_MUON_CACHE: dict = {}


def _cached(key, build):
    """The Muon scenarios share the tiny IOMM model and, where layouts see the same global batch
    and settings, their single-process references (copies handed out; start-up is the budget)."""
    if key not in _MUON_CACHE:
        _MUON_CACHE[key] = build()
    return copy.deepcopy(_MUON_CACHE[key])


def _gather_ints(values: list[int]) -> list[list[int]]:
    t = torch.tensor(values)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def scenario_muon(name: str, shard_check=False, resume_after=None, bf16=False, clip=CLIP, nan_step=None,
                  **p) -> dict:
    """Our Muon (DistributedMuon) as DeepSpeed's client optimizer at ZeRO-0. resume_after=k: save
    a DeepSpeed checkpoint after k steps, rebuild from a corrupted model, load, finish. bf16: the
    run config's train.precision bf16 (fp32 weights + bf16 torch autocast, `precision_extra`).
    nan_step=k: a NaN in the last DP replica's forward at step k: every rank skips that update
    (momenta untouched too), the reference skips it as well."""
    from iomm_scale.optim.muon import build_muon_optimizer
    from iomm_scale.parallel.dist_trainer import optimizer_factory, precision_extra
    from iomm_scale.parallel.runtime import our_muon

    world = dist.get_world_size()
    tp = p.get("tp", 1)
    dp = world // tp
    micro = 2
    pcfg = ParallelConfig(**p)
    cfg = muon_cfg(["train.precision=bf16"] if bf16 else [])
    model = _cached("model", build_iomm_model)
    make = lambda mdl, step: iomm_batch(model, step, dp * micro)  # noqa: E731
    def autocast_loss_fn(mdl, mb):  # the reference runs the single-process trainer's way: fp32 weights, bf16 autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return default_loss_fn(mdl, mb)

    loss_fn = autocast_loss_fn if bf16 else default_loss_fn
    skip = () if nan_step is None else (nan_step,)
    ref_losses, hist = _cached(("ours", dp, bf16, clip, skip), lambda: reference(
        model, make, dp, 1, STEPS, loss_fn=loss_fn, clip=clip, make_opt=lambda mdl: build_muon_optimizer(mdl, cfg),
        skip_steps=skip))
    init = {n: q.detach().clone() for n, q in model.named_parameters()}
    factory = per_shard(optimizer_factory(cfg)) if shard_check else optimizer_factory(cfg)
    extra = precision_extra(cfg, pcfg)
    def poison(rt):
        if nan_step is not None and rt.layout.dp_rank == rt.layout.dp - 1:
            poison_first_linear(rt.model, lambda: rt.step == nan_step)

    if resume_after is None:
        rt, losses = run_layout(model, make, pcfg, micro, opt_fn=factory, clip=clip,
                                ds_extra=extra, after_build=poison)
    else:
        rt, losses = run_layout(model, make, pcfg, micro, steps=resume_after, opt_fn=factory, clip=clip, ds_extra=extra)
        ckpt_dir = _shared_tmpdir()
        rt.save(ckpt_dir, tag="s")
        teardown(rt)
        model2 = copy.deepcopy(model)
        with torch.no_grad():
            for prm in model2.parameters():
                if prm.requires_grad:
                    prm.zero_()
        lay = init_parallel_state(pcfg)
        rt = ParallelRuntime.build(model2, pcfg, factory, micro_batch=micro, grad_clip=clip, ds_extra=extra)
        rt.load(ckpt_dir, tag="s")
        losses += [rt.train_step(dp_slice(make(model, s_), lay.dp, lay.dp_rank))["loss"]
                   for s_ in range(resume_after, STEPS)]
    if nan_step is not None:  # the skipped step's loss is NaN here, finite in the reference
        losses, ref_losses = losses[:nan_step] + losses[nan_step + 1:], ref_losses[:nan_step] + ref_losses[nan_step + 1:]
    out = compare(rt, losses, ref_losses, hist[-1], init)
    if nan_step is not None:
        out["applied"] = rt.test_applied
    opt = our_muon(rt.engine)
    out["optimizer"] = type(opt).__name__
    out["engine_optimizer"] = type(rt.engine.optimizer).__name__
    out["zero_stage"] = rt.engine.zero_optimization_stage()
    out["autocast"] = bool(rt.engine.torch_autocast_enabled())
    out["param_dtypes"] = sorted({str(q.dtype) for q in rt.module.parameters() if q.requires_grad})
    muon = next(g for g in opt.param_groups if g["use_muon"])
    owners = opt.owners(muon)
    dp_rank = rt.layout.dp_rank
    owned = sum(r == dp_rank for r in owners)
    buffers = sum("momentum_buffer" in opt.state[q] for q in muon["params"])
    # per global rank: [dp rank, matrices owned, momentum buffers kept, Muon matrices]
    out["ownership"] = _gather_ints([dp_rank, owned, buffers, len(muon["params"])])
    out["tp_group"] = opt.tp_world
    teardown(rt)
    return out


def _ds_rule(name, prm):  # deepspeed.set_optimizer_flags
    return prm.ndim >= 2 and not any(k in name.lower() for k in ("embed", "lm_head"))


def scenario_ds_muon(name: str, **p) -> dict:
    """DeepSpeed's built-in Muon through the launchers' wiring (optim.muon.implementation:
    deepspeed, grad_clip 0, scaling original) under ZeRO-p, against DeepSpeed's own Muon on one
    process (MuonWithAuxAdam over whole matrices, torch AdamW), and against ours."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    from iomm_scale.optim.muon import build_muon_optimizer
    from iomm_scale.parallel.dist_trainer import deepspeed_muon_extra, muon_launch_errors, optimizer_factory

    world = dist.get_world_size()
    dp, micro = world, 2
    pcfg = ParallelConfig(**p)
    cfg = muon_cfg(["optim.muon.implementation=deepspeed", "optim.grad_clip=0", "optim.muon.scaling=original",
                    "optim.muon.per_head=false"])
    assert not muon_launch_errors(cfg, pcfg), muon_launch_errors(cfg, pcfg)
    o = cfg.optim
    model = _cached("model", build_iomm_model)
    make = lambda mdl, step: iomm_batch(model, step, dp * micro)  # noqa: E731

    def ds_single(mdl):
        named = [(n, q) for n, q in mdl.named_parameters() if q.requires_grad]
        return MuonWithAuxAdam([
            dict(params=[q for n, q in named if _ds_rule(n, q)], use_muon=True, lr=o.lr, momentum=o.muon.momentum,
                 weight_decay=o.weight_decay, ns_method="gram"),
            dict(params=[q for n, q in named if not _ds_rule(n, q)], use_muon=False, lr=o.lr, betas=tuple(o.betas),
                 eps=o.eps, weight_decay=o.weight_decay)], adam_optimizer=torch.optim.AdamW)

    ref_losses, hist = _cached(("ds", dp), lambda: reference(model, make, dp, 1, STEPS, make_opt=ds_single, clip=0.0))
    _, ours = _cached(("ours_ds_settings", dp), lambda: reference(
        model, make, dp, 1, STEPS, make_opt=lambda mdl: build_muon_optimizer(mdl, cfg), clip=0.0))
    init = {n: q.detach().clone() for n, q in model.named_parameters()}
    rt, losses = run_layout(model, make, pcfg, micro, opt_fn=optimizer_factory(cfg), clip=0.0,
                            ds_extra=deepspeed_muon_extra(cfg))
    out = compare(rt, losses, ref_losses, hist[-1], init)
    vs = compare(rt, losses, ref_losses, ours[-1], init)
    out["vs_ours_param_rel"], out["vs_ours_update_rel"] = vs["param_rel"], vs["update_rel"]
    inner = getattr(rt.engine.optimizer, "optimizer", rt.engine.optimizer)
    out["zero_stage"] = rt.engine.zero_optimization_stage()
    out["inner"] = type(inner).__name__
    out["aux"] = type(getattr(inner, "aux_optimizer", None)).__name__
    out["muon_tensors"] = sum(len(g["params"]) for g in inner.param_groups if g["use_muon"]) if out["zero_stage"] == 0 \
        else sum(bool(getattr(q, "use_muon", False)) for q in rt.module.parameters() if q.requires_grad)
    teardown(rt)
    return out


def scenario_bf16_full(name: str) -> dict:
    """bf16 parameters (DeepSpeed's bf16 mode, `train.precision: bf16` under the launchers) through
    a layout-free checkpoint. At ZeRO-0 DeepSpeed's wrapper keeps fp32 masters and the Adam
    moments are keyed by them: `full_state` must save those masters and moments (it saved the
    bf16-rounded parameters and zero moments), and a resume must put the saved fp32 values back
    into the masters at ZeRO-0 and ZeRO-1 (they were rebuilt from the rounded parameters). The
    save goes into a directory holding a stale `full_pp1.pt` of an earlier pp=2 save, which the
    save must replace."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from iomm_scale.parallel.reshard import OPT_KEYS, _inner_optimizer, _stage0_masters, full_state

    gen = build_generator()
    make = lambda model, step: {k: v.bfloat16() if v.is_floating_point() else v  # noqa: E731
                                for k, v in generator_batch(gen, step, 4).items()}
    bf16 = {"bf16": {"enabled": True}}
    rt, _ = run_layout(gen, make, ParallelConfig(zero_stage=0), 2, steps=2, ds_extra=bf16)
    masters, inner = _stage0_masters(rt.engine), _inner_optimizer(rt.engine)
    saved = full_state(rt)
    out = {"wrapper": type(rt.engine.optimizer).__name__, "masters": len(masters), "save_vs_master": 0.0,
           "save_vs_state": 0.0, "moment_max": 0.0, "beyond_bf16": 0}
    for n, p in rt.module.named_parameters():
        m = masters[id(p)]
        out["save_vs_master"] = max(out["save_vs_master"], absmax(saved["params"][n] - m))
        out["beyond_bf16"] += int(not torch.equal(m, m.bfloat16().float()))
        for k in OPT_KEYS:
            out["save_vs_state"] = max(out["save_vs_state"], absmax(saved[k][n] - inner.state[m][k]))
            out["moment_max"] = max(out["moment_max"], absmax(saved[k][n]))
    ckpt_dir = _shared_tmpdir()
    if dist.get_rank() == 0:  # an earlier pp=2 save's second stage, left in the directory
        torch.save({"params": {}, "iomm_step": 99, "layout": {"pp": 2}}, os.path.join(ckpt_dir, "full_pp1.pt"))
    dist.barrier()
    rt.save_full(ckpt_dir)
    out["files_after_save"] = sorted(os.listdir(ckpt_dir))
    teardown(rt)
    for stage in (1, 0):  # resume under another ZeRO stage, then the saving one
        rt, _ = run_layout(gen, make, ParallelConfig(zero_stage=stage), 2, steps=0, resume_full=ckpt_dir, ds_extra=bf16)
        masters, inner = _stage0_masters(rt.engine), _inner_optimizer(rt.engine)
        worst = 0.0
        for n, p in rt.module.named_parameters():
            if stage == 0:
                value, moments = masters[id(p)], {k: inner.state[masters[id(p)]][k] for k in OPT_KEYS}
            else:
                value, moments = safe_get_full_fp32_param(p), {k: safe_get_full_optimizer_state(p, k) for k in OPT_KEYS}
            worst = max(worst, absmax(value.float() - saved["params"][n]),
                        *(absmax(moments[k].float() - saved[k][n]) for k in OPT_KEYS))
        out[f"resumed_zero{stage}_max_diff"] = worst
        out[f"resumed_zero{stage}_step"] = rt.step
        teardown(rt)
    return out


_TMPDIRS: list[str] = []  # removed at the end of the launch


def _shared_tmpdir() -> str:
    obj = [tempfile.mkdtemp(prefix="iomm_ckpt_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(obj, src=0)
    _TMPDIRS.append(obj[0])
    return obj[0]


SCENARIOS = {
    # world 2
    "dp2_zero0": lambda: scenario_generator("dp2_zero0", zero_stage=0),
    "dp2_zero1": lambda: scenario_generator("dp2_zero1", zero_stage=1, num_microbatches=2),
    # no clipping: DeepSpeed's ZeRO-0 computed no gradient norm at all (grad_norm was logged NaN)
    "dp2_zero0_noclip": lambda: scenario_generator("dp2_zero0_noclip", zero_stage=0, clip=0.0),
    "dp2_zero2": lambda: scenario_generator("dp2_zero2", zero_stage=2),
    "dp2_zero3": lambda: scenario_generator("dp2_zero3", zero_stage=3),
    # torch.compile'd blocks (aot_eager: the traced graphs, no C++ code generation on CPU)
    "dp2_zero1_compile_ckpt": lambda: scenario_generator("dp2_zero1_compile_ckpt", zero_stage=1, compile_backend="aot_eager",
                                                         activation_checkpointing="full"),
    # train.compile under TP (blocks compiled in pieces between megatron's linears) and PP
    "tp2_compile_ckpt": lambda: scenario_generator("tp2_compile_ckpt", tp=2, zero_stage=0, compile_backend="aot_eager",
                                                   activation_checkpointing="full"),
    "pp2_compile_ckpt": lambda: scenario_generator("pp2_compile_ckpt", pp=2, zero_stage=1, num_microbatches=2, micro=2,
                                                   compile_backend="aot_eager", activation_checkpointing="full"),
    "dp2_zero3_ckpt": lambda: scenario_generator("dp2_zero3_ckpt", zero_stage=3, activation_checkpointing="full"),
    "dp2_zero3_offload": lambda: scenario_generator("dp2_zero3_offload", zero_stage=3, offload_optimizer=True,
                                                    offload_params=True, ema_decay=EMA_DECAY),
    "tp2": lambda: scenario_generator("tp2", tp=2, zero_stage=1),
    "tp2_ckpt_every2": lambda: scenario_generator("tp2_ckpt_every2", tp=2, zero_stage=0,
                                                  activation_checkpointing="every_k", checkpoint_every_k=2),
    "pp2": lambda: scenario_generator("pp2", pp=2, zero_stage=1, num_microbatches=4, micro=1),
    "pp2_ckpt": lambda: scenario_generator("pp2_ckpt", pp=2, zero_stage=1, num_microbatches=4, micro=1,
                                           activation_checkpointing="full"),
    # micro-batches of 2: a stage input's gradient can be a strided view (the gradient of a slice),
    # which gloo / NCCL refuse to send; micro-batches of 1 hide that
    "pp2_mb2": lambda: scenario_generator("pp2_mb2", pp=2, zero_stage=1, num_microbatches=2, micro=2),
    "s3dit_pp2_mb2": lambda: scenario_generator("s3dit_pp2_mb2", family="s3dit", pp=2, zero_stage=1,
                                                num_microbatches=2, micro=2),
    "qwen_pp2_mb2": lambda: scenario_generator("qwen_pp2_mb2", family="qwen_mmdit", pp=2, zero_stage=1,
                                               num_microbatches=2, micro=2),
    "s3dit_tp2": lambda: scenario_generator("s3dit_tp2", family="s3dit", tp=2, zero_stage=1),
    "qwen_tp2": lambda: scenario_generator("qwen_tp2", family="qwen_mmdit", tp=2, zero_stage=1),
    "s3dit_pp2": lambda: scenario_generator("s3dit_pp2", family="s3dit", pp=2, zero_stage=1, num_microbatches=4, micro=1),
    "qwen_pp2": lambda: scenario_generator("qwen_pp2", family="qwen_mmdit", pp=2, zero_stage=1, num_microbatches=4, micro=1),
    "iomm_dp2_zero3": lambda: scenario_iomm("iomm_dp2_zero3", zero_stage=3, checkpoint_mllm=True, ema_decay=EMA_DECAY,
                                            eval_samples=5, persistence_threshold=20000, captions=True,
                                            samples=True),
    # train.compile + train.compile_mllm: generator blocks and the frozen LLM's layers compiled (aot_eager)
    "iomm_dp2_zero1_compile_mllm": lambda: scenario_iomm("iomm_dp2_zero1_compile_mllm", zero_stage=1,
                                                         compile_backend="aot_eager", compile_mllm=True),
    # EMA (parallel/ema.py): parity with the single-process EMA, bitwise same-layout resume, export
    # 5 latent channels, patch 1: the output bias has 5 elements, so ZeRO-3 pads its 2 partitions
    # (3 + 2 real elements): the EMA must hold the real ones only
    "ema_dp2_zero3": lambda: scenario_ema("ema_dp2_zero3", export=True, zero_stage=3,
                                          flux_kw=dict(in_channels=5, latent_patch=1)),
    "ema_dp2_zero1": lambda: scenario_ema("ema_dp2_zero1", zero_stage=1),
    "ema_tp2": lambda: scenario_ema("ema_tp2", tp=2, zero_stage=1),
    # Qwen-Image family + tiny Qwen2.5-VL + LoRA (peft): only adapters, RQA and projection train
    "lora_dp2_zero2": lambda: scenario_iomm("lora_dp2_zero2", zero_stage=2, config="tiny_qwen_lora.yaml",
                                            resolution=32),
    "managed_refused": lambda: scenario_managed_refused("managed_refused"),
    # a NaN on one rank at step 1: skipped on every rank, later steps as the reference that skipped it
    "nonfinite_dp2_zero0_noclip": lambda: scenario_nonfinite("nonfinite_dp2_zero0_noclip", zero_stage=0, clip=0.0),
    "nonfinite_dp2_zero2": lambda: scenario_nonfinite("nonfinite_dp2_zero2", zero_stage=2),
    "nonfinite_loss_dp2_zero2": lambda: scenario_nonfinite("nonfinite_loss_dp2_zero2", zero_stage=2, loss_only=True),
    "nonfinite_loss_pp2": lambda: scenario_nonfinite("nonfinite_loss_pp2", pp=2, zero_stage=1, num_microbatches=2,
                                                     micro=2, loss_only=True),
    "nonfinite_dp2_zero3": lambda: scenario_nonfinite("nonfinite_dp2_zero3", zero_stage=3),
    "nonfinite_tp2_zero0": lambda: scenario_nonfinite("nonfinite_tp2_zero0", tp=2, zero_stage=0),
    "nonfinite_bf16_zero0": lambda: scenario_nonfinite_bf16("nonfinite_bf16_zero0", 0),
    "nonfinite_bf16_zero1": lambda: scenario_nonfinite_bf16("nonfinite_bf16_zero1", 1),
    "nonfinite_bf16_zero2": lambda: scenario_nonfinite_bf16("nonfinite_bf16_zero2", 2),
    "nonfinite_bf16_zero3": lambda: scenario_nonfinite_bf16("nonfinite_bf16_zero3", 3),
    "nonfinite_checkpoints": lambda: scenario_nonfinite_checkpoints("nonfinite_checkpoints"),
    "nonfinite_tp2dp2_zero1": lambda: scenario_nonfinite("nonfinite_tp2dp2_zero1", tp=2, zero_stage=1),
    "nonfinite_pp2": lambda: scenario_nonfinite("nonfinite_pp2", pp=2, zero_stage=1, num_microbatches=2, micro=2),
    "muon_dp2_zero0": lambda: scenario_muon("muon_dp2_zero0", zero_stage=0),
    "muon_tp2_zero0": lambda: scenario_muon("muon_tp2_zero0", tp=2, zero_stage=0),
    "muon_tp2_per_shard": lambda: scenario_muon("muon_tp2_per_shard", shard_check=True, tp=2, zero_stage=0),
    # clip 0: DeepSpeed's and torch's clip coefficients differ in the last bit (the ~1e-7 of the fp32
    # runs), which bf16 autocast rounding would amplify; clipping is proved by the fp32 runs.
    "nonfinite_muon_dp2_zero0": lambda: scenario_muon("nonfinite_muon_dp2_zero0", nan_step=1, zero_stage=0),
    "muon_dp2_bf16_autocast": lambda: scenario_muon("muon_dp2_bf16_autocast", bf16=True, clip=0.0, zero_stage=0),
    "bf16_full_zero0": lambda: scenario_bf16_full("bf16_full_zero0"),
    "ds_muon_dp2_zero1": lambda: scenario_ds_muon("ds_muon_dp2_zero1", zero_stage=1),
    "ds_muon_dp2_zero2": lambda: scenario_ds_muon("ds_muon_dp2_zero2", zero_stage=2),
    "ds_muon_dp2_zero3": lambda: scenario_ds_muon("ds_muon_dp2_zero3", zero_stage=3),
    # world 4
    "tp2dp2_zero1": lambda: scenario_generator("tp2dp2_zero1", tp=2, zero_stage=1),
    "tp2dp2_zero2": lambda: scenario_generator("tp2dp2_zero2", tp=2, zero_stage=2),
    "tp2dp2_zero3": lambda: scenario_generator("tp2dp2_zero3", tp=2, zero_stage=3),
    "tp2pp2": lambda: scenario_generator("tp2pp2", tp=2, pp=2, zero_stage=1, num_microbatches=4, micro=1),
    "iomm_tp2dp2": lambda: scenario_iomm("iomm_tp2dp2", tp=2, zero_stage=1),
    "ema_tp2pp2": lambda: scenario_ema("ema_tp2pp2", export=True, tp=2, pp=2, zero_stage=1, num_microbatches=4,
                                       micro=1),
    "iomm_tp2pp2": lambda: scenario_iomm("iomm_tp2pp2", tp=2, pp=2, zero_stage=1, num_microbatches=4, micro=1,
                                         ema_decay=EMA_DECAY, eval_samples=3, captions=True, samples=True),
    # the sample grid dealt over two replicas, each a two-stage pipeline
    "iomm_pp2dp2_samples": lambda: scenario_iomm("iomm_pp2dp2_samples", pp=2, zero_stage=1, num_microbatches=2,
                                                 micro=1, samples=True),
    "reshard_tp2dp2_to_dp4": lambda: scenario_reshard("reshard", dict(tp=2, zero_stage=1, num_microbatches=2),
                                                      dict(zero_stage=3), ema_decay=EMA_DECAY),
    "native_ckpt_tp2dp2_zero3": lambda: scenario_native_ckpt("native", tp=2, zero_stage=3),
    # our Muon's momenta through a layout-free checkpoint: owners under TP=2 x DP=2 -> owners under DP=4
    "muon_full_tp2dp2_to_dp4": lambda: scenario_reshard("muon_full", dict(tp=2, zero_stage=0, num_microbatches=2),
                                                        dict(zero_stage=0), muon=True),
    "muon_tp2dp2_zero0": lambda: scenario_muon("muon_tp2dp2_zero0", tp=2, zero_stage=0),
    "muon_tp2dp2_resume": lambda: scenario_muon("muon_tp2dp2_resume", resume_after=2, tp=2, zero_stage=0),
    # 4 owners: matrices split unevenly over the ranks, each rank's updates sent at its own offsets
    "muon_dp4_zero0": lambda: scenario_muon("muon_dp4_zero0", zero_stage=0),
}


def main():
    out_path, names = sys.argv[1], sys.argv[2:]
    init_distributed()
    torch.set_num_threads(1)
    results = {}
    for name in names:
        t0 = time.time()
        try:
            res = SCENARIOS[name]()
            res["ok"] = True
        except Exception as e:
            # A rank that fails leaves its peers inside a collective: record the failure and
            # exit hard so the launcher tears the group down instead of hanging.
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:],
                   "rank": dist.get_rank()}
            print(f"[rank {dist.get_rank()}] scenario {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            results[name] = res
            with open(f"{out_path}.rank{dist.get_rank()}.failed", "w") as f:
                json.dump(results, f, indent=1)
            os._exit(1)
        res["seconds"] = round(time.time() - t0, 2)
        # every scenario tears its layout down: only the default group may outlive it
        res["process_groups"] = len(dist.distributed_c10d._world.pg_map)
        results[name] = res
        if dist.get_rank() == 0:
            print(f"{name}: {json.dumps({k: v for k, v in res.items() if k != 'trace'})}", flush=True)
            with open(out_path, "w") as f:  # after every scenario: partial results survive a crash
                json.dump(results, f, indent=1)
        dist.barrier()
    if dist.get_rank() == 0:
        for d in _TMPDIRS:
            shutil.rmtree(d, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
