"""`python -m fluxtrain`: compose the config with Hydra and run the chosen task."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fluxtrain.config import config_dir, register_configs
from fluxtrain.errors import FluxtrainError
from fluxtrain.train import train

register_configs()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    except FluxtrainError as e:
        logging.getLogger("fluxtrain").error(f"error: {e}")
        sys.exit(getattr(e, "exit_code", 1))  # 130/143 after a stop on SIGINT/SIGTERM
    except KeyboardInterrupt:
        logging.getLogger("fluxtrain").error("interrupted")
        sys.exit(130)
    return metrics["best_val_loss"]


if __name__ == "__main__":
    main()
