"""Steps whose loss or gradient norm is not finite: skipped, counted, and a stop past a streak.

One NaN / inf gradient (a NaN loss gives one everywhere) would let the optimizer write NaN into
the weights, its moments and the EMA, and every later checkpoint would carry them. Such a step
applies nothing: weights, optimizer state and EMA stay as they were; the step counter and the
data move on (its batch is consumed, the learning-rate schedule follows the step counter). The
step is logged with its samples' keys, and counted (`nonfinite_steps` in metrics.jsonl, kept in
checkpoints). `train.max_nonfinite_steps` such steps in a row are tolerated; one more stops the
run with `NonFiniteError` after a checkpoint of the (untouched) weights, naming the steps.
No checkpoint is ever written with non-finite weights (an applied update can still overflow
them): the save is refused with `weights_error` and the newest good checkpoint stays.

Who skips: iomm-train checks the loss and the global gradient norm itself (train/trainer.py).
Under the launchers the gradient norm decides: a micro-batch loss that is not finite is first
turned into NaN gradients (`poison_nonfinite`: a NaN or inf loss whose gradients would still be
finite, e.g. from a term without gradient, would otherwise be applied), and DeepSpeed's
optimizers skip a step whose global gradient norm is not finite
(ZeRO-1/2 in fp32, bf16 with `check_grad_overflow`, ZeRO-3 in any precision); at ZeRO-0 our
wrapper of the optimizer's step does (parallel/runtime.py). The norm is global over DP, TP and
PP, so every rank decides alike (the parity tests would see a split as diverging weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class NonFiniteError(RuntimeError):
    """More than train.max_nonfinite_steps steps in a row had a non-finite loss or gradient norm."""


def is_finite(*values: float) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """`loss` itself when finite (times 1.0: values and gradients bit for bit), else loss x NaN,
    whose gradients are NaN everywhere, so that the step is skipped by the same global
    gradient-norm check as any other non-finite step, on every rank (DP all-reduces the NaN).
    No host sync: the decision stays on the device."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)


def nonfinite_names(named) -> list[str]:
    """Names of the (name, tensor) pairs holding any NaN / inf."""
    return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def some_names(names: list[str]) -> str:
    return f"{len(names)} tensor{'s' if len(names) > 1 else ''}, e.g. {', '.join(names[:3])}"


def weights_error(step: int, bad: list[str], newest) -> NonFiniteError:
    """Why a checkpoint was not written: it would have stored non-finite weights over good ones."""
    return NonFiniteError(
        f"step {step}: the weights are not finite ({some_names(bad)}), so no checkpoint was written (the newest, "
        f"{newest or 'none'}, is kept): an update overflowed them. Lower optim.lr (or raise optim.warmup_steps) and "
        f"resume from {newest or 'the start'}.")


@dataclass
class NonFiniteGuard:
    limit: int  # train.max_nonfinite_steps: skipped steps tolerated in a row
    total: int = 0  # skipped steps in the whole run (resumes included)
    streak: list[int] = field(default_factory=list)  # the steps of the current run of skipped steps

    def record(self, step: int, applied: bool, loss: float, grad_norm: float, keys=()) -> str | None:
        """Note one finished step; the warning line for a skipped one (None when applied)."""
        if applied:
            self.streak = []
            return None
        self.total += 1
        self.streak.append(step)
        keys = list(keys)
        shown = ", ".join(map(str, keys[:8])) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        return (f"step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: not finite, the update was skipped "
                f"({len(self.streak)} in a row, {self.total} in this run; train.max_nonfinite_steps: {self.limit}); "
                f"its samples: {shown or '-'}")

    @property
    def exceeded(self) -> bool:
        return len(self.streak) > self.limit

    def error(self, checkpoint) -> NonFiniteError:
        """The stop, after `checkpoint` saved the untouched weights (a save of weights that are
        not finite themselves raises `weights_error` instead)."""
        first, last, n = self.streak[0], self.streak[-1], len(self.streak)
        what = f"step {first}: a non-finite" if n == 1 else f"steps {first}-{last}: {n} steps in a row with a non-finite"
        return NonFiniteError(
            f"{what} loss or gradient norm (train.max_nonfinite_steps: {self.limit}); stopped. No update was applied "
            f"since step {first - 1}: checkpoint {checkpoint} holds those weights, past the data of these steps. Usual "
            f"causes: a learning rate too high for the batch (optim.lr, optim.warmup_steps), bf16 overflow, or bad "
            f"samples (the warnings above name each step's). Resume from it after changing that.")

    def state_dict(self) -> dict:
        return {"total": self.total, "streak": list(self.streak)}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}  # checkpoints written before the guard existed
        self.total = int(state.get("total", 0))
        self.streak = [int(s) for s in state.get("streak", [])]
