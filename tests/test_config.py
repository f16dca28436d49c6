import pytest

from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError


def test_unknown_key_suggests_close_match():
    with pytest.raises(UserError, match="Unknown key 'epoch'.*Did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})


@pytest.mark.parametrize(
    "key,value,message",
    [
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
    ],
)
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


def test_every_field_has_one_section_and_config_yaml_is_written_in_them(tmp_path):
    from transferkit.core.config import SECTIONS

    names = [key for keys in SECTIONS.values() for key in keys]
    assert sorted(names) == sorted(TrainConfig().to_dict()) and len(names) == len(set(names))
    config = TrainConfig(data="builtin:faces", lr=0.01, epochs=4, precision="fp32")
    config.save(tmp_path / "c.yaml")
    import yaml

    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert list(saved) == ["data", "model", "strategy", "optim", "regularise", "adapt", "runtime", "output"]
    assert saved["optim"]["lr"] == 0.01 and saved["strategy"]["epochs"] == 4 and saved["runtime"]["precision"] == "fp32"
    notes = []
    assert TrainConfig.load(tmp_path / "c.yaml", say=notes.append) == config and notes == []


def test_a_flat_config_from_before_sections_loads_with_a_note(tmp_path):
    flat = TrainConfig(data="builtin:faces", lr=0.01, epochs=4)
    (tmp_path / "old.yaml").write_text(yaml_dump(flat.to_dict()))
    notes = []
    assert TrainConfig.load(tmp_path / "old.yaml", say=notes.append) == flat
    assert len(notes) == 1 and f"{len(flat.to_dict())} key(s) outside sections" in notes[0]


def test_a_key_in_the_wrong_section_names_its_section(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  data: builtin:faces\n  lr: 0.1\n")
    with pytest.raises(UserError, match="Key 'lr' in section 'data' of .*: it belongs in section 'optim'"):
        TrainConfig.load(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match="Key 'learning_rate' in section 'optim'.*no section has it"):
        TrainConfig.load(tmp_path / "d.yaml")


def yaml_dump(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def test_the_readme_yaml_examples_load(tmp_path):
    """Every ```yaml block of README.md is a config that loads (a `search:` section is tune's: checked too)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    assert blocks
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.yaml").write_text(block)
        notes = []
        config = TrainConfig.load(tmp_path / f"{i}.yaml", say=notes.append, other=("search",))
        assert notes == []  # written in sections
        if "search:" in block:
            from transferkit.tuning.space import read_search, space_for

            dims, _ = read_search(tmp_path / f"{i}.yaml")
            assert space_for(dims, (), config.replace(data="builtin:faces"))
        if "plan" in block:
            assert [phase["name"] for phase in config.plan] == ["probe", "tune"]
