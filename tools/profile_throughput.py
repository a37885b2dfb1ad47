#!/usr/bin/env python3
"""Throughput / MFU / peak-memory sweep (the `iomm-profile` console script).

    python tools/profile_throughput.py --config configs/tiny.yaml --micro-batch 4,8 \\
        --checkpointing none,full --attention sdpa,math --compile off --csv profile.csv

See iomm_scale/profiling/profile.py and docs/PROFILING.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iomm_scale.profiling.profile import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
