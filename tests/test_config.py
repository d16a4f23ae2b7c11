"""Config composition: presets, defaults, typo and type checks, validation errors and `--cfg job`."""

import os
import subprocess
import sys

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from fluxtrain.command_line import check_overrides
from fluxtrain.config import compose, config_dir
from fluxtrain.errors import FluxtrainError
from fluxtrain.model import ModelConfig
from fluxtrain.overrides import check_commands, options_first
from fluxtrain.tasks import run_task
from fluxtrain.train import TrainConfig, validate

from .conftest import REPO_ROOT, compose_config, run_fluxtrain

PRESETS = {"small": (128, 4, 2, 512), "medium": (256, 8, 4, 1024), "large": (512, 16, 6, 2048)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_composes_with_its_shape(name):
    cfg = compose_config([f"model={name}"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers, cfg.model.ff_dim) == PRESETS[name]
    assert cfg.model.seq_len == 64
    assert cfg.model.dropout == 0.0
    ModelConfig(**cfg.model).validate()


def test_defaults():
    cfg = compose_config()
    assert cfg.model.d_model == 256  # medium is the default preset
    assert cfg.optim.name == "adam" and cfg.optim.lr == 3e-4 and cfg.optim.grad_clip == 1.0
    assert cfg.optim.warmup_iters == 100 and cfg.optim.min_lr == 0.0
    assert cfg.train.max_iters == 10000 and cfg.train.batch_size == 32
    assert cfg.train.log_interval == 100 and cfg.train.sample_interval == 500 and cfg.train.ckpt_interval == 1000
    assert cfg.data.path is None and cfg.data.val_fraction == 0.1
    assert cfg.train.device == "auto"


@pytest.mark.parametrize("override", ["model.d_modl=64", "optim.learning_rate=1e-3", "train.max_iter=5", "nope=1"])
def test_mistyped_key_fails(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_config([override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+model.d_modl=64"], "model.d_modl is not a fluxtrain setting (did you mean model.d_model?)"),
        (["+trian.max_iters=5"], "trian is not a fluxtrain setting (did you mean train?)"),
        (["+optim.lr_decay=0.5", "+data.foo=1"], "data.foo is not a fluxtrain setting; also unknown: optim.lr_decay"),
    ],
)
def test_keys_added_with_plus_are_refused_before_the_task_runs(overrides, message, tmp_path):
    cfg = compose_config(overrides)  # Hydra's `+` adds a key past the schema
    with pytest.raises(FluxtrainError) as info:
        run_task(cfg, tmp_path)
    assert str(info.value) == message
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override", ["model.d_model=wide", "train.batch_size=1.5", "optim.lr=fast"])
def test_wrong_type_fails(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config([override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.d_modl=64", r"^model.d_modl is not a fluxtrain setting \(did you mean model.d_model\?\)$"),
        ("trian.max_iters=5", r"^trian is not a fluxtrain setting \(did you mean train\?\)$"),
        ("model.d_model=wide", r"^model.d_model: Value 'wide' of type 'str' could not be converted to Integer$"),
        ("optim.lr=1e-3,fast", r"^optim.lr: Value 'fast' of type 'str' could not be converted to Float$"),
        ("model.bias=maybe", r"^model.bias: Value 'maybe' is not a valid bool"),
        ("+model.d_modl=64", r"^model.d_modl is not a fluxtrain setting \(did you mean model.d_model\?\)$"),
        ("+new.key=1", r"^new is not a fluxtrain setting$"),
    ],
)
def test_command_line_settings_are_checked_in_one_line_before_hydra(override, message):
    with pytest.raises(FluxtrainError, match=message):
        check_overrides(["-m", "model=small", override, "hydra.sweep.dir=x"])


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("hydra.run.dir=/tmp/a b/lr=1e-3,bs=8", "mismatched input '=' expecting <EOF>"),
        ("train.max_iters=[1", "no viable alternative at input '[1'"),
        ("optim.lr=1e-3)", "extraneous input ')' expecting <EOF>"),
    ],
)
def test_a_setting_hydra_cannot_parse_is_named_with_the_reason(override, reason):
    with pytest.raises(FluxtrainError) as info:
        check_overrides(["model=small", override])
    assert str(info.value).startswith(f"cannot read the setting {override!r} ({reason}); ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.max_time=inf"], "train.max_time=inf must be a finite number"),
        (["train.max_time=nan"], "train.max_time=nan must be a finite number"),
        (["optim.lr=nan"], "optim.lr=nan must be a finite number"),
        (["optim.weight_decay=-inf"], "optim.weight_decay=-inf must be a finite number"),
        (["optim.betas=[0.9,nan]"], "optim.betas=[0.9, nan] must hold finite numbers only"),
    ],
)
def test_nan_and_infinite_settings_are_refused_before_the_task_runs(overrides, message, tmp_path):
    cfg = compose_config(overrides)
    with pytest.raises(FluxtrainError) as info:
        run_task(cfg, tmp_path)
    assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override",
    [
        "model=small",
        "model.d_model=64",
        "optim.lr=1e-4,1e-3",
        "train.seed=range(1,4)",
        "train.max_time=null",
        "optim.betas=[0.9,0.95]",
        "hydra.run.dir=x",
        "hydra/launcher=basic",
        "++model.d_model=64",
        "experiment=shakespeare_cpu",
        "model=small,medium",
        "~experiment",
        "hydra.run.dir=runs/${model.d_model}-${now:%H-%M-%S}",
        "optim.min_lr=${optim.lr}",
        "data.path=${oc.env:HOME}/notes.txt",
        "data.separator='\\${not} an interpolation'",
    ],
)
def test_valid_settings_and_what_hydra_checks_pass_the_precheck(override):
    check_overrides([override, "-m", "--cfg", "job"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=huge"], "model=huge is not an option of model; its options: gpt2, gpt2-large, gpt2-medium, large, "),
        (
            ["experiment=shakespeare_cpux"],
            "experiment=shakespeare_cpux is not an option of experiment (did you mean experiment=shakespeare_cpu?); "
            "its options: shakespeare_cpu, shakespeare_cpu_bf16, shakespeare_gpu",
        ),
        (["-m", "tokenizer=char,bpee"], "tokenizer=bpee is not an option of tokenizer (did you mean tokenizer=bpe?)"),
        (["model=[small,larg]"], "model=larg is not an option of model (did you mean model=large?)"),
        (["experiment=null"], "experiment=null is not an option of experiment; choose one of shakespeare_cpu, "),
        (["+experiment=shakespeare_cpu"], "+experiment=shakespeare_cpu: experiment is chosen in the defaults already"),
        (["++model=small"], "++model=small: model is chosen in the defaults already; give model=small without ++"),
    ],
)
def test_a_config_group_takes_one_of_its_options_in_one_line(args, message):
    """Hydra reports these in a dozen lines (an unknown option) or with a traceback (`null`)."""
    with pytest.raises(FluxtrainError) as info:
        check_overrides(args)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_config_dirs_options_count_for_the_groups_of_conf(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tiny.yaml").write_text("d_model: 48\nn_heads: 3\n")
    with pytest.raises(FluxtrainError, match="^model=tiny is not an option of model"):
        check_overrides(["model=tiny"])
    check_overrides(["--config-dir", str(tmp_path), "model=tiny"])
    (tmp_path / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\n")
    check_overrides(["--config-dir", str(tmp_path), "--config-name", "mine", "model=tiny"])
    check_overrides(["--config-name", "lr_find", "model=small"])


@pytest.mark.parametrize(
    ("group", "text", "message"),
    [
        ("model", "d_model: big\n", ": model.d_model='big': Value 'big' of type 'str' could not be converted"),
        ("model", "d_modl: 32\n", ": model.d_modl is not a fluxtrain setting (did you mean model.d_model?)"),
        ("model", "- 1\n- 2\n", " holds a list, not settings (key: value lines)"),
        ("experiment", "# @package _global_\ndefaults:\n  - override /model: nosuch\n", " chooses model=nosuch, not"),
        ("experiment", "# @package _global_\noptim:\n  lrr: 2\n", ": optim.lrr is not a fluxtrain setting"),
    ],
)
def test_a_config_dir_option_with_a_typo_or_a_wrong_type_is_one_line_naming_the_file(tmp_path, group, text, message):
    (tmp_path / group).mkdir()
    (tmp_path / group / "mine.yaml").write_text(text)
    with pytest.raises(FluxtrainError) as info:
        check_overrides(["--config-dir", str(tmp_path), f"{group}=mine"])
    assert str(info.value).startswith(f"--config-dir: {tmp_path / group / 'mine.yaml'}{message}")
    (tmp_path / group / "mine.yaml").write_text("# @package _global_\ntrain:\n  max_iters: 3\n" if group == "experiment"
                                              else "d_model: 48\nn_heads: 3\n")  # fmt: skip
    check_overrides(["--config-dir", str(tmp_path), f"{group}=mine"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["optim.lr=1e-3,3e-3"], "optim.lr=1e-3,3e-3 is a sweep: add -m to run one job per value"),
        (["--config-dir", "no/such/folder", "model=small"], "--config-dir no/such/folder does not exist"),
        (["--config-name", "nope"], "--config-name nope: there is no nope.yaml in "),
        (["model=small,medium", "--cfg", "job"], "model=small,medium is a sweep: add -m"),
        (["train.seed=range(1,4)"], "train.seed=range(1,4) is a sweep: add -m"),
        (["hparams_search=lr_optuna"], "hparams_search=lr_optuna is a search: add -m to run its trials"),
        (
            ["data.include=*.py"],
            "data.include: takes a list, in brackets and quoted for the shell, e.g. data.include='[*.py]'",
        ),
        (["-m", "optim.lr=range(0)"], "optim.lr=range(0) sweeps over no values: give at least one"),
        (["-m", "optim.lr=glob(*)"], "optim.lr=glob(*): glob() picks options of a config group, and optim.lr is not"),
        (["-m", "hparams_search=lr_optuna", "hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials=0: a search runs at"),
        (["-m", "hparams_search=lr_optuna", "hydra.sweeper.n_jobs=0"], "hydra.sweeper.n_jobs=0: a search asks for at"),
        (["-m", "hparams_search=lr_optuna", "hydra.sweeper.n_jobs=-1"], "hydra.sweeper.n_jobs=-1: a search asks for"),
        (
            ["-m", "hparams_search=lr_optuna", "hydra.sweeper.direction=maximise"],
            "hydra.sweeper.direction=maximise: a search's direction is minimize or maximize (did you mean maximize?)",
        ),
        (["-m", "hparams_search=lr_optuna", "hydra.sweeper.direction=null"], "hydra.sweeper.direction=null: a search"),
        (
            ["-m", "hparams_search=lr_optuna", "hydra.sweeper.direction=[minimize,maximize]"],
            "hydra.sweeper.direction=[minimize,maximize]: a trial returns one value, its best validation loss, so a "
            "search has one direction",
        ),
        (
            ["-m", "hparams_search=lr_optuna", "hydra.sweeper.max_failure_rate=2"],
            "hydra.sweeper.max_failure_rate=2: the share of failed trials a search allows is from 0 to 1",
        ),
        (["-m", "optim.lr=1e-3,2e-3", "hydra.sweep.subdir=x"], "hydra.sweep.subdir=x names one folder for every job"),
        (["-m", "hydra.sweep.subdir="], "hydra.sweep.subdir= names one folder for every job"),
        (["-m", "optim.lr=1e-3,2e-3", "hydra.sweep.subdir=5"], "hydra.sweep.subdir=5 names one folder for every"),
        (["-m", "hydra.sweep.subdir=1.5"], "hydra.sweep.subdir=1.5 names one folder for every job"),
        (["-m", "hydra.sweep.subdir=true"], "hydra.sweep.subdir=true names one folder for every job"),
        (["-m", "hydra.sweep.subdir=null"], "hydra.sweep.subdir=null: each job of a sweep needs a folder of its own"),
        (["-m", "hydra.sweep.dir=a,b"], "hydra.sweep.dir=a,b: Hydra's own settings cannot be swept"),
        (["~model.d_model"], "~model.d_model: a fluxtrain setting cannot be removed; give it a value instead"),
        (["~train.max_time"], "~train.max_time: a fluxtrain setting cannot be removed"),
        (["~optim.learning_rate"], "optim.learning_rate is not a fluxtrain setting"),
        (["hydra.run.dir="], "hydra.run.dir= is empty; give a folder (hydra.run.dir=. for the working folder)"),
        (["-m", "hydra.sweep.dir=''"], "hydra.sweep.dir='' is empty; give a folder"),
        (["hydra.run.dir=null"], "hydra.run.dir=null is not a folder; give a path"),
        (["hydra.job.chdir=true"], "hydra.job.chdir=true is not supported: a run reads data.path, resume and "),
        (
            ["hydra.run.dir=runs/${model.d_modl}"],
            "hydra.run.dir=runs/${model.d_modl}: ${model.d_modl} refers to model.d_modl, which is not a fluxtrain "
            "setting (did you mean model.d_model?)",
        ),
        (["optim.min_lr=${optim.nope}"], "optim.min_lr=${optim.nope}: ${optim.nope} refers to optim.nope, which is"),
        (["data.path=${nowx:%H}"], "data.path=${nowx:%H}: ${nowx:%H} uses 'nowx', which is no resolver"),
        (
            ["data.path=${oc.env:FLUXTRAIN_UNSET_VARIABLE}/a.txt"],
            "data.path=${oc.env:FLUXTRAIN_UNSET_VARIABLE}/a.txt: ${oc.env:FLUXTRAIN_UNSET_VARIABLE} reads the "
            "environment variable FLUXTRAIN_UNSET_VARIABLE, which is not set",
        ),
    ],
)
def test_what_hydra_reports_in_many_lines_or_a_traceback_is_one_line_before_it_starts(args, message):
    with pytest.raises(FluxtrainError) as info:
        check_overrides(args)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["hparams_search=lr_optuna", "hydra.sweeper.n_trials=abc"], "Value 'abc' of type 'str' could not be conv"),
        (["hparams_search=lr_optuna", "hydra.sweeper.n_trials=1.5"], "Value '1.5' of type 'float' could not be conv"),
        (["hparams_search=lr_optuna", "hydra.sweeper.sampler.seed=x"], "Value 'x' of type 'str' could not be conv"),
        (["hydra/sweeper=optuna", "hydra.sweeper.max_failure_rate=abc"], "Value 'abc' of type 'str' could not be conv"),
        (
            ["hparams_search=lr_optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=[1]"],
            "Value '[1]' of type 'list' could not be converted to Integer",
        ),
        (["hydra.job.env_set=3"], "Cannot assign int to Dict[str, str]"),
        (["hydra.sweep.subdir=[a]"], "Cannot convert 'list' to string"),
    ],
)
def test_a_wrong_type_for_hydras_own_settings_is_one_line_before_hydra_runs(args, message):
    key = args[-1].split("=")[0]
    with pytest.raises(FluxtrainError) as info:
        check_overrides(["-m", *args])
    assert str(info.value).startswith(f"{key}: {message}") and "\n" not in str(info.value)


def test_hydras_own_settings_of_the_right_type_and_open_ones_are_left_to_hydra():
    search = ["-m", "hparams_search=lr_optuna"]
    check_overrides([*search, "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=null", "hydra.sweeper.storage=x"])
    check_overrides([*search, "+hydra.sweeper.params.a='interval(0, 1)'", "hydra.sweeper.study_name=s"])
    check_overrides([*search, "hydra/sweeper/sampler=grid", "hydra.sweeper.sampler.seed=x"])  # Hydra: no such key
    check_overrides(["-m", "hydra.sweeper.max_batch_size=2", "+hydra.job.env_set.A=1"])
    check_overrides(["hydra.output_subdir=null", "hydra.verbose=true", "hydra.job_logging.root.level=DEBUG"])


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm", "submitit_local"])
def test_a_launcher_without_m_is_refused_as_it_would_train_here(launcher, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(FluxtrainError) as info:
        check_overrides([f"hydra/launcher={launcher}", "model=small"])
    assert str(info.value) == (
        f"hydra/launcher={launcher} is a launcher: add -m to submit the run through it (without -m it would train "
        "here, on this machine)"
    )
    check_overrides(["-m", f"hydra/launcher={launcher}", "model=small"])
    check_overrides([f"hydra/launcher={launcher}", "model=small", "--cfg", "hydra"])  # prints, runs nothing
    check_overrides(["hydra/launcher=basic", "model=small"])  # Hydra's own runs here either way


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm"])
def test_a_slurm_launcher_without_srun_is_one_line_before_hydra_runs(launcher, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(FluxtrainError) as info:
        check_overrides(["-m", f"hydra/launcher={launcher}", "model=small"])
    assert str(info.value).startswith(f"hydra/launcher={launcher}: srun is not on PATH, so this machine cannot submit")
    check_overrides(["-m", "hydra/launcher=submitit_local", "model=small"])  # runs here, without SLURM


def test_sweeps_that_name_a_folder_per_job_and_group_globs_pass_the_checks():
    check_overrides(["-m", "optim.lr=1e-3,2e-3", "hydra.sweep.subdir=${hydra.job.override_dirname}"])
    check_overrides(["-m", "model=glob(sm*)", "hparams_search=lr_optuna", "hydra.sweeper.n_trials=1"])
    for direction in ("minimize", "maximize", "[maximize]"):  # as the Optuna sweeper takes them
        check_overrides(["-m", "hparams_search=lr_optuna", f"hydra.sweeper.direction={direction}"])
    check_overrides(["-m", "hparams_search=lr_optuna", "hydra.sweeper.n_jobs=2", "hydra.sweeper.max_failure_rate=1"])


def test_a_search_can_print_its_config_without_running_trials():
    """`--cfg` cannot go with -m, so a search without -m is allowed there: it prints and runs nothing."""
    for flag in ("--cfg", "-c", "--info"):
        check_overrides(["experiment=shakespeare_cpu", "hparams_search=lr_optuna", flag, "job"])
    with pytest.raises(FluxtrainError, match="is a search: add -m"):  # --resolve alone prints nothing
        check_overrides(["hparams_search=lr_optuna", "--resolve"])
    proc = subprocess.run(
        [sys.executable, "-m", "fluxtrain", "experiment=shakespeare_cpu", "hparams_search=lr_optuna", "--cfg", "hydra"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    sweeper = yaml.safe_load(proc.stdout)["hydra"]["sweeper"]
    assert sweeper["params"] == {"optim.lr": "tag(log, interval(1e-4, 1e-2))", "model.dropout": "interval(0.0, 0.3)"}


def test_a_preset_that_an_experiment_overrides_is_refused():
    """The experiment sets the model's shape after the preset: `model=small` would be silently ignored."""
    with pytest.raises(FluxtrainError) as info:
        check_overrides(["experiment=shakespeare_gpu", "model=small"])
    assert str(info.value) == (
        "model=small would not apply: experiment=shakespeare_gpu sets model.d_model=384, model.n_heads=6, "
        "model.n_layers=6, model.ff_dim=1536, model.seq_len=256, model.dropout=0.2; change those settings instead "
        "(e.g. model.d_model=128)"
    )
    with pytest.raises(FluxtrainError, match="^model=medium would not apply: experiment=shakespeare_cpu sets"):
        check_overrides(["-m", "model=small,medium", "experiment=shakespeare_cpu"])
    check_overrides(["experiment=shakespeare_cpu", "model=small"])  # the preset it builds on
    check_overrides(["experiment=shakespeare_gpu", "model.d_model=192", "model.n_heads=3"])
    assert compose_config(["experiment=shakespeare_gpu", "model=small"]).model.d_model == 384  # what Hydra would do


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=${train.device}", "optim.lr: While dereferencing interpolation '${train.device}': Value 'auto' "),
        ("data.path=${oc.env:FLUXTRAIN_UNSET_VARIABLE}", "data.path: KeyError raised while resolving interpolation"),
        ("resume=", "resume='' is empty; give a checkpoint file, auto (the newest in the run folder), or null to "),
    ],
)
def test_settings_that_do_not_resolve_or_are_empty_are_refused_before_the_task_runs(override, message, tmp_path):
    cfg = compose_config([override])
    with pytest.raises(FluxtrainError) as info:
        run_task(cfg, tmp_path)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cfg", "job", "-m", "optim.lr=1e-3,2e-3"], "--cfg and --multirun cannot go together"),
        (["-m", "--info"], "--multirun and --info cannot go together"),
        (["--cfg=hydra", "--shell-completion"], "--cfg and --shell-completion cannot go together"),
        (["-r", "-m"], "--run and --multirun cannot go together"),
    ],
)
def test_two_hydra_commands_on_one_line_are_one_line_error(args, message):
    with pytest.raises(FluxtrainError) as info:
        check_commands(args)
    assert str(info.value).startswith(f"{message}: give one of --run, --multirun (-m), --cfg, --info")
    for one in (["--cfg", "job", "model=small"], ["-m", "optim.lr=1e-3,2e-3"], ["--info"], []):
        check_commands(one)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experimental-rerun", "config.pickle"], "--experimental-rerun is refused: it unpickles a file, which can"),
        (["--resolve"], "--resolve goes with --cfg (or --help)"),
        (["-p", "optim", "model=small"], "--package=optim goes with --cfg"),
        (["-sc"], "--shell-completion needs install=SHELL, uninstall=SHELL or query=..."),
        (["--hydra-help", "model=small"], "--hydra-help takes no settings: model=small"),
        (
            ["--cfg", "jobs"],
            "argument --cfg/-c: invalid choice: 'jobs' (choose from 'job', 'hydra', 'all') (see --help)",
        ),
        (["--bogus"], "unrecognized arguments: --bogus (see --help)"),
    ],
)
def test_hydra_options_it_would_end_with_a_traceback_or_its_usage_are_one_line(args, message):
    with pytest.raises(FluxtrainError) as info:
        check_commands(args)
    assert str(info.value).startswith(message)
    for fine in (["--cfg", "job", "--resolve", "-p", "optim"], ["-sc", "install=bash"], ["--hydra-help"], ["--help"]):
        check_commands(fine)


@pytest.mark.parametrize("flag", [["--cfg", "job"], ["--cfg=job"], ["--info=defaults"]])
def test_a_search_only_printed_needs_no_m_in_either_form_of_the_option(flag):
    check_overrides([*flag, "hparams_search=lr_optuna"])  # prints the search's config: no trials to run


@pytest.mark.parametrize(("group", "stock"), [("hydra/job_logging", "default"), ("hydra/launcher", "basic")])
def test_a_hydra_group_set_to_null_is_one_line(group, stock):
    with pytest.raises(FluxtrainError) as info:
        check_overrides([f"{group}=null"])
    assert str(info.value) == f"{group}=null is not an option of {group}: name one, e.g. {group}={stock}"


def test_an_unknown_option_or_group_of_hydra_s_own_is_one_line(tmp_path):
    with pytest.raises(FluxtrainError) as info:
        check_overrides(["hydra/job_logging=bogus"])
    assert str(info.value) == (
        "hydra/job_logging=bogus is not an option of hydra/job_logging; choose one of default, disabled, fluxtrain, "
        "none, stdout"
    )
    with pytest.raises(FluxtrainError, match="^hydra/nope=x: Hydra has no config group hydra/nope$"):
        check_overrides(["hydra/nope=x"])
    with pytest.raises(FluxtrainError, match="^hydra/launcher=joblib is not an option of hydra/launcher; .*basic"):
        check_overrides(["-m", "hydra/launcher=joblib"])
    (tmp_path / "hydra" / "job_logging").mkdir(parents=True)
    (tmp_path / "hydra" / "job_logging" / "mine.yaml").write_text("version: 1\n")
    check_overrides(["--config-dir", str(tmp_path), "hydra/job_logging=mine"])  # a user's own option
    check_overrides(["hydra/job_logging=stdout", "-m", "hydra/sweeper=optuna"])  # Hydra's and a plugin's


def test_options_go_before_the_settings_with_their_values():
    args = ["model=small", "--cfg", "job", "train.seed=3", "-p", "train", "-m", "--info", "optim.lr=1", "-i", "plugins"]
    assert options_first(args) == [
        "--cfg", "job", "-p", "train", "-m", "--info", "all", "-i", "plugins",
        "model=small", "train.seed=3", "optim.lr=1",
    ]  # fmt: skip
    assert options_first(["model=small", "--info"]) == ["--info", "all", "model=small"]  # its default, said
    assert options_first(["--config-dir=conf", "x=1", "-cd", "more", "y=2"]) == [
        "--config-dir=conf",
        "-cd",
        "more",
        "x=1",
        "y=2",
    ]


def test_config_groups_of_a_config_dir_pass_the_precheck(tmp_path):
    (tmp_path / "dataset").mkdir()
    with pytest.raises(FluxtrainError, match="^dataset is not a fluxtrain setting"):
        check_overrides(["dataset=poems"])
    check_overrides(["--config-dir", str(tmp_path), "dataset=poems"])
    check_overrides([f"--config-dir={tmp_path}", "dataset=poems"])


def test_a_config_dir_file_that_is_not_yaml_is_named_with_its_line(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "bad.yaml").write_text("d_model: [1\n  n_heads: 2\n")
    with pytest.raises(FluxtrainError, match=r"bad.yaml, line 2, column 10 is not valid YAML \(expected ',' or ']'"):
        check_overrides(["--config-dir", str(tmp_path), "model=bad"])


def test_a_mistyped_setting_on_the_command_line_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "fluxtrain", "model=small", "train.max_iter=5", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "error: train.max_iter is not a fluxtrain setting (did you mean train.max_iters?)\n"
    assert not (tmp_path / "run").exists()


def test_unknown_preset_fails():
    with pytest.raises(ConfigCompositionException, match="huge"):
        compose_config(["model=huge"])


@pytest.mark.parametrize("override", ["experiment=shakespeare_cpux", "hparams_search=lr_optunax"])
def test_unknown_experiment_or_search_fails(override):
    """A misspelt experiment must not train the default model instead."""
    group, name = override.split("=")
    with pytest.raises(ConfigCompositionException, match=f"{group}/{name}"):
        compose_config([override])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_heads": 3}, "model.n_heads=3 must divide model.d_model=256"),
        ({"d_model": 0}, "model.d_model=0"),
        ({"dropout": 1.5}, "model.dropout=1.5"),
        ({"norm": "batchnorm"}, "model.norm='batchnorm' is not one of layernorm, rmsnorm"),
    ],
)
def test_impossible_model_shapes_are_named(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**changes).validate()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"batch_size": 0}, "train.batch_size=0"),
        ({"precision": "fp8"}, "train.precision='fp8'"),
        ({"threads": -1}, r"train.threads=-1 must be from 0 to \d+, the CPU cores here \(0: torch's default\)"),
        ({"threads": 100000}, r"train.threads=100000 must be from 0 to \d+"),
        ({"seed": 2**32}, r"train.seed=4294967296 must be an integer from 0 to 2\*\*32 - 1"),
        ({"seed": -1}, r"train.seed=-1 must be an integer from 0 to 2\*\*32 - 1"),
        ({"keep_last": -1}, r"^train.keep_last=-1 must be >= 0 \(0 = keep all\)$"),
        ({"ckpt_interval": -1}, r"^train.ckpt_interval=-1 must be >= 0 \(0 = only at the end\)$"),
        ({"sample_interval": -1}, r"^train.sample_interval=-1 must be >= 0 \(0 = no samples\)$"),
        ({"sample_len": -1}, r"^train.sample_len=-1 must be >= 0 \(0 = no samples\)$"),
    ],
)
def test_bad_train_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(**changes))


def test_cfg_job_prints_composed_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "fluxtrain", "--cfg", "job", "model=small", "optim.lr=1e-3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "d_model: 128" in out and "lr: 0.001" in out


def test_user_config_dir_adds_presets(tmp_path):
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "tiny.yaml").write_text("d_model: 48\nn_heads: 3\nn_layers: 1\nff_dim: 96\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "fluxtrain", "--config-dir", "my_conf", "model=tiny", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "d_model: 48" in out and "n_heads: 3" in out and "seq_len: 64" in out


def test_help_says_what_the_command_does_and_lists_the_groups():
    proc = run_fluxtrain("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("fluxtrain: train a GPT-style language model")
    assert "python -m fluxtrain -m optim.lr=1e-3,3e-3" in proc.stdout
    assert "experiment: shakespeare_cpu, shakespeare_cpu_bf16, shakespeare_gpu" in proc.stdout
    assert "model: gpt2, gpt2-large, gpt2-medium, large, medium, small" in proc.stdout
    assert "  d_model: 256" in proc.stdout  # the composed config
    assert proc.stdout.rstrip().endswith("Hydra's own\noptions: --hydra-help.")


def test_lr_find_help_describes_the_range_test():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        lr_find = compose(config_name="lr_find", return_hydra_config=True)
        train = compose(config_name="config", return_hydra_config=True)
    assert lr_find.task == "lr_find" and lr_find.hydra.help.app_name == "fluxtrain-lr-find"
    assert lr_find.hydra.help.header.startswith("fluxtrain-lr-find: the learning-rate range test")
    assert train.hydra.help.header.startswith("fluxtrain: train a GPT-style language model")


def test_compose_builds_the_config_the_command_line_would_run_and_checks_it_alike(tiny_text_file, tmp_path):
    overrides = ["model=small", "experiment=shakespeare_cpu", f"data.path={tiny_text_file}", "optim.lr=1e-3"]
    assert compose(overrides) == compose_config(overrides)
    for bad, message in [
        (["model.d_modl=64"], "model.d_modl is not a fluxtrain setting (did you mean model.d_model?)"),
        (["model=huge"], "model=huge is not an option of model; its options: gpt2,"),
        (["optim.lr=1e-3,1e-2"], "optim.lr=1e-3,1e-2: compose makes one config; compose one per value, or sweep"),
        (["hparams_search=lr_optuna"], "hparams_search=lr_optuna: compose makes one config"),
        ("model=small", "overrides: give a list of settings, e.g. ['model=small'], not one text"),
        (["hydra.run.dir=x"], "hydra.run.dir=x: Hydra's settings are the command line's; train(cfg, run_dir) takes"),
        (["hydra/job_logging=none"], "hydra/job_logging=none: Hydra's settings are the command line's"),
        (["hydrate=1"], "hydrate is not a fluxtrain setting"),
        (None, "overrides: give a list of settings such as ['model=small'], not NoneType"),
        (["-m"], "overrides: '-m' is not a setting (key=value)"),
        ([3], "overrides: 3 is not a setting (key=value)"),
    ]:
        with pytest.raises(FluxtrainError) as info:
            compose(bad)
        assert str(info.value).startswith(message), str(info.value)
    assert compose(["~hparams_search"]) == compose([])  # no search: one config
    with pytest.raises(FluxtrainError, match="^hparams_search=null is not an option of hparams_search; choose one of"):
        compose(["hparams_search=null"])  # as on the command line
