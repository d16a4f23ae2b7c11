"""fluxtrain: train, compare and sample from small GPT-style transformer language models."""

import gc

# Importing torch makes some hundred thousand objects that live as long as the process, and the cyclic garbage
# collector would scan them again and again while they are made, and at exit. It pauses while the package imports,
# which then sets them aside from every later collection (gc.freeze): about 0.6 s of each command's start.
_collecting = gc.isenabled()
gc.disable()
try:
    from fluxtrain.model import GPT, ModelConfig
    from fluxtrain.model_file import load_model, save_model_file
finally:
    gc.freeze()
    if _collecting:
        gc.enable()

__all__ = ["GPT", "ModelConfig", "load_model", "save_model_file"]
__version__ = "0.1.0"
