import pytest

from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError


def test_unknown_key_suggests_close_match():
    with pytest.raises(UserError, match="Unknown key 'epoch'.*Did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})


@pytest.mark.parametrize("key,value,message", [
    ("lr", -1.0, "lr must be > 0"),
    ("epochs", 0, "epochs must be >= 1"),
    ("label_smoothing", 1.0, "label_smoothing must be >= 0 and < 1"),
    ("strategy", "fine-tune", "Did you mean 'finetune'"),
    ("shots", 0, "shots must be >= 1"),
    ("in_chans", 2, "in_chans must be 1"),
    ("nan_policy", "ignore", "nan_policy must be one of stop, skip"),
    ("bad_files", "skipp", "Did you mean 'skip'"),
    ("save_every_steps", -5, "save_every_steps must be >= 0"),
    ("grad_clip", 0.0, "grad_clip must be > 0"),
])
def test_out_of_range_values_are_refused_with_the_valid_range(key, value, message):
    with pytest.raises(UserError, match=message):
        TrainConfig.from_dict({key: value})


def test_yaml_round_trip_and_string_coercion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: builtin:faces\nlr: 1e-3\nepochs: '4'\nimg_size: null\n")
    config = TrainConfig.load(path)
    assert config.lr == 0.001 and config.epochs == 4 and config.img_size is None
    config.save(tmp_path / "back.yaml")
    assert TrainConfig.load(tmp_path / "back.yaml") == config


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(UserError, match="epochs must be int; got 'many'"):
        TrainConfig.from_dict({"epochs": "many"})


def test_scratch_refuses_pretrained_weights():
    with pytest.raises(UserError, match="scratch"):
        TrainConfig(strategy="scratch", weights="imagenet")
