"""The training process's CPU settings: malloc keeping freed memory (no page faults per step) and threads."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import torch

from fluxtrain import host
from tests.conftest import run_fluxtrain

# Eager training steps of the reference shape in a fresh process that keeps freed memory; prints the minor page
# faults of each step.
STEPS = """
import json, resource, torch
from fluxtrain import host
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.optim import OptimConfig, build_optimizer
kept = host.keep_freed_memory()
torch.manual_seed(0)
model = GPT(ModelConfig(d_model=128, n_heads=4, n_layers=4, ff_dim=512, seq_len=64, bias=False), 65)
optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1))
data = torch.randint(65, (12, 65))
def step():
    _, loss = model(data[:, :-1], data[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(10):  # the heap grows to the step's peak in the first steps
    step()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def steps_in_fresh_process() -> dict:
    proc = run_fluxtrain(entry=("-c", STEPS), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host.is_glibc(), reason="malloc settings are for glibc")
def test_kept_memory_stops_page_faults_in_training_steps():
    kept = steps_in_fresh_process()
    assert kept["kept"] is True
    # With glibc's defaults, 950 to 2,500 faults in every step here (activations mmapped and unmapped every step).
    # Kept, most steps take none once the heap has grown to the step's peak; an occasional step still grows the
    # heap past a fragmented peak (80 to 400 faults, once in 10 to 30 steps).
    assert statistics.median(kept["faults"]) <= 2, kept
    assert sum(kept["faults"]) < 20 * 100, kept


def test_configure_applies_threads_and_the_malloc_setting(monkeypatch):
    calls = []
    monkeypatch.setattr(host, "keep_freed_memory", lambda: calls.append("keep") or True)
    threads = torch.get_num_threads()
    try:
        host.configure(1, keep_cpu_memory=False)
        assert torch.get_num_threads() == 1 and calls == []
        host.configure(0, keep_cpu_memory=True)
        assert torch.get_num_threads() == 1 and calls == ["keep"]  # 0 leaves the thread count alone
    finally:
        torch.set_num_threads(threads)


def test_configure_says_when_malloc_is_not_glibc(monkeypatch, caplog):
    monkeypatch.setattr(host.platform, "libc_ver", lambda: ("", ""))
    with caplog.at_level("INFO", logger="fluxtrain.host"):
        host.configure(0, keep_cpu_memory=True)
    assert "not a glibc system" in caplog.text


@pytest.mark.parametrize("enabled", [True, False])
def test_importing_fluxtrain_leaves_the_garbage_collector_as_it_found_it(enabled):
    """The import pauses collections only while it runs: collections stay off in a process that had turned them off,
    and in one that had them on, a cycle made before the import is still collected after it (nothing is frozen)."""
    code = (
        "import gc, weakref\n"
        f"if not {enabled}:\n    gc.disable()\n"
        "class Cycle: pass\n"
        "c = Cycle(); c.me = c; alive = weakref.ref(c)\n"
        "import fluxtrain\n"
        "del c\n"
        "print(gc.isenabled(), gc.get_freeze_count(), gc.collect() > 0, alive() is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(enabled), "0", "True", "True"]
