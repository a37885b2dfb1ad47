"""Held-out evaluation during training: the flow-matching loss on a fixed set of samples, with
fixed noise, timesteps and MIM masks, so that its curve moves only when the weights do.

    eval:
      every: 500                 # steps between evaluations (0: never); the run's last step too
      samples: 256               # held-out samples, the same ones every time
      image_shards: ["data/val/img-{000000..000003}.tar"]   # webdataset runs: held-out shards
      sample_every: 2000         # a sample grid, <run_dir>/samples/step_N.png

What is fixed, and why the figure is comparable between evaluations, layouts and runs with the
same `eval` section (samples, seed and shards decide the set, its timestep grid and draws):
- the samples: the first `samples` of the held-out stream read in shard order (no shuffle, one
  process), on every rank, whatever the layout;
- per sample j, its own numbers from a generator seeded by (eval.seed, j): Gaussian noise and
  the MIM keep mask (the run's mask ratio); its timestep from an evenly spaced grid on (0, 1)
  dealt out by a fixed permutation (so every t range is covered, and no shift or logit-normal
  weighting favours one range); no condition dropout.
  A sample's loss therefore does not depend on the micro-batch it is evaluated in, on the
  number of data-parallel ranks, or on whether another sample is present (up to floating-point
  reduction order): a DP x TP x ZeRO-3 run reports the single-process figure.
- evaluation draws nothing from the training run's random streams: a run with evaluation on
  trains bit for bit as with it off (tested).

Metrics (one metrics.jsonl line per evaluation, and wandb): `eval/loss` (mean over the
samples), `eval/loss_t0.00-0.25` ... (mean over the samples whose t falls in each quarter:
low t is near the data, high t near noise), `eval/samples`; with an EMA (and eval.ema) also
`eval_ema/...` for the EMA weights (the launchers swap their sharded EMA into the engine's
weights for it and back: parallel/ema.DistributedEMA.swap_in). The built-in source has no held-out split: its evaluation
reads the built-in images again (a check of fit, not of generalisation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations; 0 = never. Also after the run's last step.
    samples: int = 64  # held-out samples (fewer when the held-out stream has fewer)
    image_shards: list[str] = field(default_factory=list)  # webdataset runs: held-out shards, same kind
    paired_shards: list[str] = field(default_factory=list)  # (raw or feature) as data.webdataset's
    seed: int = 1234  # the eval set's noise, masks and timestep order
    buckets: int = 4  # eval/loss_t... over this many equal t ranges
    ema: bool = True  # also evaluate the EMA weights (when optim.ema_decay is set): eval_ema/...
    sample_every: int = 0  # steps between sample grids <run_dir>/samples/step_N.png; 0 = never

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        for name in ("every", "sample_every"):
            if getattr(self, name) < 0:
                errors.append((name, f"must be >= 0 (0: never), got {getattr(self, name)}"))
        if self.samples < 1:
            errors.append(("samples", f"must be >= 1, got {self.samples}"))
        if self.buckets < 1:
            errors.append(("buckets", f"must be >= 1, got {self.buckets}"))
        if self.seed < 0:
            errors.append(("seed", f"must be >= 0, got {self.seed}"))
        for name in ("image_shards", "paired_shards"):
            value = getattr(self, name)
            if not all(isinstance(s, str) and s.strip() for s in value):
                errors.append((name, f"must be a list of non-empty strings, got {value!r}"))
        return errors


def config_errors(cfg) -> list[tuple[str, str]]:
    """Checks across sections (RunConfig validation): a webdataset run that evaluates names its
    held-out shards, and none of them is a training shard."""
    e = cfg.eval
    if not e.every:
        return []
    if cfg.data.source != "webdataset" or cfg.data.webdataset is None:
        if e.image_shards or e.paired_shards:
            return [("eval.image_shards", "held-out shards are read for data.source: webdataset only (the built-in "
                     "source evaluates on its own images)")]
        return []
    if not e.image_shards and not e.paired_shards:
        return [("eval.image_shards", "held-out evaluation (eval.every > 0, iomm-eval) on webdataset data needs "
                 "held-out shards: set eval.image_shards and/or eval.paired_shards (written like the training shards)")]
    from ..data.shards import expand_shards

    w = cfg.data.webdataset
    training = set(expand_shards(w.image_shards)) | set(expand_shards(w.paired_shards))
    errors = []
    for name in ("image_shards", "paired_shards"):
        shared = [u for u in expand_shards(getattr(e, name)) if u in training]
        if shared:
            shown = ", ".join(shared[:3]) + (", ..." if len(shared) > 3 else "")
            errors.append((f"eval.{name}", f"{len(shared)} held-out shards are also training shards: {shown}"))
    return errors


def eval_webdataset_config(cfg):
    """data.webdataset with the held-out shards, read once in order by one process."""
    return dataclasses.replace(cfg.data.webdataset, image_shards=list(cfg.eval.image_shards),
                               paired_shards=list(cfg.eval.paired_shards), shuffle_buffer=1, epochs=1,
                               resample=False, drop_last=False, num_workers=0, pin_memory=False)


def sample_seed(seed: int, *key: int) -> int:
    """A torch seed for (eval.seed, *key): sample j's numbers use (0, j), the timestep order (1,)."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(1, np.uint64)[0] % (2**63 - 1))


# ---------------------------------------------------------------------------------- the set
@dataclass
class EvalSet:
    """The held-out samples in micro-batches: batches[k] holds samples indices[k] (global
    indices 0 .. n-1); t[j] is sample j's timestep."""
    batches: list[dict]
    indices: list[list[int]]
    t: torch.Tensor
    seed: int
    buckets: int = 4
    data_stats: dict = field(default_factory=dict)  # the held-out loader's counters (bad samples skipped)

    @property
    def num_samples(self) -> int:
        return len(self.t)

    @classmethod
    def from_batches(cls, batches: list[dict], seed: int, buckets: int = 4, limit: int | None = None) -> "EvalSet":
        """Keep the first `limit` samples of `batches` (copied: loaders recycle batch memory)."""
        kept, indices, n = [], [], 0
        for batch in batches:
            size = batch_size(batch)
            take = size if limit is None else min(size, limit - n)
            if take <= 0:
                break
            kept.append({k: v[:take].clone() if isinstance(v, torch.Tensor) else list(v[:take])
                         if isinstance(v, list) else v for k, v in batch.items()})
            indices.append(list(range(n, n + take)))
            n += take
        if n == 0:
            raise ValueError("the held-out set is empty (no readable sample in the eval shards?)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(seed, 1)))
        t = (order.double() + 0.5) / n  # an even grid on (0, 1), dealt out in a fixed random order
        return cls(kept, indices, t, seed, buckets)

    def keep_share(self, dp: int, dp_rank: int) -> None:
        """Drop the micro-batches another data-parallel replica evaluates (`evaluate` deals
        batch k to replica k % dp), keeping batch 0, which every replica may repeat as a filler:
        a rank then holds ~1/dp of the set. Indices and timesteps stay whole."""
        self.batches = [b if k % dp == dp_rank or k == 0 else None for k, b in enumerate(self.batches)]

    def draws(self, k: int) -> "SampleDraws":
        return SampleDraws(self.indices[k], self.t[self.indices[k]], self.seed)


def batch_size(batch: dict) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
        if isinstance(v, list):
            return len(v)
    raise ValueError("a batch without samples")


def build_eval_set(cfg, feature_spec=None) -> EvalSet:
    """The run's held-out set (every rank builds the same one): the first eval.samples of the
    held-out shards, or of the built-in images, in micro-batches of data.batch_size."""
    e, d = cfg.eval, cfg.data
    if d.source == "builtin":
        from ..data.builtin import BuiltinLoader

        loader = BuiltinLoader(d.resolution, d.batch_size, d.image_only_fraction, d.builtin.crops_per_photo,
                               d.builtin.num_shapes, seed=e.seed)
        take = min(e.samples, loader.epoch_size // d.batch_size * d.batch_size)  # epoch 0's whole batches
        batches = [next(loader) for _ in range(max(1, -(-take // d.batch_size)))]
        return EvalSet.from_batches(batches, e.seed, e.buckets, limit=max(take, 1))
    from ..data import build_webdataset_loader

    loader = build_webdataset_loader(eval_webdataset_config(cfg), d.resolution, d.batch_size, 0, 1, e.seed,
                                     feature_spec)
    batches, n = [], 0
    try:
        for batch in loader:
            batches.append(batch)
            n += batch_size(batch)
            if n >= e.samples:
                break
        eval_set = EvalSet.from_batches(batches, e.seed, e.buckets, limit=e.samples)
    finally:
        loader.close()
    eval_set.data_stats = loader.stats()
    return eval_set


class SampleDraws:
    """The random numbers of a micro-batch of held-out samples, each from its own generator
    (IOMMModel.prepare_generator_inputs calls it with the encoded latents):
    -> (t [B], noise like latents, keep mask [B, num_image_tokens])."""

    def __init__(self, indices: list[int], t: torch.Tensor, seed: int):
        self.indices, self.t, self.seed = indices, t, seed

    def __call__(self, latents: torch.Tensor, num_image_tokens: int, mask_ratio: float):
        noise, keep = [], []
        for j in self.indices:
            g = torch.Generator().manual_seed(sample_seed(self.seed, 0, j))
            noise.append(torch.randn(latents.shape[1:], generator=g, dtype=torch.float32))
            keep.append(torch.rand(num_image_tokens, generator=g) >= mask_ratio)
        dev = latents.device
        return (self.t.to(dev, torch.float32), torch.stack(noise).to(dev, latents.dtype), torch.stack(keep).to(dev))


# ---------------------------------------------------------------------------------- running
def evaluate(eval_set: EvalSet, sample_losses: Callable[[dict, SampleDraws], torch.Tensor], dp: int = 1,
             dp_rank: int = 0, all_reduce: Callable[[torch.Tensor], None] | None = None,
             prefix: str = "eval/") -> dict:
    """Per-sample losses of the whole set -> metrics. With dp > 1, micro-batch k is evaluated
    by data-parallel rank k % dp, and `all_reduce` sums the per-sample vector over the ranks.
    Every rank runs the same number of forwards (a rank without a batch in the last round
    repeats batch 0 and discards it): ZeRO-3 gathers its parameters collectively."""
    n_batches = len(eval_set.batches)
    losses = torch.zeros(eval_set.num_samples, dtype=torch.float64)
    for first in range(0, n_batches, dp):
        k = first + dp_rank
        real = k < n_batches
        out = sample_losses(eval_set.batches[k if real else 0], eval_set.draws(k if real else 0))
        if real:
            losses[eval_set.indices[k]] = out.detach().double().cpu()
    if all_reduce is not None and dp > 1:
        all_reduce(losses)
    return metrics(losses, eval_set.t, eval_set.buckets, prefix)


def rng_devices(device: torch.device) -> list[int]:
    """What torch.random.fork_rng must fork besides the CPU generator for work on `device`."""
    device = torch.device(device)
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def evaluate_model(model, eval_set: EvalSet, device: torch.device, bf16: bool = False, prefix: str = "eval/") -> dict:
    """One process: the metrics of `model`'s current weights (eval mode, no gradients, bf16
    autocast on CUDA when asked). The caller's random streams are left as they were: the
    evaluation draws from its own generators (and a posterior-sampling VAE from a forked,
    eval.seed-seeded global one)."""
    device = torch.device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")

    def sample_losses(batch, draws):
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with autocast:
            return model.sample_losses(batch, draws)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices(device)):
            torch.manual_seed(eval_set.seed)
            return evaluate(eval_set, sample_losses, prefix=prefix)
    finally:
        model.train(was_training)


def metrics(losses: torch.Tensor, t: torch.Tensor, buckets: int, prefix: str = "eval/") -> dict:
    out = {f"{prefix}loss": float(losses.mean()), f"{prefix}samples": int(losses.numel())}
    for b in range(buckets):
        lo, hi = b / buckets, (b + 1) / buckets
        inside = (t >= lo) & (t < hi)
        if inside.any():
            out[f"{prefix}loss_t{lo:.2f}-{hi:.2f}"] = float(losses[inside].mean())
    return out


def describe_eval(cfg, eval_set: EvalSet, ema: bool = False, every: bool = True) -> str:
    where = "the built-in images" if cfg.data.source == "builtin" else "the held-out shards"
    short = f" (asked for {cfg.eval.samples}: that is all there is)" if eval_set.num_samples < cfg.eval.samples else ""
    stats = eval_set.data_stats
    bad = {k: v for k, v in stats.get("reasons", {}).items() if v}
    skipped = ""
    if bad or stats.get("shard_errors"):
        what = ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))
        skipped = f" ({stats.get('bad', 0)} bad samples skipped: {what}; {stats.get('shard_errors', 0)} unreadable shards)"
    when = f", every {cfg.eval.every} steps" if every else ""
    return (f"eval: {eval_set.num_samples} samples of {where}{short}{skipped} in {len(eval_set.batches)} micro-batches"
            f"{when}{', live and EMA weights' if ema else ''}")


def format_eval(line: dict) -> str:
    parts = [f"{k.split('/', 1)[0]} {v:.5f}" for k, v in line.items() if k.endswith("/loss")]
    return f"step {line['step']}: " + ", ".join(parts)


def due(step: int, every: int, last_step: int) -> bool:
    """Evaluate after this step: every `every` steps and after the run's last step."""
    return every > 0 and (step % every == 0 or step == last_step)
