"""Data: webdataset streams (raw images or precomputed feature shards), the image-only /
paired mixture, preprocessing, bad-data counting and exact resume. See docs/DATA.md."""

from .config import WebDatasetConfig
from .errors import REASONS, BadSample, DataError, DataErrorBudgetExceeded, NoDataError
from .features import decode_features, precompute_feature_shards, write_feature_shards
from .preprocess import bucket_sizes, decode_image, decode_image_chw, resize_center_crop, to_rgb, unit_pixels
from .shards import expand_shards
from .stream import WebDatasetLoader, build_webdataset_loader
from .writer import ShardSummary, make_shards, scan_folder, scan_manifest

__all__ = [
    "WebDatasetConfig", "WebDatasetLoader", "build_webdataset_loader",
    "DataError", "DataErrorBudgetExceeded", "NoDataError", "BadSample", "REASONS",
    "decode_image", "decode_image_chw", "resize_center_crop", "to_rgb", "unit_pixels", "bucket_sizes", "expand_shards",
    "write_feature_shards", "decode_features", "precompute_feature_shards",
    "make_shards", "scan_folder", "scan_manifest", "ShardSummary",
]
