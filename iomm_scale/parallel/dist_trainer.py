"""The multi-process training loop behind launchers/*.py (DeepSpeed engine + megatron groups).

Same run config and command line as `iomm-train`, plus the `parallel` section (see
parallel/config.py). The single-process `train/trainer.py` stays the reference: this
loop reuses its model builder, data loader and learning-rate schedule, and replaces the
step with `ParallelRuntime.train_step` (TP / PP / ZeRO / activation checkpointing).

Per step, every data-parallel rank takes `micro-batches` loader batches (data.batch_size
samples each, its own share of the data: the loader is built with rank = dp rank,
world = dp size); TP ranks and pipeline stages of one replica read the same batches.
Global batch = data.batch_size x micro-batches x dp.

Checkpoints: DeepSpeed engine checkpoints in <run_dir>/checkpoints/<tag>/ (+ `latest`),
each data-parallel rank's loader position beside them; on SIGTERM / SIGINT (SLURM
preemption) every rank agrees at the next step boundary, saves and exits 0 so the batch
script can requeue; `train.resume: auto` picks the latest checkpoint up. With
`--save-full`, a layout-free copy is written at the end (resume under any layout with
`--resume-full DIR`).

EMA (`optim.ema_decay`, as the single-process trainer): `ParallelRuntime` keeps an fp32 EMA of
the trainable parameters per rank (parallel/ema.py: the ZeRO-3 partition, else the rank's local
tensors), updated after every optimizer step and saved with every checkpoint (same-layout files
beside DeepSpeed's, and inside `--save-full`); at the end of a completed run the full EMA is
exported to <run_dir>/ema/ (`ema.safetensors` + a single-process `state.pt` for iomm-sample and
`train.init_from`).

Muon (`optim.name: muon`, docs/PARALLEL.md "Muon under the launchers"): with
`optim.muon.implementation: iomm` (default) our `DistributedMuon` is DeepSpeed's client
optimizer at ZeRO-0 (DeepSpeed averages gradients over the DP group and clips the global norm
over TP; each matrix has one DP owner, TP shards are gathered for Newton-Schulz); with
`deepspeed`, DeepSpeed builds its own Muon at ZeRO 1-3. `muon_launch_errors` refuses the
layouts / settings neither can run, naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ParallelConfig, describe, model_info, validate_layout
from .groups import init_distributed, init_parallel_state, launch_world_size

from .runtime import ParallelRuntime

log = logging.getLogger("iomm_scale.parallel")
LAYOUT_FILE = "iomm_layout.json"  # beside DeepSpeed's files in each checkpoint tag


def _merge(batches: list[dict]) -> dict:
    out = {}
    for k in batches[0]:
        vals = [b[k] for b in batches]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.cat(vals)
        elif isinstance(vals[0], list):
            out[k] = [x for v in vals for x in v]
        else:
            out[k] = vals[0]
    return out


MUON_ALTERNATIVES = ("use parallel.zero_stage: 0 with optim.muon.implementation: iomm (our DistributedMuon: "
                     "any tp x dp), or optim.muon.implementation: deepspeed with zero_stage 1-3 (DeepSpeed's Muon: "
                     "tp 1, its own routing and scaling); see docs/PARALLEL.md, 'Muon under the launchers'")


def lora_launch_errors(cfg, pcfg: ParallelConfig) -> list[tuple[str, str]]:
    """LoRA runs data-parallel (ZeRO 0-3; proved equal to one process in tests/parallel):
    tensor parallelism swaps the very linears peft wraps, and pipeline stages are cut from the
    plain block classes, so both are refused rather than silently mis-wired."""
    if getattr(cfg.model, "lora", None) is None:
        return []
    return [(f"parallel.{k}", f"model.lora with {k}={v}: LoRA adapters run data-parallel only (tp 1, pp 1, "
             "ZeRO 0-3); a 20B base fits one 80 GB GPU in bf16 (model.lora.base_dtype), use ZeRO-3 beyond")
            for k, v in (("tp", pcfg.tp), ("pp", pcfg.pp)) if v > 1]


def muon_launch_errors(cfg, pcfg: ParallelConfig) -> list[tuple[str, str]]:
    """Why `optim.name: muon` cannot run under this layout: (run-config key, message) pairs.

    implementation "iomm" (default): `DistributedMuon` as DeepSpeed's client optimizer at ZeRO-0,
    where the optimizer sees whole (TP-sharded) tensors: needs zero_stage 0, so no pp > 1.
    implementation "deepspeed": DeepSpeed's built-in Muon at ZeRO 1-3, tp = pp = 1, and only the
    settings it can honour (see `deepspeed_muon_extra`).
    """
    o = cfg.optim
    if o.name != "muon":
        return []
    m, e = o.muon, []
    if m.implementation == "iomm":
        if pcfg.pp > 1:
            e.append(("parallel.pp", f"Muon cannot run with pipeline parallelism (pp={pcfg.pp}): our Muon needs "
                      "zero_stage 0 (ZeRO hands the optimizer flat 1-D partitions) and pipelines need zero_stage 1; "
                      "use tp x dp (pp 1) with zero_stage 0"))
        elif pcfg.zero_stage != 0:
            e.append(("optim.muon.implementation", f"'iomm' Muon needs parallel.zero_stage: 0, got "
                      f"{pcfg.zero_stage}: ZeRO-{pcfg.zero_stage} hands the optimizer flat 1-D partitions of the "
                      f"parameters, which cannot be orthogonalised; {MUON_ALTERNATIVES}"))
    elif m.implementation == "deepspeed":
        why = "DeepSpeed's Muon (optim.muon.implementation: deepspeed)"
        if pcfg.zero_stage == 0:
            e.append(("parallel.zero_stage", f"{why} is wired for ZeRO 1-3; at zero_stage 0 use "
                      "optim.muon.implementation: iomm"))
        if pcfg.tp > 1:
            e.append(("parallel.tp", f"{why} would orthogonalise each tensor-parallel rank's shard as if it were the "
                      f"whole matrix (DeepSpeed #7807's pattern), tp={pcfg.tp}; use tp 1, or "
                      "optim.muon.implementation: iomm with zero_stage 0 for tp > 1"))
        if pcfg.pp > 1:
            e.append(("parallel.pp", f"{why} is not proved with pipeline parallelism here; use pp 1"))
        if o.grad_clip > 0:
            e.append(("optim.grad_clip", f"{why} clips the global norm of the orthogonalised Muon updates (with the "
                      f"AdamW gradients), not of the gradient: grad_clip {o.grad_clip} would shrink every step by "
                      "~1/sqrt(sum of min(rows, cols)) over the Muon matrices; set optim.grad_clip: 0, or use "
                      "implementation: iomm (clips the gradient before Muon)"))
        if m.scaling != "original":
            e.append(("optim.muon.scaling", f"{why} scales updates by sqrt(max(1, rows/cols)) only: set scaling: "
                      "original (and an lr tuned for it: match_rms_adamw's 0.2 sqrt(max(rows, cols)) is ~12x larger "
                      "at width 3840)"))
        if not m.nesterov or m.ns_steps != 5 or m.ns_coefficients != "keller":
            e.append(("optim.muon", f"{why} always runs Nesterov momentum and 5 Newton-Schulz steps with Keller's "
                      "coefficients: set nesterov: true, ns_steps: 5, ns_coefficients: keller"))
        if m.modulation != "muon" or m.per_head:
            e.append(("optim.muon.modulation", f"{why} routes by name only (every >= 2-D parameter whose name lacks "
                      "'embed' / 'lm_head' goes to Muon, AdaLN modulation included; fused q|k|v as one matrix): set "
                      "modulation: muon and per_head: false"))
    return e


def deepspeed_muon_extra(cfg) -> dict:
    """DeepSpeed config entries for its built-in Muon from the run config: optim.lr for both
    halves (as our Muon), optim.muon.momentum, optim.weight_decay, the AdamW betas / eps with
    torch's AdamW, Gram Newton-Schulz, and "reduce_scatter": false (ZeRO-3 asserts it)."""
    from ..optim.muon_dist import deepspeed_muon_config

    o = cfg.optim
    ds = deepspeed_muon_config(lr=o.lr, momentum=o.muon.momentum, weight_decay=o.weight_decay, adam_lr=o.lr,
                               betas=tuple(o.betas), eps=o.eps)
    return {"optimizer": ds["optimizer"], "zero_optimization": {"reduce_scatter": False}}


def precision_extra(cfg, pcfg: ParallelConfig) -> dict:
    """DeepSpeed's precision entries. bf16 normally means DeepSpeed's bf16 mode (bf16 parameters and
    gradients, fp32 master in the optimizer wrapper). For our Muon at ZeRO-0 it means torch autocast
    instead (fp32 parameters and gradients, bf16 compute): DeepSpeed's ZeRO-0 bf16 wrapper
    (FP16_UnfusedOptimizer) measures the clipping norm on gradient tensors that lack megatron's
    `tensor_model_parallel` tag, so under tp > 1 it would clip by the wrong norm, while the fp32 path
    clips with `clip_grad_norm_(mpu=...)` over the parameters (TP shards counted once each)."""
    bf16 = cfg.train.precision == "bf16"
    if cfg.optim.name == "muon" and cfg.optim.muon.implementation == "iomm" and bf16:
        return {"bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    if bf16:  # skip a step whose gradient norm is not finite (without it ZeRO-1 / 2 apply it; train/nonfinite.py)
        return {"bf16": {"enabled": True, "check_grad_overflow": True}}
    return {"bf16": {"enabled": False}}


def untag_replicated(module, optimizer) -> int:
    """Muon layouts take `tp_dim` from a linear's `tp_style` tag, i.e. where tensor parallelism
    *would* shard it; TP is applied to the generator only, so tagged linears elsewhere (the RQA)
    stay whole on every rank. Drop `tp_dim` for every Muon matrix whose layer was not swapped
    for a megatron TP layer; returns how many were dropped."""
    from .tensor_parallel import is_tp_layer

    layer_of = {id(p): m for m in module.modules() for p in m.parameters(recurse=False)}
    dropped = 0
    for group in optimizer.param_groups:
        if not group["use_muon"]:
            continue
        for i, (p, layout) in enumerate(zip(group["params"], group["layouts"])):
            if layout and layout.get("tp_dim") is not None and not is_tp_layer(layer_of[id(p)]):
                group["layouts"][i] = dict(layout, tp_dim=None)
                dropped += 1
    return dropped


def optimizer_factory(cfg):
    """What `ParallelRuntime.build` hands DeepSpeed: a callable building the client optimizer
    (AdamW from its parameters; our Muon from the module, for routing by name), or None when
    DeepSpeed builds its own Muon from the `optimizer` entry of `deepspeed_muon_extra`."""
    o = cfg.optim
    if o.name == "muon":
        if o.muon.implementation == "deepspeed":
            return None

        def make_muon(module):
            from ..optim.muon import build_muon_optimizer
            from .groups import current_layout

            lay = current_layout()
            opt = build_muon_optimizer(module, cfg, dp_group=lay.dp_group() if lay.dp > 1 else None,
                                       tp_group=lay.tp_group() if lay.tp > 1 else None)
            untag_replicated(module, opt)
            return opt

        make_muon.wants_module = True  # initialize_engine passes the module, not its parameters
        return make_muon

    def make(params):
        kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        if cfg.parallel.offload_optimizer and torch.cuda.is_available():
            try:  # the optimizer state lives on the CPU: DeepSpeed's vectorised CPU Adam steps it
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
            except Exception as exn:  # op not built / no compiler: torch's AdamW, slower, same maths
                log.warning("offload_optimizer: DeepSpeedCPUAdam unavailable (%s); using torch.optim.AdamW", exn)
        return torch.optim.AdamW(params, **kw)

    return make


class DistributedTrainer:
    def __init__(self, cfg, pcfg: ParallelConfig, run_dir: str | os.PathLike | None = None,
                 resume_full: str | None = None, save_full: bool = False, export_to: str | None = None):
        from ..iomm import build_iomm
        from ..train.trainer import build_loader, check_feature_shards, check_inputs, resolve_device

        # micro-batches per step: train.grad_accum or parallel.num_microbatches (one count; the
        # pipeline's 1F1B micro-batches when pp > 1), fixed before the layout is checked or shown
        self.micro_batches = cfg.micro_batches
        if pcfg.num_microbatches != self.micro_batches:
            pcfg = ParallelConfig(**{**pcfg.__dict__, "num_microbatches": self.micro_batches})
        self.cfg, self.pcfg = cfg, pcfg
        self.run_dir = Path(run_dir or cfg.run_dir or Path("runs") / cfg.name)
        self.save_full_at_end = save_full
        self.export_to = Path(export_to) if export_to else None  # export(): the resumed checkpoint, no training
        # Everything checkable is checked before the process group exists (world size from the
        # launcher's environment): a bad layout or input fails at once, not at a rendezvous.
        world = dist.get_world_size() if dist.is_initialized() else launch_world_size()
        if world is None:
            from ..config import ConfigError

            raise ConfigError("the parallel launchers run under a launcher: torchrun / deepspeed / srun "
                              "(e.g. torchrun --nproc_per_node 2 launchers/pretrain.py ...; iomm-train for one process)")
        with torch.device("meta"):
            from ..models.registry import build_generator

            meta_gen = build_generator(cfg.model.generator.family, cfg.model.generator.config)
        validate_layout(pcfg, world, model_info(meta_gen))
        del meta_gen
        muon_errors = muon_launch_errors(cfg, pcfg)
        if cfg.optim.name == "muon" and cfg.optim.muon.implementation == "deepspeed" and (resume_full or save_full
                                                                                          or export_to):
            muon_errors.append(("--save-full / --resume-full / --export", "layout-free checkpoints carry our Muon's momenta "
                                "(optim.muon.implementation: iomm), not DeepSpeed's Muon state; use the DeepSpeed "
                                "checkpoints (same layout)"))
        if muon_errors:
            from ..config import ConfigError, format_errors

            raise ConfigError(format_errors(cfg.source, muon_errors))
        # Stage 2 starts from train.init_from's weights unless this run resumes (then its own
        # checkpoint has them); checked here, loaded into the whole model before it is sharded.
        if resume_full is None:
            self._check_resume_layout(world)
        if export_to and (resume_full is not None or not self._will_resume()):
            from ..config import ConfigError

            raise ConfigError(f"--export {export_to}: exports a launcher checkpoint, and this launch resumes none "
                              + ("(--resume-full's is layout-free already)" if resume_full is not None else
                                 f"(train.resume={cfg.train.resume}; {self.ckpt_root} holds no `latest`): name one "
                                 "with train.resume=<run_dir>/checkpoints/step_N, or drop --export"))
        init_from = cfg.train.init_from if resume_full is None and not self._will_resume() else None
        check_inputs(cfg, init_from=bool(init_from))  # shards exist, init_from readable: before any model
        init_distributed()
        self.layout = init_parallel_state(pcfg)
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.is_logger = dist.get_rank() == 0
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            print(f"[iomm] {describe(pcfg, world)}", flush=True)
        torch.manual_seed(cfg.train.seed)
        model = build_iomm(cfg, "cpu")
        feature_spec = check_feature_shards(cfg, model)  # feature shards of other encoders: refused here
        if init_from:
            from ..train.checkpoint import apply_init_weights

            what = apply_init_weights(model, init_from, cfg.train.init_from_ema)
            if self.is_logger:
                print(f"[iomm] initialised weights from {what}", flush=True)
        ds_extra = precision_extra(cfg, pcfg)
        if cfg.optim.name == "muon" and cfg.optim.muon.implementation == "deepspeed":
            ds_extra.update(deepspeed_muon_extra(cfg))
        self.rt = ParallelRuntime.build(model, pcfg, optimizer_factory(cfg), micro_batch=cfg.data.batch_size,
                                        grad_clip=cfg.optim.grad_clip, seed=cfg.train.seed,
                                        ds_extra=ds_extra, resume_full=resume_full,
                                        ema_decay=cfg.optim.ema_decay,
                                        compile_backend=cfg.train.compile_backend if cfg.train.compile else None,
                                        compile_mllm=cfg.train.compile_mllm)
        self._log_ema()
        if self.is_logger:
            for note in self.rt.info.get("compile_notes", []):
                print(f"[iomm] {note}", flush=True)
        self.loader = build_loader(cfg, rank=self.layout.dp_rank, world_size=self.layout.dp, feature_spec=feature_spec)
        self.eval_set = None
        if cfg.eval.every and self.export_to is None:  # every rank reads the held-out set, keeps its share
            from ..train.evaluate import build_eval_set, describe_eval

            self.eval_set = build_eval_set(cfg, feature_spec)
            self.eval_set.keep_share(self.layout.dp, self.layout.dp_rank)
            if self.is_logger:
                print(f"[iomm] {describe_eval(cfg, self.eval_set, ema=self.rt.ema is not None and cfg.eval.ema)}",
                      flush=True)
        self.eval_history: list[tuple[int, float]] = []
        self.history: list[tuple[int, float]] = []  # (step, loss) logged by this launch, for loss_curve.png
        from ..train.nonfinite import NonFiniteGuard

        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite_steps)  # steps skipped for NaN / inf
        self._stop = False
        self._on_disk: str | None = None  # tag of this run's engine checkpoint equal to the live state
        if resume_full is None:
            self._maybe_resume()  # (--resume-full's weights were checked finite as they were read)
        # once the run has started: a failed launch leaves the run's own config, an export all of it
        if self.is_logger and self.export_to is None:
            from ..train.trainer import write_run_config

            write_run_config(self.run_dir, cfg)
            opt = self.rt.engine.optimizer
            routing = getattr(getattr(opt, "optimizer", opt), "routing_table", None)
            if routing:  # our Muon: the summary here, every name (TP-local shapes) in the file
                (self.run_dir / "optimizer_routing.txt").write_text(routing + "\n")
                print("\n".join(line for line in routing.splitlines() if line.startswith("[")), flush=True)

    def _log_ema(self) -> None:
        ema = self.rt.ema
        if ema is None:
            if self.is_logger:
                print("[iomm] EMA off (optim.ema_decay: null)", flush=True)
            return
        most = torch.tensor([float(ema.local_bytes())])
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        if self.is_logger:
            restored = self.rt.info.get("ema_restored")
            note = "" if restored is None else ("; restored from --resume-full" if restored else
                                                "; --resume-full checkpoint has none: started from its weights")
            print(f"[iomm] EMA on: {ema.describe()}; {float(most[0]) / 2**20:.1f} MiB on the fullest rank{note}",
                  flush=True)

    def export_ema(self, out_dir: str | os.PathLike | None = None) -> str | None:
        """Collective: the full EMA weights to <run_dir>/ema/ (or `out_dir`): ema.safetensors +
        a single-process state.pt (see parallel/ema.export_ema). Returns the dir on rank 0."""
        from .ema import export_ema

        return export_ema(self.rt, out_dir or self.run_dir / "ema", config=self.cfg.to_dict())

    # ---- checkpoints -----------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> str:
        """Checkpoint the current step (collective), unless this run's checkpoints already hold it
        (saved at this step, or resumed from it): DeepSpeed re-writes a tag's files in place, so
        saving the tag `latest` names again would open a window for a crash to spoil it."""
        tag = f"step_{self.rt.step:08d}"
        if self._on_disk == tag:
            return tag
        bad = self._nonfinite_weights()
        if bad:  # never over good checkpoints (keep_checkpoints would prune them)
            from ..train.nonfinite import weights_error

            latest = self.ckpt_root / "latest"  # DeepSpeed's, naming the newest tag
            raise weights_error(self.rt.step, bad, self.ckpt_root / latest.read_text().strip() if latest.is_file()
                                else None)
        if self.layout.tp_rank == 0 and self.layout.pp_rank == 0:
            # before the engine's save, which writes `latest` last: `latest` never names a tag
            # without the loader positions (or the EMA, which rt.save writes first too)
            from ..train.checkpoint import atomic_save

            atomic_save(self.loader.state_dict(), self.ckpt_root / tag / f"data_dp{self.layout.dp_rank}.pt")
        if self.is_logger:  # the layout DeepSpeed's files are cut for: checked first on resume
            (self.ckpt_root / tag).mkdir(parents=True, exist_ok=True)
            (self.ckpt_root / tag / LAYOUT_FILE).write_text(json.dumps(self._layout_record(dist.get_world_size())))
        dist.barrier()
        self.rt.save(str(self.ckpt_root), tag=tag, client_state={"nonfinite": self.nonfinite.state_dict()})
        self._on_disk = tag
        dist.barrier()
        if self.is_logger:
            print(f"[iomm] checkpoint {self.ckpt_root / tag}", flush=True)
            from ..train.checkpoint import prune_steps

            prune_steps(self.ckpt_root, self.cfg.train.keep_checkpoints, tag)
        return tag

    def _layout_record(self, world: int) -> dict:
        """The layout a DeepSpeed checkpoint is cut for (written beside it, compared on resume)."""
        p = self.pcfg
        return {"tp": p.tp, "pp": p.pp, "dp": world // (p.tp * p.pp), "zero_stage": p.zero_stage}

    def write_outputs(self) -> None:
        """Collective, at the end (after the checkpoint and the EMA export): loss_curve.png of this
        launch (rank 0), and samples.png as the single-process trainer writes it, sampled in
        place by every rank (write_step_samples: the EMA weights when kept, else the live ones;
        no second copy of the model beside the engine)."""
        from ..train.plots import save_loss_curve

        if self.is_logger and self.history:
            steps, losses = zip(*self.history)
            save_loss_curve(list(steps), list(losses), self.run_dir / "loss_curve.png", self.eval_history)
        if self.cfg.train.num_samples > 0:
            path = self.write_step_samples(self.run_dir / "samples.png")
            if self.is_logger:
                print(f"[iomm] sample grid: {path}", flush=True)

    def _will_resume(self) -> bool:
        return self._resume_target() is not None

    def _resume_target(self) -> tuple[Path, str] | None:
        """(checkpoint root, tag) this launch resumes from, or None."""
        mode = self.cfg.train.resume
        if mode == "never":
            return None
        if mode != "auto":  # an explicit checkpoint: a DeepSpeed tag directory <root>/step_N
            path = Path(mode)
            if not path.is_dir() or not any(path.glob("*model_states.pt")):
                from ..train.checkpoint import CheckpointError

                raise CheckpointError(f"train.resume={mode}: not a launcher checkpoint (a <run_dir>/checkpoints/"
                                      "step_N directory with DeepSpeed's *model_states.pt); auto resumes the run's "
                                      "newest, never starts over")
            return path.parent, path.name
        latest = self.ckpt_root / "latest"  # written by DeepSpeed
        if not latest.is_file():
            return None
        return self.ckpt_root, latest.read_text().strip()

    def _check_resume_layout(self, world: int) -> None:
        """DeepSpeed's files only load under the layout that wrote them: compare the saved layout
        record with this launch's before anything is built."""
        target = self._resume_target()
        record = target and target[0] / target[1] / LAYOUT_FILE
        if not record or not record.is_file():
            return
        saved, mine = json.loads(record.read_text()), self._layout_record(world)

        def same(a, b):  # ZeRO-1 and -2 share one optimizer-state format (DeepSpeed's stage_1_and_2)
            return all(a[k] == b[k] for k in ("tp", "pp", "dp")) and \
                {a["zero_stage"], b["zero_stage"]} in ({0}, {1}, {2}, {3}, {1, 2})

        if not same(saved, mine):
            from ..train.checkpoint import CheckpointError

            def show(d):
                return f"tp {d['tp']} x pp {d['pp']} x dp {d['dp']}, ZeRO-{d['zero_stage']}"

            raise CheckpointError(f"resuming from {target[0] / target[1]}: saved under {show(saved)}, this launch is "
                                  f"{show(mine)}; a DeepSpeed checkpoint resumes under the layout that wrote it: "
                                  "relaunch with that layout, or write a layout-free copy with --save-full (under "
                                  "that layout) and start the new one with --resume-full <run_dir>/full")

    def _maybe_resume(self) -> None:
        target = self._resume_target()
        if target is None:
            return
        root, tag = target
        client = self.rt.load(str(root), tag=tag)
        self._check_finite(f"resuming from {root / tag}")
        self.nonfinite.load_state_dict(client.get("nonfinite"))
        if root.resolve() == self.ckpt_root.resolve() and tag == f"step_{self.rt.step:08d}":
            self._on_disk = tag
        data = root / tag / f"data_dp{self.layout.dp_rank}.pt"
        if data.is_file():
            from ..train.checkpoint import load_data_position

            load_data_position(self.loader, torch.load(data, weights_only=False), self.cfg.train.resume_data_exact,
                               f"resuming from {root / tag}")
        if self.is_logger:
            ema = self.rt.info.get("ema_restored")
            note = "" if ema is None else ("; EMA restored" if ema else "; checkpoint has no EMA: it restarts from "
                                           "the loaded weights")
            print(f"[iomm] resumed from {root / tag} at step {self.rt.step}{note}", flush=True)

    def _nonfinite_weights(self) -> list[str]:
        """Collective: names of the trainable parameters holding NaN / inf on any rank (each rank
        checks what it holds: its TP shard, its ZeRO-3 partition)."""
        from ..train.nonfinite import nonfinite_names

        local = nonfinite_names((n, getattr(p, "ds_tensor", p)) for n, p in self.rt.module.named_parameters()
                                if p.requires_grad)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        return sorted({n for rank_names in gathered for n in rank_names})

    def _check_finite(self, source: str) -> None:
        """Collective, after a load: refuse NaN / inf in the loaded weights."""
        from ..train.checkpoint import refuse_nonfinite

        refuse_nonfinite(source, self._nonfinite_weights())

    # ---- loop ----------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop = True

    def _agree_stop(self) -> bool:
        """Every rank stops when any got SIGTERM / SIGINT (the signal may reach one child only)."""
        flag = torch.tensor([1.0 if self._stop else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop = bool(flag[0])
        return self._stop

    def evaluate(self) -> dict:
        """Collective: the held-out metrics of the current weights and (eval.ema) of the EMA
        (train/evaluate.py), the same on every rank; micro-batches dealt out over the
        data-parallel replicas."""
        from ..train.evaluate import evaluate, rng_devices
        from ..train.trainer import to_device

        group = self.layout.dp_group()

        def run(prefix):
            with torch.random.fork_rng(devices=rng_devices(self.device)):
                torch.manual_seed(self.cfg.eval.seed)  # only a posterior-sampling VAE draws from it
                return evaluate(self.eval_set, lambda b, d: self.rt.sample_losses(to_device(b, self.device), d),
                                dp=self.layout.dp, dp_rank=self.layout.dp_rank,
                                all_reduce=lambda t: dist.all_reduce(t, group=group), prefix=prefix)

        out = run("eval/")
        if self.rt.ema is not None and self.cfg.eval.ema:  # the EMA swapped into the engine's weights
            backup = self.rt.ema.swap_in()
            try:
                out.update(run("eval_ema/"))
            finally:
                self.rt.ema.restore(backup)
        return out

    def write_step_samples(self, path: Path | None = None) -> Path:
        """Collective: <run_dir>/samples/step_N.png (or `path`) as iomm-train writes it (the EMA
        weights when kept, else the live ones). Sampled in place (through the engine: TP
        collectives, ZeRO-3 gathers; pipelines stage by stage), no second copy of the model; each
        data-parallel replica samples its share of the references and the shares are gathered
        (runtime.sample_grid), the same grid as one process's. Rank 0 writes it."""
        from ..train.evaluate import rng_devices
        from ..train.plots import save_grid

        path = path or self.run_dir / "samples" / f"step_{self.rt.step}.png"
        backup = self.rt.ema.swap_in() if self.rt.ema is not None else None
        try:
            with torch.random.fork_rng(devices=rng_devices(self.device)):  # the conditioner draws a (null) mask
                refs, images = self.rt.sample_grid(self.cfg, self.device)
        finally:
            if backup is not None:
                self.rt.ema.restore(backup)
        if self.is_logger:
            path.parent.mkdir(exist_ok=True)
            save_grid([refs.cpu(), images.cpu()], path)
        return path

    def export(self) -> None:
        """Collective, instead of fit(): the resumed checkpoint as single-device files, nothing
        trained: <export_to>/full (layout-free: weights, optimizer moments, EMA; --resume-full
        under any layout) and, with an EMA, <export_to>/ema (iomm-sample / iomm-eval /
        train.init_from / the diffusers exports read both). The run directory is left alone."""
        out = self.export_to
        self.rt.save_full(str(out / "full"))
        ema = self.export_ema(out / "ema") if self.rt.ema is not None else None
        if self.is_logger:
            print(f"[iomm] exported step {self.rt.step}: layout-free {out / 'full'}"
                  + (f", EMA {ema}" if ema else " (no EMA: optim.ema_decay is null)"), flush=True)

    def _batch_keys(self, batch: dict) -> list:
        """Collective: the sample keys of this step's batch over all data-parallel replicas (for the
        warning about a skipped step; every rank skips alike, so every rank calls it)."""
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.layout.dp_rank, list(batch.get("keys", []))))
        replicas = dict(gathered[::-1])  # one entry per DP rank (its TP / PP peers read the same samples)
        return [k for r in sorted(replicas) for k in replicas[r]]

    def next_batch(self) -> dict:
        from ..train.trainer import to_device

        return to_device(_merge([next(self.loader) for _ in range(self.micro_batches)]), self.device)

    def fit(self) -> dict:
        from ..optim.builder import lr_factor
        from ..profiling.mfu import ThroughputLog
        from ..train.evaluate import due, format_eval
        from ..train.trainer import flatten, init_wandb

        cfg = self.cfg
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        metrics = open(self.run_dir / "metrics.jsonl", "a") if self.is_logger else None
        wandb_run = init_wandb(cfg, self.run_dir) if self.is_logger else None
        last: dict = {}
        t0 = time.perf_counter()
        world = dist.get_world_size()
        # samples per optimizer step over all replicas; FLOPs per sample computed once
        global_batch = cfg.data.batch_size * self.micro_batches * self.layout.dp
        throughput = ThroughputLog(cfg, self.device, world) if self.is_logger else None
        logged_step = self.rt.step
        window: list[float] = []  # losses since the last metrics line (iomm-train logs their mean)
        try:
            while self.rt.step < cfg.train.steps:
                if self._agree_stop():
                    break
                lr = cfg.optim.lr * lr_factor(self.rt.step, cfg)
                self.rt.set_lr(lr)
                batch = self.next_batch()
                out = self.rt.train_step(batch)
                keys = self._batch_keys(batch) if not out["applied"] else ()  # the runtime checked all agree
                warning = self.nonfinite.record(out["step"], out["applied"], out["loss"], out["grad_norm"], keys)
                if warning:
                    if self.is_logger:
                        print(f"[iomm] {warning}", flush=True)
                else:
                    window.append(out["loss"])
                log_now = (self.rt.step % cfg.train.log_every == 0 or self.rt.step == cfg.train.steps
                           or self.nonfinite.exceeded)
                data_stats = self._data_stats() if log_now else {}  # collective: every rank, same steps
                if self.is_logger and log_now:
                    dt = time.perf_counter() - t0
                    samples_per_s = (self.rt.step - logged_step) * global_batch / dt  # all ranks together
                    logged_step = self.rt.step
                    # per device: the run's rate split over its `world` devices (TP / PP ranks share samples)
                    last = {**out, "loss": sum(window) / len(window) if window else None, "loss_steps": len(window),
                            "loss_last": out["loss"] if out["applied"] else None,
                            "nonfinite_steps": self.nonfinite.total, "lr": lr, "time": time.time(), "seconds": dt,
                            "samples_per_s": samples_per_s, **throughput(samples_per_s / world),
                            **flatten(data_stats, "data/")}
                    window = []
                    metrics.write(json.dumps(last) + "\n")
                    metrics.flush()
                    if wandb_run is not None:
                        wandb_run.log(last, step=self.rt.step)
                    if last["loss"] is not None:  # None: every step since the last line was skipped
                        self.history.append((out["step"], last["loss"]))
                        print(f"[iomm] step {out['step']} loss {last['loss']:.5f} grad_norm {out['grad_norm']:.4f}",
                              flush=True)
                    t0 = time.perf_counter()
                if self.nonfinite.exceeded:  # no update since the streak began: keep those weights, stop
                    raise self.nonfinite.error(self.ckpt_root / self.save())
                if self.eval_set is not None and due(self.rt.step, cfg.eval.every, cfg.train.steps):
                    found = {"step": self.rt.step, **self.evaluate(), "time": time.time()}  # every rank
                    if self.is_logger:
                        metrics.write(json.dumps(found) + "\n")
                        metrics.flush()
                        if wandb_run is not None:
                            wandb_run.log(found, step=self.rt.step)
                        self.eval_history.append((self.rt.step, found["eval/loss"]))
                        print(f"[iomm] {format_eval(found)}", flush=True)
                if cfg.eval.sample_every and self.rt.step % cfg.eval.sample_every == 0:  # every rank
                    path = self.write_step_samples()
                    if self.is_logger:
                        print(f"[iomm] step {self.rt.step}: samples {path}", flush=True)
                if cfg.train.ckpt_every and self.rt.step % cfg.train.ckpt_every == 0:
                    self.save()
            tag = self.save()
            if self.save_full_at_end:
                self.rt.save_full(str(self.run_dir / "full"))
            if self.rt.ema is not None and self.rt.step >= cfg.train.steps:  # same on every rank (collective)
                exported = self.export_ema()
                if self.is_logger:
                    print(f"[iomm] EMA weights exported to {exported}", flush=True)
            if self.rt.step >= cfg.train.steps:
                self.write_outputs()  # every rank: the grid is sampled in place
            if self.is_logger:
                print(f"[iomm] {'stopped by signal' if self._stop else 'done'} at step {self.rt.step}; "
                      f"checkpoint {self.ckpt_root / tag}", flush=True)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if metrics:
                metrics.close()
        if wandb_run is not None:
            wandb_run.finish()
        return last

    def _data_stats(self) -> dict:
        """The data counters of the whole run (bad samples per reason, shard errors, ...): every
        rank's loader stats gathered, one per data-parallel replica (its TP / PP peers read the
        same samples) and summed. A collective: every rank calls it at the same steps."""
        from ..data.errors import merge_rank_stats

        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.layout.dp_rank, self.loader.stats()))
        replicas: dict[int, dict] = {}
        for dp_rank, stats in gathered:
            replicas.setdefault(dp_rank, stats)
        return merge_rank_stats([replicas[r] for r in sorted(replicas)])


def split_parallel_args(config_path: str | None, overrides: list[str]):
    """(run config, its ParallelConfig); `parallel.*` keys are validated with the rest."""
    from ..config import load_config

    from ..config import ConfigError, format_errors

    # the launch's world size joins the layout checks (every problem in one message)
    cfg = load_config(config_path, overrides, world_size=launch_world_size())
    errors = muon_launch_errors(cfg, cfg.parallel) + lora_launch_errors(cfg, cfg.parallel)
    if errors:
        raise ConfigError(format_errors(cfg.source, errors))
    # one micro-batch count for the launchers: train.grad_accum feeds parallel.num_microbatches
    return cfg, dataclasses.replace(cfg.parallel, num_microbatches=cfg.micro_batches)