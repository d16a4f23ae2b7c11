"""fluxtrain: train, compare and sample from small GPT-style transformer language models."""

import gc

# Importing torch makes some hundred thousand objects that live as long as the process, and the cyclic garbage
# collector would scan them again and again while they are made: it pauses while the package imports (a few tenths of
# a second of each command's start), then is as it was.
_collecting = gc.isenabled()
gc.disable()
try:
    from fluxtrain.model import GPT, ModelConfig
    from fluxtrain.model_file import load_model, save_model_file
finally:
    if _collecting:
        gc.enable()

__all__ = ["GPT", "ModelConfig", "load_model", "save_model_file"]
__version__ = "0.1.0"
