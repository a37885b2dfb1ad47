"""Model FLOPs utilisation: achieved model FLOP/s per device over the device's dense bf16 peak.

    mfu = flops_per_sample x samples_per_s_per_device / peak_flops

`flops_per_sample` is profiling/flops.py's analytic count (model FLOPs: no recompute of
checkpointed activations, attention backward 2x its forward). The peak is the dense
(no 2:4 sparsity) bf16 tensor-core figure of the data sheet, matched on
torch.cuda.get_device_name(); `train.peak_tflops` (or `peak_tflops=`) overrides it, and an
unknown device gets no MFU rather than a guess.
"""

from __future__ import annotations

import warnings

import torch

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "H800 SXM": 989.0,
    "A100": 312.0,
}

# (substrings that must all occur in the device name, table key); first match wins.
_MATCH = (
    (("H100", "PCIE"), "H100 PCIe"),
    (("H100", "NVL"), None),  # H100 NVL: not in the table (a different clock / power envelope)
    (("H100",), "H100 SXM"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (("H200",), "H200"),  # includes GH200 (an H100/H200-class die; same 989 TFLOP/s dense bf16)
    (("H800", "PCIE"), None),
    (("H800",), "H800 SXM"),
    (("A100",), "A100"),
)


def lookup_peak(device_name: str) -> float | None:
    """Dense bf16 peak (TFLOP/s) for a CUDA device name, or None when unknown."""
    name = device_name.upper()
    for needles, key in _MATCH:
        if all(n in name for n in needles):
            return PEAK_BF16_TFLOPS[key] if key else None
    return None


def peak_tflops_for(device: torch.device | str | None = None, override: float | None = None) -> float | None:
    """The peak to divide by: `override` if given, else the table entry of this CUDA device
    (None on CPU or for devices not in the table)."""
    if override:
        return float(override)
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    return lookup_peak(torch.cuda.get_device_name(device))


def mfu(achieved_tflops_per_device: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops:
        return None
    return achieved_tflops_per_device / peak_tflops


class ThroughputLog:
    """What the trainer adds to each metrics line: image tokens/s, model TFLOP/s per device
    and (on CUDA with a known or configured peak) MFU. FLOPs per sample are computed once at
    start from the run config; if that fails (e.g. an MLLM the offline table cannot
    describe), the FLOPs fields are left out with a warning and training goes on."""

    def __init__(self, cfg, device: torch.device, world_size: int = 1):
        from .flops import image_tokens, training_flops

        self.world_size = world_size
        self.tokens_per_sample = image_tokens(cfg)
        try:
            self.flops_per_sample = training_flops(cfg)["total"]
        except Exception as e:  # noqa: BLE001 - throughput logging must never stop a run
            warnings.warn(f"FLOPs per sample unavailable ({type(e).__name__}: {e}); tflops/mfu not logged", stacklevel=2)
            self.flops_per_sample = None
        override = getattr(cfg.train, "peak_tflops", None)
        self.peak = peak_tflops_for(device, override) if device.type == "cuda" else None

    def __call__(self, samples_per_s: float) -> dict:
        """samples_per_s: samples per second of this process (one device)."""
        out = {"image_tokens_per_s": samples_per_s * self.tokens_per_sample}
        if self.flops_per_sample is not None:
            tflops = samples_per_s * self.flops_per_sample / 1e12
            out["tflops_per_device"] = tflops
            if self.peak:
                out["mfu"] = tflops / self.peak
        return out
