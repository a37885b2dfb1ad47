"""Mixed fine-tuning (IOMM stage 2: image-only + text-image pairs) under DeepSpeed /
torchrun / srun. Start from a pre-training run with train.resume=<checkpoint dir> or from
a layout-free checkpoint with --resume-full DIR. See _common.py."""

from _common import main

if __name__ == "__main__":
    main("IOMM mixed fine-tuning (multi-process: TP / PP / ZeRO)")
