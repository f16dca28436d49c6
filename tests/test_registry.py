"""Registries (issue 36): strategies, adaptation methods and tasks are chosen by name from one place each;
the config's choices and the CLI's help come from the registry keys, and adding one is its code plus one
entry."""

import json

import pytest

import transferkit
from transferkit.cli.options import TRAIN
from transferkit.core import checks, registry
from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.core.registry import ADAPTATIONS, STRATEGIES, TASKS, Entry
from transferkit.training.adapt import Method
from transferkit.training.strategy import Phase, make_plan


@pytest.mark.parametrize("chosen", [STRATEGIES, ADAPTATIONS, TASKS], ids=lambda r: r.kind)
def test_every_registered_name_loads_its_code(chosen):
    for name in chosen:
        code = chosen.load(name)
        if chosen is STRATEGIES:
            plan = code(TrainConfig(strategy=name, epochs=4), 8)
            assert all(isinstance(phase, Phase) for phase in plan)
            assert sum(phase.epochs for phase in plan) == 4
        elif chosen is ADAPTATIONS:
            assert code is None if name == "none" else isinstance(code, Method)
        else:
            assert code.name == name


def test_choices_and_help_come_from_the_registries():
    assert list(checks.CHOICES["strategy"]) == list(STRATEGIES)
    assert checks.CHOICES["adapt"] == ("auto", *ADAPTATIONS)
    helps = {name: option.help for name, _, option in TRAIN}
    assert STRATEGIES.names() in helps["strategy"]
    assert ADAPTATIONS.names() in helps["adapt"]
    with pytest.raises(UserError, match="Did you mean 'coral'"):
        ADAPTATIONS.load("corall")


def probe_then_top_two(config, n_groups):
    """A strategy written for this test: a linear probe, then the top two groups."""
    return [
        Phase("probe", 1, [], 0.0, "frozen"),
        Phase("top-two", config.epochs - 1, list(range(n_groups - 2, n_groups)), 0.1, "train"),
    ]


def test_a_new_strategy_is_its_plan_builder_plus_one_entry(monkeypatch, shapes_dir, tiny):
    entry = Entry("a probe, then the top two groups", f"{__name__}:probe_then_top_two")
    monkeypatch.setitem(STRATEGIES.entries, "probe-top-two", entry)
    config = TrainConfig(strategy="probe-top-two", epochs=3)  # a choice now: the config validates it
    assert [phase.groups for phase in make_plan(config, 5)] == [[], [3, 4]]
    run = transferkit.train(data=str(shapes_dir), strategy="probe-top-two", **{**tiny, "epochs": 2})
    plan = json.loads((run.dir / "plan.json").read_text())
    assert [phase["name"] for phase in plan] == ["probe", "top-two"]
    assert [row["phase"] for row in map(json.loads, (run.dir / "metrics.jsonl").read_text().splitlines())] == [
        "probe",
        "top-two",
    ]
    assert registry.STRATEGIES is checks.STRATEGIES
