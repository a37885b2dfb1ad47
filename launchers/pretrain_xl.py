"""IOMM-XL pre-training (Z-Image S3-DiT generator) under DeepSpeed / torchrun / srun.

The paper trains XL with Muon: configs/xl.yaml runs our DistributedMuon at ZeRO-0 with
tp 2 (docs/PARALLEL.md, "Muon under the launchers"); layouts Muon cannot run under are
refused with a message naming the key. Default config: configs/xl.yaml.
"""

import os

from _common import main

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default = os.path.join(root, "configs", "xl.yaml")
    main("IOMM-XL pre-training (multi-process: TP / PP / ZeRO)", default if os.path.isfile(default) else None)
