import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

# Smaller than configs/tiny.yaml, for speed; every test starts from this.
FAST = ["data.batch_size=4", "train.progress_bar=false", "train.num_samples=0", "train.resume=never",
        "data.builtin.crops_per_photo=1", "train.log_every=1"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # deterministic and fair on 2 shared cores
    yield


@pytest.fixture
def tiny_cfg():
    from iomm_scale.config import load_config

    def make(*overrides):
        return load_config(TINY, FAST + list(overrides))

    return make
