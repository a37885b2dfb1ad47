#!/usr/bin/env python3
"""Per-device memory plan of a training run: parameters, gradients, optimizer states,
activations (by checkpointing mode), ZeRO partitioning, frozen MLLM / VAE, LoRA.

    python tools/plan_memory.py --config configs/b.yaml --gpus 8 --gpu-mem 80 \\
        --zero 0,2 --checkpointing none,full --micro-batch 16,32 --max-micro-batch
    python tools/plan_memory.py --config configs/xl.yaml --gpus 64 --zero 3 --global-batch 4096 \\
        --micro-batch 8,16,32,64 --checkpointing full
    python tools/plan_memory.py --config configs/qwen_image_lora.yaml data.resolution=1024 --gpus 8 \\
        --zero 3 --lora-rank 64 --checkpointing full --micro-batch 1,2,4,6

See iomm_scale/profiling/memory.py (what is counted and how) and docs/PROFILING.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iomm_scale.profiling.memory import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
