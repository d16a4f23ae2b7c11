"""A run's hyper-parameters and final metrics in TensorBoard's HParams plugin, so a sweep reads as one table."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from fluxtrain.runs import flat_settings

METRIC_PREFIX = "metrics/"  # scalar tags of the final metrics: metrics/best_val_loss, ...


def flat_hparams(cfg: DictConfig) -> dict[str, float | int | str]:
    """Every leaf of the config as `section.key`: numbers and strings as they are, booleans, lists and None as text
    (what the HParams plugin takes)."""
    settings = flat_settings(OmegaConf.to_container(cfg, resolve=True))
    return {
        key: value if isinstance(value, int | float | str) and not isinstance(value, bool) else str(value)
        for key, value in settings.items()
    }


def log_hparams(writer: SummaryWriter, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Write the config and the numeric final metrics into the run's own event file.

    `SummaryWriter.add_hparams` would open a separate sub-run folder; writing the summaries through the run's own
    file writer keeps the HParams row and the run's scalars in one run.
    """
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    metric_tags = {METRIC_PREFIX + k: v for k, v in values.items()}
    experiment, session_start, session_end = hparams(flat_hparams(cfg), metric_tags)
    for summary in (experiment, session_start, session_end):
        writer.file_writer.add_summary(summary)
    step = int(metrics.get("iters", 0))
    for tag, value in metric_tags.items():
        writer.add_scalar(tag, value, step)
    writer.flush()
