"""The single-process training loop (CPU or one GPU).

One step: for each of `grad_accum` micro-batches, loss / grad_accum backward; clip the
global grad norm; set the learning rate; optimizer step; EMA update. A step whose loss or
gradient norm is not finite updates nothing and is counted (train/nonfinite.py). Every `log_every`
steps a line goes to <run_dir>/metrics.jsonl (and wandb when enabled); checkpoints every
`ckpt_every` steps and at the end; SIGTERM/SIGINT (preemption) saves a checkpoint at the
next step boundary and stops. At the end: samples.png (reference | generated rows) and
loss_curve.png in the run directory.

Resuming restores model, EMA, optimizer, step, RNG states and data position: a run
stopped at step k and resumed reproduces the uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
import yaml

from ..config import ConfigError, RunConfig, format_errors
from ..iomm import IOMMModel, build_iomm
from ..optim.builder import EMA, build_optimizer, set_lr
from ..profiling.mfu import ThroughputLog
from . import checkpoint as ckpt
from .evaluate import build_eval_set, describe_eval, due, evaluate_model, format_eval, rng_devices
from .nonfinite import NonFiniteGuard, is_finite, nonfinite_names, weights_error
from .plots import save_grid, save_loss_curve


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    return torch.device(name)


def build_loader(cfg: RunConfig, rank: int = 0, world_size: int = 1, feature_spec=None):
    d = cfg.data
    if d.source == "builtin":
        from ..data.builtin import BuiltinLoader

        return BuiltinLoader(d.resolution, d.batch_size, d.image_only_fraction, d.builtin.crops_per_photo,
                             d.builtin.num_shapes, seed=cfg.train.seed, rank=rank, world_size=world_size)
    from ..data import build_webdataset_loader

    return build_webdataset_loader(d.webdataset, d.resolution, d.batch_size, rank, world_size, cfg.train.seed,
                                   feature_spec)


def check_feature_shards(cfg: RunConfig, model: IOMMModel):
    """Feature-shard runs: `model`'s FeatureSpec (its encoders' fingerprint, the latent channels
    and vision tokens it takes), for the loader's per-sample check, once the first sample of
    each shard list was compared with it: shards made by other encoders, at another resolution
    or in other shapes raise a ConfigError naming them here, before the first step. None for
    runs on raw images."""
    d = cfg.data
    if d.source != "webdataset" or not d.webdataset.features:
        return None
    from ..data.features import FeatureSpec, encoder_fingerprint, first_sample_problem
    from ..data.shards import expand_shards

    w = d.webdataset
    spec = FeatureSpec(encoders=encoder_fingerprint(model.vae, model.conditioner) if w.check_feature_encoders else None,
                       latent_channels=model.vae.latent_channels,
                       vision_shape=(model.conditioner.num_image_tokens, model.conditioner.hidden_size))
    errors = []
    lists = [(f"data.webdataset.{name}", getattr(w, name)) for name in ("image_shards", "paired_shards")]
    if cfg.eval.every:
        lists += [(f"eval.{name}", getattr(cfg.eval, name)) for name in ("image_shards", "paired_shards")]
    for key, specs in lists:
        urls = expand_shards(specs)
        problem = first_sample_problem(urls[0], d.resolution, spec) if urls else None
        if problem == "unrecorded":
            import logging

            logging.getLogger("iomm_scale.data").warning(
                "%s: feature shards without a record of the encoders that made them (written before it was kept): "
                "shapes and resolution are checked, the encoders cannot be", urls[0])
        elif problem:
            errors.append((key, f"{urls[0]}: {problem}"))
    if errors:
        hint = ("these feature shards were made for another model or resolution: train with the config that made "
                "them, or re-run tools/precompute_features.py with this one")
        if any("other encoders" in m for _, m in errors):
            hint += " (data.webdataset.check_feature_encoders: false takes them anyway)"
        raise ConfigError(format_errors(cfg.source, errors) + f"\n  {hint}")
    return spec


def check_inputs(cfg: RunConfig, init_from: bool) -> None:
    """What a run reads that the config alone cannot vouch for, checked before any model is
    built: local shards exist; `train.init_from` (when `init_from`, i.e. the run does not resume)
    is a checkpoint we can start from. Raises ConfigError naming the key."""
    errors = []
    if cfg.data.source == "webdataset":
        errors += [(f"data.webdataset.{k}", m) for k, m in cfg.data.webdataset.missing_shards()]
        if cfg.eval.every:
            from .evaluate import eval_webdataset_config

            errors += [(f"eval.{k}", m) for k, m in eval_webdataset_config(cfg).missing_shards()]
    if init_from and cfg.train.init_from:
        try:
            ckpt.init_source(cfg.train.init_from)
        except ValueError as e:
            errors.append(("train.init_from", str(e).removeprefix(f"train.init_from={cfg.train.init_from}: ")))
    if errors:
        raise ConfigError(format_errors(cfg.source, errors))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def flatten(stats: dict, prefix: str) -> dict:
    """{"reasons": {"truncated": 2}} -> {"data/reasons/truncated": 2} (flat keys for metrics.jsonl / wandb)."""
    out = {}
    for k, v in stats.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def init_wandb(cfg: RunConfig, run_dir: Path):
    """The wandb run when train.wandb is enabled (None otherwise); the metrics.jsonl lines go
    to it too. Called on the logging process only."""
    w = cfg.train.wandb
    if not w.enabled or w.mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        raise RuntimeError("train.wandb.enabled is true but wandb is not installed: pip install 'iomm-scale[wandb]'") from None
    return wandb.init(project=w.project, name=cfg.name, mode=w.mode, dir=str(run_dir), config=cfg.to_dict(),
                      resume="allow")


def write_run_config(run_dir: Path, cfg: RunConfig) -> None:
    """<run_dir>/config.yaml: the resolved config, with the run directory actually used."""
    d = cfg.to_dict()
    d["run_dir"] = str(run_dir)
    (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump(d, sort_keys=False))


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike | None = None, model: IOMMModel | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.run_dir or Path("runs") / cfg.name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.train.device)
        if cfg.train.precision == "bf16" and self.device.type != "cuda":
            raise ConfigError(f"{cfg.source}: train.precision: bf16 needs a CUDA device; use fp32 on CPU")
        torch.manual_seed(cfg.train.seed)
        par = cfg.parallel
        if par.tp > 1 or par.pp > 1 or par.zero_stage > 0:
            raise ConfigError(f"{cfg.source}: parallel.tp/pp/zero_stage need several processes: launch with "
                              "launchers/pretrain.py under torchrun or deepspeed (docs/PARALLEL.md)")
        check_inputs(cfg, init_from=self._resume_path() is None)
        self.model = model if model is not None else build_iomm(cfg, self.device)
        feature_spec = check_feature_shards(cfg, self.model)  # before compiling anything
        if par.activation_checkpointing != "none" or par.checkpoint_mllm:
            from ..parallel.checkpointing import apply_to_model

            apply_to_model(self.model, par.activation_checkpointing, par.checkpoint_every_k, par.checkpoint_mllm)
        if cfg.train.compile:  # after checkpointing: the checkpoint wrappers stay outside the compiled blocks
            from .compile import compile_blocks, compile_frozen_mllm

            compile_blocks(self.model.generator, cfg.train.compile_backend)
            if cfg.train.compile_mllm:
                compile_frozen_mllm(self.model.conditioner, cfg.train.compile_backend)
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg)
        self.ema = EMA(self.model.trainable_state_dict(), cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.loader = build_loader(cfg, feature_spec=feature_spec)
        self.eval_set = build_eval_set(cfg, feature_spec) if cfg.eval.every else None
        if self.eval_set is not None:
            print(describe_eval(cfg, self.eval_set, ema=self.ema is not None and cfg.eval.ema))
        self.throughput = ThroughputLog(cfg, self.device)  # FLOPs per sample, computed once
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.eval_history: list[tuple[int, float]] = []  # (step, eval/loss), drawn on loss_curve.png
        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        self._stop_requested = False
        self._on_disk: tuple[int, Path] | None = None  # (step, dir) of this run's checkpoint equal to the live state
        self._maybe_resume()
        # written once the run has started: a launch that fails (a resume refused, say) leaves the
        # run directory describing the run its checkpoints belong to
        write_run_config(self.run_dir, cfg)
        table = getattr(self.optimizer, "routing_table", None)
        if table:  # Muon: which weights go where; the summary lines here, every name in the file
            (self.run_dir / "optimizer_routing.txt").write_text(table + "\n")
            print("\n".join(line for line in table.splitlines() if line.startswith("[")))

    @property
    def stopped_by_signal(self) -> bool:
        """fit() returned early on SIGTERM / SIGINT (after saving a checkpoint)."""
        return self._stop_requested

    # ---- checkpoints -----------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def state_dict(self) -> dict:
        model_state = {n: p.detach().cpu() for n, p in self.model.trainable_state_dict().items()}
        frozen = {}
        if self.cfg.model.conditioner.mllm.random_init:
            frozen["conditioner.mllm"] = self.model.conditioner.mllm.state_dict()
        if self.cfg.model.vae.random_init:
            frozen["vae"] = self.model.vae.state_dict()
        state = {
            "step": self.step, "model": model_state, "frozen": frozen, "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None, "rng": ckpt.rng_state(),
            "data": self.loader.state_dict(), "history": self.history, "eval_history": self.eval_history,
            "nonfinite": self.nonfinite.state_dict(), "config": self.cfg.to_dict(),
        }
        if self.cfg.model.lora is not None:  # LoRA: the frozen base is not saved, its checksum is
            state["lora_base"] = self._lora_base()
        return state

    def _lora_base(self) -> str:
        """Checksum of the frozen generator base under LoRA (computed once: it never changes)."""
        if getattr(self, "_lora_base_fp", None) is None:
            from ..models.lora import base_fingerprint

            self._lora_base_fp = base_fingerprint(self.model.generator)
        return self._lora_base_fp

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        if state.get("lora_base") is not None:
            ckpt.check_lora_base(state["lora_base"], self._lora_base(), source)
        ckpt.copy_weights(self.model, state["model"], source)
        modules = dict(self.model.named_modules())
        for name, sd in state.get("frozen", {}).items():
            modules[name].load_state_dict(sd)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # another optimizer (optim.name) or parameter grouping
            saved = (state.get("config") or {}).get("optim", {}).get("name", "?")
            raise ckpt.CheckpointError(f"{source}: its optimizer state does not fit this run's (checkpoint written "
                                       f"with optim.name={saved}, this run has {self.cfg.optim.name}): {e}") from None
        if self.ema and state.get("ema"):
            ckpt.check_finite(state["ema"]["shadow"], source, "EMA weights")
            self.ema.load_state_dict(state["ema"])
        elif self.ema:  # saved without an EMA (optim.ema_decay was null then): start it from these weights
            self.ema.reset(self.model.trainable_state_dict())
            print("checkpoint holds no EMA: the EMA starts from the resumed weights")
        ckpt.load_data_position(self.loader, state["data"], self.cfg.train.resume_data_exact, source)
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        self.history = list(state.get("history", []))
        self.eval_history = list(state.get("eval_history", []))
        self.nonfinite.load_state_dict(state.get("nonfinite"))

    def _init_weights(self, path) -> None:
        """Fine-tuning start: weights from a (pre-training) checkpoint; fresh optimizer, step 0."""
        what = ckpt.apply_init_weights(self.model, path, self.cfg.train.init_from_ema)
        if self.ema:
            params = dict(self.model.named_parameters())
            self.ema.shadow = {n: params[n].detach().float().clone() for n in self.ema.shadow}
        print(f"initialised weights from {what}")

    def save(self) -> Path:
        """Checkpoint the current step, unless this run's checkpoints already hold it (saved at
        this step, or resumed from it): re-writing it would only open a window for a crash."""
        if self._on_disk is not None and self._on_disk[0] == self.step and (self._on_disk[1] / "state.pt").exists():
            return self._on_disk[1]
        bad = nonfinite_names(self.model.trainable_state_dict().items())
        if bad:  # never over good checkpoints (keep_checkpoints would prune them)
            raise weights_error(self.step, bad, ckpt.find_latest(self.ckpt_root))
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, self.state_dict(), self.cfg.train.keep_checkpoints)
        self._on_disk = (self.step, path)
        return path

    def _resume_path(self) -> Path | None:
        mode = self.cfg.train.resume
        return None if mode == "never" else ckpt.find_latest(self.ckpt_root) if mode == "auto" else Path(mode)

    def _maybe_resume(self) -> None:
        path = self._resume_path()
        if path is None:
            if self.cfg.train.init_from:
                self._init_weights(self.cfg.train.init_from)
            return
        self.load_state_dict(ckpt.load_checkpoint(path), f"resuming from {path}")
        if path.parent.resolve() == self.ckpt_root.resolve():
            self._on_disk = (self.step, path)
        print(f"resumed from {path} at step {self.step}")

    # ---- one step ----------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        accum = cfg.micro_batches  # train.grad_accum (or the same count as parallel.num_microbatches)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
        total = 0.0
        keys = []
        for _ in range(accum):
            batch = to_device(next(self.loader), self.device)
            with autocast:
                loss = self.model.loss(batch)
            (loss / accum).backward()
            total += loss.item() / accum
            keys += batch["keys"]  # every loader (built-in, raw or feature shards) gives keys
        params = self.model.trainable_parameters()
        if cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip).item()
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()
        lr = set_lr(self.optimizer, self.step, cfg)
        applied = is_finite(total, grad_norm)  # else weights, optimizer state and EMA stay as they are
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema and applied:
            self.ema.update(self.model.trainable_state_dict())
        self.step += 1
        if applied:
            self.history.append((self.step, total))
        return {"step": self.step, "loss": total, "lr": lr, "grad_norm": grad_norm, "samples": len(keys),
                "applied": applied, "keys": keys}

    # ---- held-out evaluation -------------------------------------------------------------
    def evaluate(self) -> dict:
        """eval/... metrics of the current weights (and eval_ema/... of the EMA's) on the
        held-out set; draws nothing from the training run's random streams."""
        bf16 = self.cfg.train.precision == "bf16"
        out = evaluate_model(self.model, self.eval_set, self.device, bf16)
        if self.ema is not None and self.cfg.eval.ema:
            backup = self.ema.swap_into(self.model)
            try:
                out.update(evaluate_model(self.model, self.eval_set, self.device, bf16, prefix="eval_ema/"))
            finally:
                self.ema.restore(self.model, backup)
        return {"step": self.step, **out}

    def write_step_samples(self) -> Path:
        """<run_dir>/samples/step_N.png (EMA weights when enabled), as samples.png at the end."""
        path = self.run_dir / "samples" / f"step_{self.step}.png"
        path.parent.mkdir(exist_ok=True)
        backup = self.ema.swap_into(self.model) if self.ema else None
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=rng_devices(self.device)):  # the conditioner draws a (null) mask
                write_sample_grid(self.model, self.cfg, self.device, path, self.loader)
        finally:
            self.model.train()
            if backup is not None:
                self.ema.restore(self.model, backup)
        return path

    # ---- the run -----------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop_requested = True

    def fit(self) -> dict:
        cfg = self.cfg.train
        metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        wandb_run = init_wandb(self.cfg, self.run_dir)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = None
        if cfg.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=self.cfg.name, dynamic_ncols=True)
        window, window_samples, t0 = [], 0, time.perf_counter()
        last = {}
        try:
            while self.step < cfg.steps and not self._stop_requested:
                out = self.train_step()
                warning = self.nonfinite.record(out["step"], out["applied"], out["loss"], out["grad_norm"], out["keys"])
                if warning:
                    (bar.write if bar else print)(warning)
                else:
                    window.append(out["loss"])
                window_samples += out["samples"]
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss']:.4f}")
                # a line per log_every steps, at the end, and before a stop on a signal (the resumed
                # run's windows then start where this one's stopped, no step left out)
                if (self.step % cfg.log_every == 0 or self.step == cfg.steps or self._stop_requested
                        or self.nonfinite.exceeded):
                    dt = time.perf_counter() - t0
                    last = {"step": self.step, "loss": sum(window) / len(window) if window else None,
                            "loss_steps": len(window), "loss_last": out["loss"] if out["applied"] else None,
                            "nonfinite_steps": self.nonfinite.total,
                            "lr": out["lr"], "grad_norm": out["grad_norm"], "samples_per_s": window_samples / dt,
                            **self.throughput(window_samples / dt),
                            "time": time.time(), **flatten(self.loader.stats(), "data/")}
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                    if wandb_run is not None:
                        wandb_run.log(last, step=self.step)
                    window, window_samples, t0 = [], 0, time.perf_counter()
                if self.nonfinite.exceeded:  # no update since the streak began: keep those weights, stop
                    raise self.nonfinite.error(self.save())
                e = self.cfg.eval
                if self.eval_set is not None and not self._stop_requested and due(self.step, e.every, cfg.steps):
                    line = {**self.evaluate(), "time": time.time()}
                    metrics_file.write(json.dumps(line) + "\n")
                    metrics_file.flush()
                    if wandb_run is not None:
                        wandb_run.log(line, step=self.step)
                    self.eval_history.append((self.step, line["eval/loss"]))
                    (bar.write if bar else print)(format_eval(line))
                if e.sample_every and self.step % e.sample_every == 0 and not self._stop_requested:
                    (bar.write if bar else print)(f"step {self.step}: samples {self.write_step_samples()}")
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save()
            final = self.save()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if bar:
                bar.close()
            metrics_file.close()
        if self._stop_requested:
            print(f"stopped by signal at step {self.step}; checkpoint {final}")
            return last
        self.write_outputs()
        if self.cfg.model.lora is not None:  # diffusers-format LoRA (+ RQA / projection) of the final weights
            from ..models.lora import export_trained

            print(f"LoRA exported to {export_trained(self.model, self.run_dir / 'lora', self.ema)}")
        if wandb_run is not None:
            wandb_run.finish()
        return last

    @torch.no_grad()
    def write_outputs(self) -> None:
        """samples.png (row 1: references, row 2: samples conditioned on them, with EMA weights
        when enabled) and loss_curve.png."""
        if self.history:
            steps, losses = zip(*self.history)
            save_loss_curve(list(steps), list(losses), self.run_dir / "loss_curve.png", self.eval_history)
        if self.cfg.train.num_samples <= 0:
            return
        backup = self.ema.swap_into(self.model) if self.ema else None
        self.model.eval()
        try:
            write_sample_grid(self.model, self.cfg, self.device, self.run_dir / "samples.png", self.loader)
        finally:
            self.model.train()
            if backup is not None:
                self.ema.restore(self.model, backup)


def reference_batch(cfg: RunConfig, model: IOMMModel, device, loader=None):
    """(reference images [n, 3, H, W] in [-1, 1], their precomputed vision features or None) for
    the sample grid: the built-in photos, or the first batch of the configured shards; from
    feature shards the references are their latents decoded by the VAE."""
    from ..data.builtin import BuiltinLoader
    from ..data.preprocess import unit_pixels

    n = cfg.train.num_samples
    if cfg.data.source == "builtin":
        loader = loader if isinstance(loader, BuiltinLoader) else build_loader(cfg)
        photos = loader.samples[: loader.num_photos]
        step = cfg.data.builtin.crops_per_photo  # one crop of each photo first
        return torch.stack([img for img, _, _ in (photos[::step] + photos)[:n]]).to(device), None
    batch = next(build_loader(cfg, feature_spec=getattr(loader, "feature_spec", None)))
    if "latents" in batch:
        latents = batch["latents"][:n].to(device, torch.float32)
        return model.vae.decode(latents), batch["vision_features"][:n].to(device, torch.float32)
    return unit_pixels(batch["pixels"][:n].to(device)), None


def grid_rows(n: int, part: tuple[int, int] | None) -> list[int]:
    """The rows of an n-image sample grid that part (index, count) samples: consecutive blocks of
    ceil(n / count), the last ones padded with the last row, so that every part makes the same
    module calls (ZeRO-3 gathers) and the parts, concatenated in order, start with rows 0..n-1."""
    if part is None:
        return list(range(n))
    index, count = part
    per = -(-n // count)
    return [min(i, n - 1) for i in range(index * per, (index + 1) * per)]


@torch.no_grad()
def sample_grid(model: IOMMModel, cfg: RunConfig, device, loader=None, generator_fn=None,
                part: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(references [n, 3, H, W], samples conditioned on them) in [-1, 1], seeded by train.seed:
    the same images from the same weights on any rank. `part` (index, count): only the rows
    `grid_rows` gives that part (the launchers deal the grid out over the data-parallel
    replicas and gather it); each row starts from the same noise as in the whole grid.
    `generator_fn`: a pipeline's forward over its stages (see IOMMModel.sample)."""
    refs, feats = reference_batch(cfg, model, device, loader)
    g = torch.Generator(device=device).manual_seed(cfg.train.seed)
    n, size = refs.shape[0], cfg.data.resolution // cfg.model.vae.downsample_factor
    noise = torch.randn((n, model.vae.latent_channels, size, size), device=device, generator=g)
    rows = grid_rows(n, part)
    images = model.sample(len(rows), cfg.data.resolution, pixels=refs[rows] if feats is None else None,
                          vision_features=None if feats is None else feats[rows], noise=noise[rows],
                          generator_fn=generator_fn)
    return refs, images


def write_sample_grid(model: IOMMModel, cfg: RunConfig, device, path, loader=None) -> None:
    """PNG grid: row 1 the references, row 2 samples conditioned on them (seeded by train.seed)."""
    refs, images = sample_grid(model, cfg, device, loader)
    save_grid([refs.cpu(), images.cpu()], path)
