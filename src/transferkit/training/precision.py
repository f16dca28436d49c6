"""The run's precision per kind of work (rank 0 may time the model, every rank takes its choice) and,
after training, the check of bf16 against fp32 inference that predict relies on.
"""

from __future__ import annotations

from dataclasses import replace

from transferkit.core.config import TrainConfig
from transferkit.core.distributed import Dist
from transferkit.core.progress import Reporter
from transferkit.models.precision import AGREEMENT, Workload, agreement_counts
from transferkit.models.runtime import Runtime
from transferkit.models.runtime import resolve as resolve_runtime
from transferkit.training.strategy import Phase


def runtime_for(
    config: TrainConfig, model, prep, plan: list[Phase], device, workers: int, d: Dist, report: Reporter
) -> Runtime:
    """The run's Runtime; precision auto may time the model on rank 0 (see `precision`), whose choice
    every rank takes."""
    micro = max(2, config.batch_size // (config.accumulate * d.world))
    workload = Workload.of(model, config.model, prep, micro, config.channels_last)
    rt = resolve_runtime(
        config,
        device,
        workers,
        workload if d.main else None,
        trains_backbone=any(p.groups for p in plan),
        say=report.info,
    )
    precision, reasons = d.gather((rt.precision, rt.reasons))[0]
    report.info(
        f"[transferkit] precision {config.precision}: train {precision['train']} ({reasons['train']}); "
        f"inference {precision['infer']} ({reasons['infer']})"
    )
    return replace(rt, precision=precision, reasons=reasons, normalize=prep.mean_std)


def serving_check(model, scored, rt: Runtime, d: Dist, report: Reporter, move=None) -> dict:
    """The run's precisions, and where inference ran in bf16, the share of val + test images whose top-1 is
    the same in bf16 as in fp32 (saved in the bundle: auto serves bf16 only above precision.AGREEMENT).
    `scored`: (loader, logits) per split, `logits` the bf16 logits that the best epoch's validation and the
    test pass already computed (None: computed here), so only the fp32 side runs again."""
    out = dict(rt.precision)
    if rt.precision["infer"] != "bf16":
        return out
    same, total = d.sum(list(agreement_counts(model, scored, move or rt.batch)))
    if total:
        out.update(bf16_top1_agreement=same / total, images=int(total))
        report.info(
            f"[transferkit] bf16 top-1 agrees with fp32 on {same / total:.1%} of {int(total)} val+test "
            f"images: predict serves in {'bf16' if same / total >= AGREEMENT else 'fp32'} where bf16 is faster"
        )
    return out
