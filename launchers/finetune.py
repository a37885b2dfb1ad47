"""Mixed fine-tuning (IOMM stage 2: image-only + text-image pairs) under DeepSpeed /
torchrun / srun. The pre-training weights come from `train.init_from` (fresh optimizer, step
0): a launcher run's EMA export `<run_dir>/ema`, its layout-free copy `<run_dir>/full`
(--save-full), or an iomm-train checkpoint `.../checkpoints/step_N`; they are loaded whole and
then cut for this run's layout. (`train.resume` / --resume-full continue a run instead: its
optimizer and step too.) See _common.py."""

from _common import main

if __name__ == "__main__":
    main("IOMM mixed fine-tuning (multi-process: TP / PP / ZeRO)")
