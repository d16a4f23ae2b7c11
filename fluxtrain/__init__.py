"""fluxtrain: train, compare and sample from small GPT-style transformer language models."""

from fluxtrain.model import GPT, ModelConfig
from fluxtrain.model_file import load_model, save_model_file

__all__ = ["GPT", "ModelConfig", "load_model", "save_model_file"]
__version__ = "0.1.0"
