"""Registries of what users choose by name: strategies, domain adaptation methods, tasks.

Each entry is a name, its one-line help and where its code lives ("module:attribute", imported when it is
first used). The config's choices, the CLI's help and did-you-mean come from these keys, so choosing
needs no heavy import and adding one is its own code plus one entry here. The code side:
`training.strategy` (a plan builder per strategy), `training.adapt` (a `Method` per adaptation method),
`models.task` (a `Task` class per task).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass

from transferkit.core.errors import UserError, did_you_mean


@dataclass(frozen=True)
class Entry:
    help: str
    """One line: what choosing it does."""
    target: str
    """Where its code lives: "package.module:attribute"."""


class Registry:
    """Names of one kind (`kind`: the option that chooses among them), in the order they are listed."""

    def __init__(self, kind: str, entries: dict[str, Entry]):
        self.kind, self.entries = kind, entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> str:
        """ "a | b | c", for help texts."""
        return " | ".join(self.entries)

    def describe(self) -> str:
        """Each name with its help, one per line."""
        return "\n".join(f"{name}: {entry.help}" for name, entry in self.entries.items())

    def load(self, name: str):
        """The code registered as `name`; a UserError naming the choices for an unknown one."""
        if name not in self.entries:
            raise UserError(
                f"Unknown {self.kind} '{name}'.{did_you_mean(name, self.entries)} Choose from {', '.join(self)}."
            )
        module, attribute = self.entries[name].target.split(":")
        return getattr(importlib.import_module(module), attribute)


STRATEGIES = Registry(
    "strategy",
    {
        "linear-probe": Entry(
            "the head alone on the frozen backbone (its features cached)", "transferkit.training.strategy:linear_probe"
        ),
        "finetune": Entry(
            "the top --unfreeze-groups layer groups and the head, the backbone at --backbone-lr-mult",
            "transferkit.training.strategy:finetune",
        ),
        "gradual": Entry(
            "one more layer group unfrozen every --gradual-every epochs, top first",
            "transferkit.training.strategy:gradual",
        ),
        "lp-ft": Entry(
            "a linear probe, then every layer at --ft-lr-scale of the LR (BatchNorm statistics kept)",
            "transferkit.training.strategy:lp_ft",
        ),
        "full": Entry("every layer, the backbone at --backbone-lr-mult", "transferkit.training.strategy:full"),
        "scratch": Entry(
            "random weights, every layer at the LR (the baseline that transfer must beat)",
            "transferkit.training.strategy:scratch",
        ),
    },
)

ADAPTATIONS = Registry(
    "adaptation method",
    {
        "dann": Entry(
            "a domain discriminator on the features through gradient reversal (Ganin et al. 2016)",
            "transferkit.training.adapt:DANN",
        ),
        "cdan": Entry(
            "the discriminator on features conditioned on the predictions (Long et al. 2018)",
            "transferkit.training.adapt:CDAN",
        ),
        "mcc": Entry(
            "minimum class confusion of the target predictions (Jin et al. 2020)", "transferkit.training.adapt:MCC"
        ),
        "dann-mcc": Entry("dann's and mcc's terms summed", "transferkit.training.adapt:DANN_MCC"),
        "coral": Entry(
            "source and target feature covariances aligned (Sun and Saenko 2016)", "transferkit.training.adapt:CORAL"
        ),
        "none": Entry(
            "no adaptation term: the source-only baseline, measured the same way", "transferkit.training.adapt:NONE"
        ),
    },
)

TASKS = Registry(
    "task",
    {
        "image": Entry("image classification on a timm backbone", "transferkit.models.task:ImageTask"),
        "text": Entry("text classification on a transformers encoder", "transferkit.models.task:TextTask"),
    },
)
