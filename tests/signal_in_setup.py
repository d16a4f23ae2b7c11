"""`python -m fluxtrain`, where rank 1 of a torchrun job gets SIGTERM as it starts reading the data (for
tests/test_distributed.py)."""

import os
import signal

import fluxtrain.train as train_module
from fluxtrain.__main__ import main

read_data = train_module.load_corpus


def load_corpus(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return read_data(*args, **kwargs)


train_module.load_corpus = load_corpus
main()
