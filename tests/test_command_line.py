"""The commands when the reader of their stdout has left (`| head`, `| true`): they stop quietly with status 1, as
`python -m fluxtrain.generate` does, instead of a BrokenPipeError traceback."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from fluxtrain.command_line import check_overrides
from fluxtrain.config import Config, config_dir
from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.model_file import save_model_file
from fluxtrain.tokenizer import CharTokenizer

from .conftest import REPO_ROOT, make_text, run_fluxtrain
from .test_runs import make_run


def run_with_stdout_closed(*args: str) -> subprocess.CompletedProcess:
    """`python ARGS` at the repository root with stdout a pipe whose reader has left: every write to it fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        return subprocess.run(
            [sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True,
            timeout=300,
        )  # fmt: skip
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [["--help"], ["model=small", "--cfg", "job"], ["--info"]])
def test_fluxtrain_stops_quietly_when_hydras_output_has_no_reader(args):
    proc = run_with_stdout_closed("-m", "fluxtrain", *args)
    assert (proc.returncode, proc.stderr) == (1, "")


def test_the_runs_table_stops_quietly_when_it_has_no_reader(tmp_path):
    for i in range(5):
        make_run(tmp_path / "sweep" / str(i), 10 ** -(i + 1), metrics={"best_val_loss": 2.0 + i})
    proc = run_with_stdout_closed("-m", "fluxtrain.runs", str(tmp_path / "sweep"))
    assert (proc.returncode, proc.stderr) == (1, "")


@pytest.mark.parametrize("json_out", [[], ["--json", "-"]])
def test_an_evaluation_stops_quietly_when_it_has_no_reader(tmp_path, json_out):
    tokenizer = CharTokenizer.train(make_text(5_000))
    model = GPT(ModelConfig(d_model=32, n_heads=2, n_layers=1, ff_dim=64, seq_len=16), tokenizer.vocab_size)
    with torch.no_grad():
        save_model_file(tmp_path / "model.safetensors", model.eval(), tokenizer)
    (tmp_path / "text.txt").write_text(make_text(2_000), encoding="utf-8")
    args = ["--data", str(tmp_path / "text.txt"), "--device", "cpu", *json_out]
    proc = run_with_stdout_closed("-m", "fluxtrain.evaluate", str(tmp_path / "model.safetensors"), *args)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


def test_shell_completion_reaches_hydra():
    """`-sc install=bash` and `-sc query=bash` give Hydra words that are no settings: they are Hydra's to read."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    install = subprocess.run(
        [sys.executable, "-m", "fluxtrain", "-sc", "install=bash"], cwd=REPO_ROOT, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert install.returncode == 0 and "hydra_bash_completion()" in install.stdout, install.stderr
    query = subprocess.run(
        [sys.executable, "-m", "fluxtrain", "-sc", "query=bash"], cwd=REPO_ROOT, capture_output=True, text=True,
        env={**env, "COMP_LINE": "python fluxtrain/__main__.py mod"}, timeout=120,
    )  # fmt: skip
    assert query.returncode == 0 and "model=" in query.stdout.split(), query.stderr


def write_config_dir(folder, files: dict[str, str]) -> list[str]:
    """`files` ({"model/mine.yaml": text}) written under `folder`; the `--config-dir` arguments that add it."""
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return ["--config-dir", str(folder)]


EXTENDS_SMALL = "defaults:\n  - small\n  - _self_\nn_layers: 1\n"


@pytest.mark.parametrize(
    ("files", "choice"),
    [
        ({"model/mine.yaml": EXTENDS_SMALL}, "model=mine"),
        ({"model/small1.yaml": EXTENDS_SMALL, "experiment/mine.yaml": "# @package _global_\ndefaults:\n"
          "  - override /model: small1\n  - _self_\ntrain:\n  max_iters: 3\n"}, "experiment=mine"),
        ({"experiment/mine.yaml": "# @package _global_\ndefaults:\n  - override /model@model: small\n"},
         "experiment=mine"),
    ],
)  # fmt: skip
def test_a_config_dir_option_may_extend_another_through_its_defaults_list(tmp_path, files, choice):
    check_overrides([*write_config_dir(tmp_path, files), choice])


def test_a_preset_that_extends_another_composes(tmp_path):
    args = write_config_dir(tmp_path, {"model/small1.yaml": EXTENDS_SMALL})
    proc = run_fluxtrain(*args, "model=small1", "--cfg", "job", "-p", "model", timeout=300)
    assert proc.returncode == 0, proc.stderr
    model = yaml.safe_load(proc.stdout)
    assert (model["n_layers"], model["d_model"], model["ff_dim"]) == (1, 128, 512)  # the rest from small


@pytest.mark.parametrize(
    ("group", "text", "message"),
    [
        ("model", "defaults:\n  - smal\n  - _self_\n", " chooses model=smal, not an option of model: gpt2, "),
        ("model", "defaults:\n  - /model/smal\n", " chooses model=smal, not an option of model: gpt2, "),
        ("model", "defaults:\n  - small\nn_layrs: 1\n", ": model.n_layrs is not a fluxtrain setting (did you mean "),
        ("experiment", "# @package _global_\ndefaults:\n  - /model: smal\n", " chooses model=smal, not an option"),
        ("experiment", "# @package _global_\ndefaults:\n  - override /model: smal\n", " chooses model=smal, not"),
        ("experiment", "# @package _global_\ndefaults:\n  - _self_\noptim:\n  lrr: 2\n", ": optim.lrr is not a "),
    ],
)
def test_a_mistake_beside_or_in_a_defaults_list_is_one_line_naming_the_file(tmp_path, group, text, message):
    args = write_config_dir(tmp_path, {f"{group}/mine.yaml": text})
    with pytest.raises(FluxtrainError) as info:
        check_overrides([*args, f"{group}=mine"])
    assert str(info.value).startswith(f"--config-dir: {tmp_path / group / 'mine.yaml'}{message}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("files", "args", "message"),
    [
        ({"optim/mine.yaml": "momentum: 0.9\n"}, ["+optim=mine"], "{}: optim.momentum is not a fluxtrain setting (did"),
        ({"optim/mine.yaml": "lr: big\n"}, ["+optim=mine"], "{}: optim.lr='big': Value 'big' of type 'str' could not"),
        ({"mine.yaml": "defaults:\n  - config\n  - _self_\ntrain:\n  newkey: 1\n"}, ["--config-name", "mine"],
         "{}: train.newkey is not a fluxtrain setting"),
        ({"mine.yaml": "defaults:\n  - config\n  - _self_\nfoo: 1\n"}, ["-cn", "mine.yaml"], "{}: foo is not a "),
        ({"mine.yaml": "defaults:\n  - config\n  - _self_\nmodel:\n  d_model: big\n"}, ["--config-name", "mine"],
         "{}: model.d_model='big': Value 'big'"),
        ({"mine.yaml": "defaults:\n  - config\n  - optim: god\n", "optim/good.yaml": ""}, ["--config-name", "mine"],
         "{} chooses optim=god, not an option of optim: good"),
    ],
)  # fmt: skip
def test_a_config_dirs_own_group_or_primary_config_is_checked_in_one_line_naming_the_file(
    tmp_path, files, args, message
):
    """Hydra reports these in six lines."""
    config_dir_args = write_config_dir(tmp_path, files)
    with pytest.raises(FluxtrainError) as info:
        check_overrides([*config_dir_args, *args])
    assert str(info.value).startswith("--config-dir: " + message.format(tmp_path / next(iter(files))))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["+optim=nosuch"], "optim=nosuch is not an option of optim; its options: good"),
        (["optim=good"], "optim=good: optim is in no defaults list of fluxtrain's; add it with +optim=good"),
        (["++optim=good"], "++optim=good: optim is in no defaults list of fluxtrain's; add it with +optim=good"),
    ],
)
def test_a_config_dirs_own_group_takes_one_of_its_options_added_with_a_plus(tmp_path, args, message):
    """Hydra lists its search path (an unknown option), or says in four lines that there is no `optim` to override."""
    mine = "defaults:\n  - config\n  - optim: good\n  - _self_\noptim:\n  lr: 0.01\n"  # a primary config
    config_dir_args = write_config_dir(tmp_path, {"optim/good.yaml": "lr: 0.002\n", "mine.yaml": mine})
    with pytest.raises(FluxtrainError) as info:
        check_overrides([*config_dir_args, *args])
    assert str(info.value) == message
    check_overrides([*config_dir_args, "+optim=good"])
    check_overrides([*config_dir_args, "--config-name", "mine", "optim=good"])  # its defaults list has optim


def test_an_option_added_from_a_config_dirs_own_group_applies_after_the_experiment(tmp_path):
    args = write_config_dir(tmp_path, {"optim/good.yaml": "lr: 0.002\n"})
    check_overrides([*args, "experiment=shakespeare_cpu", "+optim=good"])  # not refused as overridden
    proc = run_fluxtrain(*args, "experiment=shakespeare_cpu", "+optim=good", "--cfg", "job", "-p", "optim.lr")
    assert (proc.returncode, proc.stdout.strip()) == (0, "0.002"), proc.stderr


BAD_KEY = "defaults:\n  - small\n  - _self_\nd_modl: 3\n"


@pytest.mark.parametrize(
    ("files", "args", "message"),
    [
        ({"model/tiny.yaml": "defaults:\n  - tiny\n  - _self_\nn_layers: 1\n"}, ["model=tiny"],
         "model/tiny.yaml: its defaults list comes back to model/tiny (model/tiny -> model/tiny)"),
        ({"model/a.yaml": "defaults:\n  - b\n", "model/b.yaml": "defaults:\n  - /model/a\n"}, ["model=a"],
         "model/b.yaml: its defaults list comes back to model/a (model/a -> model/b -> model/a)"),
        ({"myexp.yaml": "defaults:\n  - myexp\n  - _self_\n"}, ["--config-name", "myexp"],
         "myexp.yaml: its defaults list comes back to myexp (myexp -> myexp)"),
    ],
)  # fmt: skip
def test_a_defaults_list_that_comes_back_to_its_file_is_one_line_naming_the_loop(tmp_path, files, args, message):
    """Hydra recurses until a RecursionError of some 2,500 lines."""
    with pytest.raises(FluxtrainError) as info:
        check_overrides([*write_config_dir(tmp_path, files), *args])
    assert str(info.value) == f"--config-dir: {tmp_path}/{message}"


@pytest.mark.parametrize(
    ("files", "args", "message"),
    [
        ({"model/ext.yaml": "defaults:\n  - badkey\n  - _self_\nn_layers: 1\n"}, ["model=ext"],
         "model/badkey.yaml: model.d_modl is not a fluxtrain setting (did you mean model.d_model?)"),
        ({"experiment/mine.yaml": "# @package _global_\ndefaults:\n  - override /model: badkey\n"},
         ["experiment=mine"], "model/badkey.yaml: model.d_modl is not a fluxtrain setting"),
        ({"mine.yaml": "defaults:\n  - config\n  - override model: badkey\n  - _self_\n"}, ["--config-name", "mine"],
         "model/badkey.yaml: model.d_modl is not a fluxtrain setting"),
        ({"model/ext.yaml": "defaults:\n  - badval\n", "model/badval.yaml": "n_layers: zero\n"}, ["model=ext"],
         "model/badval.yaml: model.n_layers='zero': Value 'zero' of type 'str' could not be converted"),
        ({"model/ext.yaml": "defaults:\n  - badbase\n", "model/badbase.yaml": "defaults:\n  - nosuch\n"},
         ["model=ext"], "model/badbase.yaml chooses model=nosuch, not an option of model: badbase, "),
    ],
)  # fmt: skip
def test_a_mistake_in_a_file_reached_through_a_defaults_list_is_one_line_naming_that_file(
    tmp_path, files, args, message
):
    """Hydra reports these in several lines; only the files named on the command line were checked."""
    config_dir_args = write_config_dir(tmp_path, {"model/badkey.yaml": BAD_KEY, **files})
    with pytest.raises(FluxtrainError) as info:
        check_overrides([*config_dir_args, *args])
    assert str(info.value).startswith(f"--config-dir: {tmp_path}/{message}")


@pytest.mark.parametrize(
    ("files", "args", "message"),
    [
        ({"mine.yaml": "defaults:\n  - config\n  - model: tiny\n  - _self_\n"}, ["--config-name", "mine"],
         "mine.yaml: its defaults list chooses model: tiny, which fluxtrain's config chooses already; write "
         "override model: tiny"),
        ({"experiment/e.yaml": "# @package _global_\ndefaults:\n  - /tokenizer: null\n"}, ["experiment=e"],
         "experiment/e.yaml: its defaults list chooses /tokenizer: null, which fluxtrain's config chooses already"),
        # A group fluxtrain's config chooses as null is chosen all the same.
        ({"mine.yaml": "defaults:\n  - config\n  - experiment: shakespeare_cpu\n"}, ["--config-name", "mine"],
         "mine.yaml: its defaults list chooses experiment: shakespeare_cpu, which fluxtrain's config chooses already; "
         "write override experiment: shakespeare_cpu"),
        # Without fluxtrain's config to override, that comes first.
        ({"mine.yaml": "defaults:\n  - model: tiny\n  - _self_\n"}, ["--config-name", "mine"],
         "mine.yaml: a primary config that does not start from fluxtrain's config"),
        ({"mine.yaml": "defaults:\n  - config\n  - bogus\n"}, ["--config-name", "mine"],
         "mine.yaml: its defaults list names bogus, which is no config in "),
        ({"model/ext.yaml": "defaults:\n  - /optim/fast\n"}, ["model=ext"],
         "model/ext.yaml: its defaults list names optim/fast, which is no config in "),
        # A primary config in a subfolder reads its defaults list from there, and its settings are global only so.
        ({"sub/mine.yaml": "defaults:\n  - /config\n  - _self_\n"}, ["--config-name", "sub/mine"],
         "sub/mine.yaml: a primary config in a subfolder puts its settings under sub unless its first line is "
         "# @package _global_"),
        ({"sub/mine.yaml": "# @package _global_\ndefaults:\n  - /config\n  - override model: tiny\n"},
         ["--config-name", "sub/mine"], "sub/mine.yaml: its defaults list names sub/model/tiny, which is no config"),
    ],
)  # fmt: skip
def test_a_defaults_list_naming_a_config_hydra_cannot_use_is_one_line_naming_the_file(tmp_path, files, args, message):
    """Hydra reports these in several lines, one of them with its whole search path."""
    config_dir_args = write_config_dir(tmp_path, {"model/tiny.yaml": "n_layers: 1\n", **files})
    with pytest.raises(FluxtrainError) as info:
        check_overrides([*config_dir_args, *args])
    assert str(info.value).startswith(f"--config-dir: {tmp_path}/{message}")


def test_what_hydra_composes_from_a_config_dir_passes_the_defaults_list_checks(tmp_path):
    files = {
        "model/tiny.yaml": "n_layers: 1\n",
        "mine.yaml": "defaults:\n  - config\n  - optional extra: none\n  - _self_\n  - override model: tiny\n",
        "sub/mine.yaml": "# @package _global_\ndefaults:\n  - /config\n  - override /model: tiny\n  - _self_\n"
        "train:\n  max_iters: 7\n",
        "experiment/e.yaml": "# @package _global_\ndefaults:\n  - override /model: tiny\n"
        "  - override /hydra/job_logging: disabled\n",
    }
    config_dir_args = write_config_dir(tmp_path / "mine", files)
    merged = tmp_path / "merged"  # conf/ and the --config-dir: the configs Hydra finds
    shutil.copytree(config_dir(), merged)
    shutil.copytree(tmp_path / "mine", merged, dirs_exist_ok=True)
    for name, overrides in (("mine", []), ("sub/mine", []), ("config", ["experiment=e"])):
        check_overrides([*config_dir_args, "--config-name", name, *overrides])
        with initialize_config_dir(config_dir=str(merged), version_base="1.3"):
            cfg = compose(config_name=name, overrides=overrides)
        assert cfg.model.n_layers == 1
        assert cfg.train.max_iters == (7 if name == "sub/mine" else Config().train.max_iters)


def test_a_primary_config_of_a_config_dir_starts_from_fluxtrains(tmp_path):
    """Without fluxtrain's config in its defaults the run fails with a traceback (no `task`), or Hydra cannot
    override a setting the config lacks."""
    args = write_config_dir(tmp_path, {
        "bare.yaml": "train:\n  max_iters: 5\n",
        "on_bare.yaml": "defaults:\n  - bare\n  - _self_\n",
        "on_schema.yaml": "defaults:\n  - base_config\n  - _self_\n",
        "on_lr_find.yaml": "defaults:\n  - lr_find\n",
        "on_mine.yaml": "defaults:\n  - on_config\n  - _self_\n",
        "on_config.yaml": "defaults:\n  - /config\n  - _self_\n",
    })  # fmt: skip
    for name in ("bare", "on_bare", "on_schema"):  # the schema alone lacks fluxtrain's groups and logging
        with pytest.raises(FluxtrainError) as info:
            check_overrides([*args, "--config-name", name, "train.max_iters=3"])
        assert str(info.value) == (
            f"--config-dir: {tmp_path / name}.yaml: a primary config that does not start from fluxtrain's config; "
            "begin it with defaults: [config, _self_]"
        )
    for name in ("on_lr_find", "on_mine", "on_config"):
        check_overrides([*args, "--config-name", name, "train.max_iters=3"])
    check_overrides([*args, "--config-name", "bare", "hydra.searchpath=[file:///elsewhere]"])  # left to Hydra


def test_a_defaults_loop_stops_the_command_in_one_line(tmp_path):
    args = write_config_dir(tmp_path, {"model/tiny.yaml": "defaults:\n  - tiny\n  - _self_\nn_layers: 1\n"})
    proc = run_fluxtrain(*args, "model=tiny", "--cfg", "job", timeout=300)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
