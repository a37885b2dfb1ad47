"""Image-only pre-training (IOMM stage 1) under DeepSpeed / torchrun / srun. See _common.py."""

from _common import main

if __name__ == "__main__":
    main("IOMM image-only pre-training (multi-process: TP / PP / ZeRO)")
