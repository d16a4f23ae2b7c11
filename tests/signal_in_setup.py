"""`python -m fluxtrain`, where rank 1 of a torchrun job gets a signal in setup (for tests/test_distributed.py):
SIGTERM as it starts reading the data, or with SIGNAL_AT=run_dir SIGINT before it waits for rank 0's run folder."""

import os
import signal

import fluxtrain.distributed as distributed_module
import fluxtrain.train as train_module
from fluxtrain.__main__ import main

read_data, follow_main_run_dir = train_module.load_corpus, distributed_module.follow_main_run_dir
AT_RUN_DIR = os.environ.get("SIGNAL_AT") == "run_dir"


def load_corpus(*args, **kwargs):
    if os.environ.get("RANK") == "1" and not AT_RUN_DIR:
        os.kill(os.getpid(), signal.SIGTERM)
    return read_data(*args, **kwargs)


def follow_run_dir(argv):
    if os.environ.get("RANK") == "1" and AT_RUN_DIR:
        os.kill(os.getpid(), signal.SIGINT)
    return follow_main_run_dir(argv)


train_module.load_corpus = load_corpus
distributed_module.follow_main_run_dir = follow_run_dir
main()
