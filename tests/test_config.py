"""Config loading: typed schema, dotted overrides, one-line errors naming key and origin."""


import pytest

from trainer.run_config import load_config
from base.errors import UserError

from conftest import REPO


def test_base_yaml_equals_schema_defaults():
    assert load_config(REPO / "configs" / "base.yaml") == load_config(None)


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["data.shard.seed=7", "data.shard.max_side=256", "data.shard.splits={test: 1.0}"])
    assert cfg.data.shard.seed == 7 and cfg.data.shard.max_side == 256
    assert cfg.data.shard.splits == {"test": 1.0}


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("data:\n  shard:\n    max_sample_per_shard: 10\n")
    with pytest.raises(UserError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg and "data.shard.max_sample_per_shard" in msg and "max_samples_per_shard" in msg


def test_bad_value_from_command_line_names_override():
    with pytest.raises(UserError) as e:
        load_config(None, ["data.shard.min_shards_per_split=0"])
    assert "command-line override 'data.shard.min_shards_per_split=0'" in str(e.value)
    assert "greater than or equal to 1" in str(e.value)


def test_splits_must_sum_to_one():
    with pytest.raises(UserError, match="add up to 1"):
        load_config(None, ["data.shard.splits={train: 0.5, val: 0.1}"])


def test_invalid_yaml_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  shard: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(f)


def test_malformed_override():
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(None, ["data.shard.seed"])
