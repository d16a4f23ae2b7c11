"""GPT-2 size presets: they compose, and built on the meta device they have the parameter counts of the formula."""

import pytest
import torch
from omegaconf import OmegaConf

from fluxtrain.model import GPT, ModelConfig

from .conftest import compose_config, param_count_formula

GPT2_VOCAB = 50257
# Parameter counts of OpenAI's GPT-2 checkpoints (tied head), the shapes these presets copy.
GPT2_PARAMS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080}
SHAPES = {"gpt2": (768, 12, 12, 3072), "gpt2-medium": (1024, 16, 24, 4096), "gpt2-large": (1280, 20, 36, 5120)}


@pytest.mark.parametrize("preset", sorted(GPT2_PARAMS))
def test_gpt2_preset_param_count_on_meta_device(preset):
    cfg = compose_config([f"model={preset}"])
    model_cfg = ModelConfig(**OmegaConf.to_container(cfg.model))
    assert (model_cfg.d_model, model_cfg.n_heads, model_cfg.n_layers, model_cfg.ff_dim) == SHAPES[preset]
    assert model_cfg.seq_len == 1024
    with torch.device("meta"):
        model = GPT(model_cfg, GPT2_VOCAB)
    assert next(model.parameters()).is_meta  # no memory was spent on the weights
    assert model.num_params() == param_count_formula(model_cfg, GPT2_VOCAB) == GPT2_PARAMS[preset]
