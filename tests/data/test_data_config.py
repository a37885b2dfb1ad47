"""WebDatasetConfig.validate: impossible values are named by field."""

import dataclasses

from iomm_scale.data import WebDatasetConfig, expand_shards


def fields_of(errors):
    return sorted({f for f, _ in errors})


def test_defaults_with_shards_are_valid():
    assert WebDatasetConfig(image_shards=["a-{000..009}.tar"]).validate() == []
    cfg = WebDatasetConfig(paired_shards=["p.tar"], buckets=["1:1", "4:3", "9:16"])
    assert cfg.validate() == []
    assert all(isinstance(f.default, (str, int, float, bool, type(None))) or f.default_factory is list
               for f in dataclasses.fields(cfg))  # plain types: the run-config loader fills them from YAML


def test_impossible_values_are_reported_per_field():
    cfg = WebDatasetConfig(image_only_fraction=1.2, shuffle_buffer=0, epochs=0, num_workers=-1, prefetch_factor=0,
                           buckets=["4:0", "wide"], bucket_multiple=0, min_size_fraction=-0.1, min_image_size=-1,
                           max_image_pixels=0, error_budget=2.0, min_samples_before_budget=-5)
    errors = cfg.validate()
    assert fields_of(errors) == sorted([
        "image_shards", "image_only_fraction", "shuffle_buffer", "epochs", "num_workers", "prefetch_factor",
        "buckets", "bucket_multiple", "min_size_fraction", "min_image_size", "max_image_pixels", "error_budget",
        "min_samples_before_budget"])
    assert ("image_shards", "no shards: set image_shards and/or paired_shards") in errors
    assert sum(f == "buckets" for f, _ in errors) == 2


def test_missing_local_shards_are_listed(tmp_path):
    (tmp_path / "a-000001.tar").write_bytes(b"")
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / "a-{000000..000002}.tar")],
                           paired_shards=["pipe:curl -s https://example.com/p-{0..3}.tar"])
    (field, message), = cfg.missing_shards()  # URLs are not checked
    assert field == "image_shards" and message.startswith("2 of 3 shards do not exist")
    assert len(expand_shards(cfg.paired_shards)) == 4
