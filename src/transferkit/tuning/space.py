"""A study's search space: which TrainConfig fields a trial draws, and from what.

The default space (DEFAULT) draws the strategy (linear-probe, lp-ft, finetune, or layer-decay: full
fine-tuning with layer-wise LR decay), the LR and weight decay on log scales, head dropout, label
smoothing, and, for the fine-tuning strategies only, mixup (a linear probe with mixup could not train
on cached features). A YAML `search:` section (in the file given to `tune --config`) replaces it:

    search:
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      strategy: [linear-probe, lp-ft, finetune]
      head_dropout: {low: 0.0, high: 0.5}
      unfreeze_groups: {low: 1, high: 5}        # an int field draws ints
      layer_decay: {low: 0.6, high: 0.9, step: 0.05}

A list draws one of its values; a mapping draws from [low, high] (`log: true` on a log scale, `step`
on a grid). Fields given to `tune` as options are fixed for every trial and leave the space.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError, did_you_mean

LAYER_DECAY = "layer-decay"
"""A strategy choice of the search only: `full` with `layer_decay` drawn."""

NOT_SEARCHABLE = (
    "data",
    "split_file",
    "shots",
    "val_fraction",
    "test_fraction",
    "runs_dir",
    "name",
    "overwrite",
    "quiet",
    "cache_dir",
    "device",
    "plan",
)
"""Fields that fix what the study compares on (the data and its split) or where it writes."""

_KEYS = ("low", "high", "log", "step")


@dataclass(frozen=True)
class Dimension:
    """One field of the space: `choices` (categorical), or a range [low, high] drawn as `integer` or float."""

    field: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False
    when: tuple[str, ...] | None = None
    """Drawn only when the trial's strategy choice is one of these (the default space's conditions)."""

    def draw(self, trial) -> typing.Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.field, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.field, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.field, self.low, self.high, step=self.step, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.field} in {{{', '.join(map(str, self.choices))}}}"
        if self.log:
            scale = " (log)"
        elif self.step:
            scale = f" (step {self.step:g})"
        else:
            scale = ""
        return f"{self.field} in [{self.low:g}, {self.high:g}]{scale}" + (
            f" if {'/'.join(self.when)}" if self.when else ""
        )


FINE_TUNING = ("finetune", LAYER_DECAY)
DEFAULT = (
    Dimension("strategy", choices=("linear-probe", "lp-ft", "finetune", LAYER_DECAY)),
    Dimension("lr", low=1e-4, high=3e-2, log=True),
    Dimension("weight_decay", low=1e-5, high=0.1, log=True),
    Dimension("head_dropout", low=0.0, high=0.5),
    Dimension("label_smoothing", low=0.0, high=0.2),
    Dimension("mixup", low=0.0, high=0.4, when=FINE_TUNING),
    Dimension("layer_decay", low=0.5, high=0.95, when=(LAYER_DECAY,)),
)


def parse_search(section: typing.Any, source: str) -> tuple[Dimension, ...]:
    """The dimensions of a `search:` section; any unknown field or malformed distribution is a UserError."""
    if not isinstance(section, dict) or not section:
        raise UserError(
            f"'search' in {source} must map config fields to distributions, e.g. "
            "search: {lr: {low: 1.0e-4, high: 1.0e-2, log: true}, strategy: [linear-probe, finetune]}."
        )
    hints = typing.get_type_hints(TrainConfig)
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    dims = []
    for name, spec in section.items():
        where = f"search field '{name}' in {source}"
        if name not in fields:
            raise UserError(f"Unknown {where}: no config field has that name.{did_you_mean(str(name), fields)}")
        if name in NOT_SEARCHABLE:
            raise UserError(
                f"{where}: '{name}' fixes the data, its split or where the study writes, so every "
                "trial must share it; give it as a `tune` option instead."
            )
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"{where}: the list of choices is empty.")
            dims.append(Dimension(name, choices=tuple(spec)))
            continue
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - set(_KEYS):
            raise UserError(
                f"{where}: give a list of choices, or a mapping with low and high (and optionally "
                f"log: true or step: N); got {spec!r}."
            )
        low, high, step = spec["low"], spec["high"], spec.get("step")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high, step or 1)):
            raise UserError(f"{where}: low, high and step must be numbers; got {spec!r}.")
        if not low < high or (spec.get("log") and low <= 0) or (spec.get("log") and step):
            raise UserError(f"{where}: needs low < high, low > 0 on a log scale, and no step with log; got {spec!r}.")
        integer = int in typing.get_args(hints[name]) or hints[name] is int
        if step is not None and (step <= 0 or (integer and step != int(step))):
            raise UserError(
                f"{where}: step must be above 0{' and a whole number (an int field)' if integer else ''}, "
                f"e.g. step: {1 if integer else (high - low) / 10:g}; got step: {step}."
            )
        dims.append(Dimension(name, low=low, high=high, log=bool(spec.get("log")), step=step, integer=integer))
    return tuple(dims)


def space_for(
    search: tuple[Dimension, ...] | None, fixed: typing.Iterable[str], base: TrainConfig
) -> tuple[Dimension, ...]:
    """The study's dimensions: `search` (or DEFAULT) without the `fixed` fields; every choice and bound is
    checked against `base` first, so a value the config refuses fails before any trial runs."""
    fixed = set(fixed)
    dims = tuple(d for d in (search or DEFAULT) if d.field not in fixed)
    if not dims:
        raise UserError(
            "Nothing left to search: every field of the search space is fixed by an option. "
            "Drop an option, or add fields to the `search:` section."
        )
    for d in dims:
        values = d.choices if d.choices is not None else (d.low, d.high)
        for value in values:
            if d.field == "strategy" and value == LAYER_DECAY:
                value = "full"
            try:
                base.replace(**{d.field: value})
            except UserError as err:
                raise UserError(f"Search field '{d.field}': the value {value!r} is refused: {err}") from None
    return dims


def draw(trial, dims: tuple[Dimension, ...], strategy: str) -> dict:
    """A trial's config overrides, drawn from `dims` (strategy first, for the conditions; `strategy`: the
    base config's, for when the space does not draw it)."""
    values = {}
    for d in sorted(dims, key=lambda d: d.field != "strategy"):
        if d.when is None or values.get("strategy", strategy) in d.when:
            values[d.field] = d.draw(trial)
    if values.get("strategy") == LAYER_DECAY:
        values["strategy"] = "full"
        values.setdefault("layer_decay", 0.75)
    return values


def read_search(path: str | Path) -> tuple[tuple[Dimension, ...] | None, set[str]]:
    """A `tune --config` file's `search:` section (None when it has none) and the config fields it sets
    outside that section (fixed for every trial, like options)."""
    import yaml

    values = yaml.safe_load(Path(path).read_text()) or {}  # TrainConfig.load has read it already
    search = values.pop("search", None)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k for v in values.values() if isinstance(v, dict) for k in v} | {
        k for k, v in values.items() if not isinstance(v, dict)
    }
    dims = parse_search(search, f"'{path}'") if search is not None else None
    return dims, (given & fields) - {d.field for d in dims or ()}
