"""Bad data: reasons, per-reason counters, rate-limited warnings, the error budget.

A bad sample is skipped and counted under one reason; an unreadable or truncated shard
counts once as `shard_error` (the samples it still held are unknown). Nothing is fatal
until (bad samples + shard errors) / (samples seen + shard errors) exceeds the budget,
checked once at least `min_samples_before_budget` items were seen.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

log = logging.getLogger("iomm_scale.data")

# Every reason a sample or shard can be rejected for (docs/DATA.md explains each).
REASONS = (
    "missing_image",  # the sample has no image member (or no feature members)
    "empty_payload",  # the image member has zero bytes
    "not_an_image",  # the payload is not a known image format
    "corrupt_header",  # looks like a known format (magic bytes) but the header does not parse
    "truncated_image",  # the image data ends early
    "decode_error",  # any other decoder failure
    "too_small",  # shorter side below min_image_size or min_size_fraction x resolution
    "too_large",  # more pixels than max_image_pixels
    "missing_caption",  # paired sample without .txt / .json caption
    "empty_caption",  # paired sample whose caption is blank
    "bad_features",  # feature sample that does not load (shape, dtype, format)
    "feature_mismatch",  # feature sample made for another resolution, by other encoders or in other shapes
    "shard_error",  # shard could not be opened or read to its end (counted per shard)
)


class DataError(RuntimeError):
    """Base class of the data pipeline's fatal errors (one string argument, so DataLoader
    workers can re-raise them in the main process with the same type)."""


class DataErrorBudgetExceeded(DataError):
    pass


class NoDataError(DataError):
    pass


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class BadDataCounter:
    """Counters of one worker; `snapshot()` is what travels with each batch and into the
    loader's state_dict."""

    def __init__(self, warn_first: int = 5, warn_interval_s: float = 60.0, snapshot: Optional[dict] = None):
        snapshot = snapshot or {}
        self.ok = int(snapshot.get("ok", 0))
        self.reasons: dict[str, int] = dict(snapshot.get("reasons", {}))
        self.by_shard: dict[str, int] = dict(snapshot.get("bad_by_shard", {}))
        self.warn_first, self.warn_interval_s = warn_first, warn_interval_s
        self._last_warn: dict[str, float] = {}
        self._unreported: dict[str, int] = {}

    @property
    def shard_errors(self) -> int:
        return self.reasons.get("shard_error", 0)

    @property
    def bad(self) -> int:
        return sum(self.reasons.values()) - self.shard_errors

    def good(self) -> None:
        self.ok += 1

    def bad_sample(self, reason: str, url: str, key: str, detail: str = "") -> None:
        self._count(reason, url, f"skipping sample {key!r} of {url}: {reason}" + (f" ({detail})" if detail else ""))

    def shard_error(self, url: str, exn: Exception) -> None:
        self._count("shard_error", url, f"shard {url} unreadable or truncated, going on with the next: "
                                        f"{type(exn).__name__}: {exn}")

    def _count(self, reason: str, url: str, message: str) -> None:
        n = self.reasons.get(reason, 0) + 1
        self.reasons[reason] = n
        self.by_shard[url] = self.by_shard.get(url, 0) + 1
        # The first few of each reason in full, then one summary per interval: a bad shard
        # of 10k samples must not flood the log.
        if n <= self.warn_first:
            log.warning("%s", message)
            return
        self._unreported[reason] = self._unreported.get(reason, 0) + 1
        now = time.monotonic()
        last = self._last_warn.get(reason)
        if last is None or now - last >= self.warn_interval_s:
            log.warning("%d more bad samples with reason %s (%d in total in this worker); last: %s",
                        self._unreported[reason], reason, n, message)
            self._last_warn[reason], self._unreported[reason] = now, 0

    def snapshot(self) -> dict:
        return {"ok": self.ok, "reasons": dict(self.reasons), "bad_by_shard": dict(self.by_shard)}


def merge_stats(snapshots: list[dict]) -> dict:
    """Sum worker snapshots into the loader's stats: totals, per-reason counts (every
    reason present, zeros included, so metrics have stable keys), worst shards."""
    ok, reasons, by_shard = 0, {r: 0 for r in REASONS}, {}
    for snap in snapshots:
        ok += snap.get("ok", 0)
        for r, n in snap.get("reasons", {}).items():
            reasons[r] = reasons.get(r, 0) + n
        for u, n in snap.get("bad_by_shard", {}).items():
            by_shard[u] = by_shard.get(u, 0) + n
    shard_errors = reasons["shard_error"]
    bad = sum(reasons.values()) - shard_errors
    seen = ok + bad
    worst = sorted(by_shard.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return {"seen": seen, "ok": ok, "bad": bad, "shard_errors": shard_errors,
            "bad_fraction": (bad + shard_errors) / max(1, seen + shard_errors),
            "reasons": reasons, "worst_shards": [[u, n] for u, n in worst]}


def merge_rank_stats(per_rank: list[dict]) -> dict:
    """Loader stats of several ranks (`WebDatasetLoader.stats()`, one per data-parallel replica)
    -> the run's: totals and reasons summed, bad_fraction recomputed, the worst shards of the
    ranks' lists re-ranked (a shard read by several ranks sums their counts), the oldest epoch
    of each stream. Empty stats (the built-in source) stay empty."""
    per_rank = [s for s in per_rank if s]
    if not per_rank:
        return {}
    out = {k: sum(s.get(k, 0) for s in per_rank) for k in ("seen", "ok", "bad", "shard_errors", "batches")}
    out["bad_fraction"] = (out["bad"] + out["shard_errors"]) / max(1, out["seen"] + out["shard_errors"])
    out["reasons"] = {r: sum(s.get("reasons", {}).get(r, 0) for s in per_rank) for r in REASONS}
    by_shard: dict[str, int] = {}
    for s in per_rank:
        for u, n in s.get("worst_shards", []):
            by_shard[u] = by_shard.get(u, 0) + n
    out["worst_shards"] = [[u, n] for u, n in sorted(by_shard.items(), key=lambda kv: (-kv[1], kv[0]))[:5]]
    streams = set().union(*(s.get("epochs", {}) for s in per_rank))
    out["epochs"] = {k: min(s["epochs"][k] for s in per_rank if k in s.get("epochs", {})) for k in sorted(streams)}
    return out


def check_budget(stats: dict, budget: float, min_samples: int, where: str) -> None:
    """Raise DataErrorBudgetExceeded when merged `stats` are over the budget."""
    items = stats["seen"] + stats["shard_errors"]
    if items < max(1, min_samples) or stats["bad_fraction"] <= budget:
        return
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(stats["reasons"].items(), key=lambda kv: -kv[1]) if n)
    worst = ", ".join(f"{u} ({n} bad)" for u, n in stats["worst_shards"])
    if stats["reasons"].get("feature_mismatch"):  # feature shards of another model / resolution
        fix = ("feature_mismatch: these feature shards were written for another resolution or model (VAE, vision "
               "tower, latent or vision-token shapes): train with the data.resolution and model they were made with, "
               "or re-run tools/precompute_features.py with this config")
    else:
        fix = "Fix or remove those shards (tools/make_shards.py re-checks images), or raise data.webdataset.error_budget"
    raise DataErrorBudgetExceeded(
        f"data error budget exceeded {where}: {stats['bad']} bad samples and {stats['shard_errors']} bad shards "
        f"out of {stats['seen']} samples read ({stats['bad_fraction']:.1%} > error_budget {budget:.1%}). "
        f"Reasons: {reasons}. Worst shards: {worst}. {fix}.")
