"""Model files: a save/load round trip gives identical logits; damaged and foreign files give one-line errors."""

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fluxtrain import load_model, save_model_file
from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.tokenizer import CharTokenizer


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    tokenizer = CharTokenizer.train("hello world, good night\n")
    model = GPT(
        ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=16, dropout=0.1), tokenizer.vocab_size
    )
    path = tmp_path / "model.safetensors"
    save_model_file(path, model, tokenizer)
    return model.eval(), tokenizer, path


def test_round_trip_gives_identical_logits(saved):
    model, tokenizer, path = saved
    loaded, loaded_tok = load_model(path)
    x = torch.tensor([tokenizer.encode("hello night")])
    assert torch.equal(model(x)[0], loaded(x)[0])
    assert loaded.cfg == model.cfg and loaded_tok.decode(loaded_tok.encode("good world")) == "good world"
    assert loaded.head.weight is loaded.tok_emb.weight


def test_compiled_model_saves_plain_keys(saved, tmp_path):
    model, tokenizer, _ = saved
    path = tmp_path / "compiled.safetensors"
    save_model_file(path, torch.compile(model), tokenizer)  # wrapping only: nothing is compiled until called
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert not [k for k in f.keys() if k.startswith(("_orig_mod.", "module."))]
    load_model(path)


def test_paths_under_home_and_empty_paths_as_the_commands_take_them(saved, tmp_path, monkeypatch):
    from fluxtrain.runs import find_runs, read_scalars
    from fluxtrain.tokenizer import load_tokenizer

    model, tokenizer, _ = saved
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    save_model_file("~/m.safetensors", model, tokenizer)
    tokenizer.save("~/t.json")
    assert sorted(p.name for p in home.iterdir()) == ["m.safetensors", "t.json"] and not list(elsewhere.iterdir())
    assert load_model("~/m.safetensors")[0].cfg == model.cfg
    assert load_tokenizer("~/t.json").vocab_size == tokenizer.vocab_size
    assert find_runs("~") == [] and read_scalars("~", "train/loss") == ([], [])
    for call, what in (
        (lambda: load_model(""), "model file"),
        (lambda: save_model_file("", model, tokenizer), "model file"),
        (lambda: tokenizer.save(""), "tokenizer file"),
        (lambda: find_runs(""), "runs folder"),
    ):
        with pytest.raises(FluxtrainError, match=f"^{what} '': the path is empty$"):
            call()
    for call, what in (  # Path("") is Path("."): no file's name
        (lambda: load_model(Path("")), "model file"),
        (lambda: save_model_file(Path(""), model, tokenizer), "model file"),
        (lambda: tokenizer.save(Path("..")), "tokenizer file"),
    ):
        with pytest.raises(FluxtrainError, match=rf"^{what} '\.\.?' names a folder, not a file$"):
            call()


def test_a_model_that_does_not_fit_in_memory_is_said_so_not_called_damaged(saved, monkeypatch):
    from safetensors import SafetensorError

    import fluxtrain.model_file as model_file_module

    _, _, path = saved
    mmap_failed = SafetensorError(
        "Error while deserializing header: unable to mmap: Cannot allocate memory (os error 12)"
    )
    monkeypatch.setattr(model_file_module, "safe_open", lambda *a, **k: (_ for _ in ()).throw(mmap_failed))
    with pytest.raises(FluxtrainError, match=f"^model file {re.escape(str(path))} does not fit in memory \\("):
        load_model(path)
    monkeypatch.undo()

    def out_of_memory(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 16777216 bytes.")

    monkeypatch.setattr(model_file_module, "build_from_metadata", out_of_memory)
    with pytest.raises(FluxtrainError, match=f"^model file {re.escape(str(path))} does not fit in memory on cpu \\("):
        load_model(path)


def test_missing_empty_truncated_and_foreign_files(saved, tmp_path):
    _, _, path = saved
    with pytest.raises(FluxtrainError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(FluxtrainError, match="is empty"):
        load_model(empty)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FluxtrainError, match=f"{truncated} is not a readable safetensors model file"):
        load_model(truncated)
    random_file = tmp_path / "random.safetensors"
    random_file.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(FluxtrainError, match="not a readable safetensors"):
        load_model(random_file)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(FluxtrainError, match="not a fluxtrain model file"):
        load_model(foreign)


def rewritten(path, tmp_path, name: str, meta_changes: dict | None = None, tensor_changes: dict | None = None):
    """A copy of the model file with some metadata or tensors replaced (and no checksum, which would catch it)."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = {k: v for k, v in {**meta, **(meta_changes or {})}.items() if k != "sha256" and v is not None}  # None: gone
    out = tmp_path / name
    save_file({**tensors, **(tensor_changes or {})}, str(out), metadata=meta)
    return out


def test_loading_a_model_file_leaves_torch_s_compiler_unloaded(saved):
    """The shape check builds the model on the meta device without drawing weights: drawing them there imports
    torch._dynamo, a second of every command that loads a model."""
    code = (
        "import sys\n"
        "from fluxtrain import load_model\n"
        f"model, _ = load_model({str(saved[2])!r})\n"
        "print(sum(p.numel() for p in model.parameters()), 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(sum(p.numel() for p in saved[0].parameters())), "False"]


def test_newer_format_wrong_shapes_and_unknown_config_keys_are_named(saved, tmp_path):
    model, tokenizer, path = saved
    same, same_tokenizer = load_model(rewritten(path, tmp_path, "same.safetensors"))  # an intact file, no checksum
    assert same_tokenizer.vocab_size == tokenizer.vocab_size
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values(), strict=True))
    newer = rewritten(path, tmp_path, "newer.safetensors", {"format_version": "2"})
    with pytest.raises(FluxtrainError, match=f"^{newer} has format version 2; this fluxtrain reads version 1$"):
        load_model(newer)
    reshaped = rewritten(
        path, tmp_path, "shape.safetensors", tensor_changes={"blocks.0.mlp.fc.weight": torch.zeros(8, 8)}
    )
    with pytest.raises(FluxtrainError, match=r"weight blocks\.0\.mlp\.fc\.weight has shape \(8, 8\), the model needs"):
        load_model(reshaped)
    config = json.loads(safe_open(str(path), framework="pt").metadata()["model_config"])
    unknown = rewritten(path, tmp_path, "keys.safetensors", {"model_config": json.dumps({**config, "d_modl": 64})})
    with pytest.raises(FluxtrainError, match=r"model config has unknown keys \['d_modl'\]"):
        load_model(unknown)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"d_model": "abc"}, r"model config has d_model='abc', which is not an integer"),
        ({"dropout": "x"}, r"model config has dropout='x', which is not a number"),
        ({"bias": 1}, r"model config has bias=1, which is not true or false"),
        ({"n_heads": 3}, r"model.n_heads=3 must divide model.d_model=32"),
        ({"seq_len": 10**9, "pos_emb": "rope"}, r"model.seq_len=1000000000 must be at most 1,048,576"),
        ({"n_layers": None}, r"its model config has no n_layers"),
    ],
)
def test_damaged_model_configs_are_named_with_the_file(saved, tmp_path, changes, message):
    _, _, path = saved
    config = json.loads(safe_open(str(path), framework="pt").metadata()["model_config"])
    config = {k: v for k, v in {**config, **changes}.items() if v is not None}  # None: the key is gone
    bad = rewritten(path, tmp_path, "bad.safetensors", {"model_config": json.dumps(config)})
    with pytest.raises(FluxtrainError, match=f"^{bad}: {message}$"):
        load_model(bad)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tokenizer": None}, "damaged model metadata: it has no 'tokenizer' entry"),
        ({"model_config": None}, "damaged model metadata: it has no 'model_config' entry"),
        ({"vocab_size": "abc"}, "damaged model metadata: vocab_size='abc' is not a count"),
        ({"model_config": "{not json"}, r"damaged model metadata \(JSONDecodeError: Expecting property name"),
        # Deeper than Python's recursion limit: json.loads raised RecursionError, which no reader expected.
        ({"model_config": "[" * 100_000 + "]" * 100_000}, r"damaged model metadata \(ValueError: JSON nested too deep"),
        ({"tokenizer": "[" * 100_000 + "]" * 100_000}, r"damaged model metadata \(ValueError: JSON nested too deeply"),
    ],
)
def test_damaged_metadata_entries_are_named_in_words(saved, tmp_path, changes, message):
    _, _, path = saved
    bad = rewritten(path, tmp_path, "bad.safetensors", changes)
    with pytest.raises(FluxtrainError, match=f"^{bad}: {message}"):
        load_model(bad)


def test_metadata_that_claims_another_model_than_the_weights_is_refused_before_building_it(saved, tmp_path):
    _, tokenizer, path = saved
    meta = safe_open(str(path), framework="pt").metadata()
    config = json.loads(meta["model_config"])
    # A 48-layer, width-4096 model would take 39 GB: the weights in the file decide before anything is allocated.
    huge = rewritten(
        path, tmp_path, "huge.safetensors", {"model_config": json.dumps({**config, "n_layers": 48, "d_model": 4096})}
    )
    with pytest.raises(FluxtrainError, match=f"^{huge}: its model config has n_layers=48, its weights 2 blocks$"):
        load_model(huge)
    wider = rewritten(path, tmp_path, "wide.safetensors", {"model_config": json.dumps({**config, "d_model": 4096})})
    with pytest.raises(FluxtrainError, match=f"^{wider}: weight tok_emb.weight has shape"):
        load_model(wider)
    # A billion blocks took minutes and gigabytes to lay out on the meta device before the weights were compared.
    deep = rewritten(path, tmp_path, "deep.safetensors", {"model_config": json.dumps({**config, "n_layers": 10**9})})
    started = time.perf_counter()
    with pytest.raises(FluxtrainError, match=f"^{deep}: its model config has n_layers=1000000000, its weights 2"):
        load_model(deep)
    assert time.perf_counter() - started < 10
    wide = rewritten(path, tmp_path, "vocab.safetensors", {"vocab_size": str(10**8)})
    with pytest.raises(FluxtrainError, match=f"^{wide}: its tokenizer has {tokenizer.vocab_size} tokens, its model"):
        load_model(wide)
    small = CharTokenizer.train("abc")
    other = rewritten(path, tmp_path, "tok.safetensors", {"tokenizer": small.to_json()})
    with pytest.raises(
        FluxtrainError, match=f"^{other}: its tokenizer has 3 tokens, its model {tokenizer.vocab_size}$"
    ):
        load_model(other)


def test_weights_that_are_not_finite_are_refused(saved, tmp_path):
    model, _, path = saved
    weight = model.state_dict()["blocks.1.attn.proj.weight"].clone()
    weight[0, 0] = float("nan")
    nan = rewritten(path, tmp_path, "nan.safetensors", tensor_changes={"blocks.1.attn.proj.weight": weight})
    with pytest.raises(FluxtrainError, match=f"^{nan}: weight blocks.1.attn.proj.weight holds NaN or infinite values$"):
        load_model(nan)


@pytest.mark.parametrize(
    ("dtype", "loads"),
    [
        (torch.float16, True),
        (torch.bfloat16, True),
        (torch.int64, False),
        (torch.bool, False),
        (torch.float8_e4m3fn, False),
    ],
)
def test_weights_stored_as_another_dtype_load_exactly_or_are_named(saved, tmp_path, dtype, loads):
    """Half-precision weights load as the float32 values they hold; integers, booleans and float8 (whose NaNs torch
    cannot even look for) are no fluxtrain weights, whatever the metadata says."""
    model, _, path = saved
    name = "blocks.0.mlp.fc.weight"
    stored = model.state_dict()[name].to(dtype)
    changed = rewritten(path, tmp_path, "dtype.safetensors", tensor_changes={name: stored})
    if loads:
        assert torch.equal(load_model(changed)[0].state_dict()[name], stored.float())
        return
    with pytest.raises(FluxtrainError) as info:
        load_model(changed)
    assert str(info.value) == (
        f"{changed}: weight {name} is stored as {str(dtype).removeprefix('torch.')}; "
        "weights are float32, bfloat16, float16, float64"
    )


def test_a_model_config_too_large_for_torch_is_a_one_line_error(saved, tmp_path):
    _, _, path = saved
    config = json.loads(safe_open(str(path), framework="pt").metadata()["model_config"])
    huge = rewritten(path, tmp_path, "huge.safetensors", {"model_config": json.dumps({**config, "d_model": 10**30})})
    with pytest.raises(FluxtrainError) as info:
        load_model(huge)
    message = str(info.value)
    assert message.startswith(f"{huge}: its model config describes no buildable model (") and "\n" not in message


def test_a_path_that_is_no_regular_file_is_named_as_such(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(FluxtrainError, match=f"^model file {fifo} is not a regular file$"):
        load_model(fifo)


def test_a_file_it_may_not_read_is_named_as_such(saved, monkeypatch):
    """safetensors reports EACCES as "No such file or directory"; the file is opened first to say what is wrong (root
    reads any file, so the refusal is simulated)."""
    _, _, path = saved
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("fluxtrain.model_file.open", refusing_open, raising=False)
    with pytest.raises(FluxtrainError, match=f"^model file {path} cannot be read: Permission denied$"):
        load_model(path)


def test_saving_refuses_what_loading_would_refuse(saved, tmp_path):
    model, tokenizer, _ = saved
    path, refused = tmp_path / "out.safetensors", r"^out.safetensors was not written: "
    with pytest.raises(FluxtrainError, match=refused + "the tokenizer has 3 tokens, the model"):
        save_model_file(path, model, CharTokenizer.train("abc"))
    for extra, problem in (
        ({"vocab_size": "60"}, "extra may not set 'vocab_size', which the file describes"),
        ({"format": "mine"}, "extra may not set 'format', which the file describes"),
        ({"iteration": 5}, "extra['iteration']=5; its keys and values are texts"),
    ):
        with pytest.raises(FluxtrainError, match=refused + re.escape(problem) + "$"):
            save_model_file(path, model, tokenizer, extra)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.blocks[0].mlp.fc.weight[0, 0] = float("nan")
    with pytest.raises(
        FluxtrainError, match=r"^out.safetensors was not written: weight blocks.0.mlp.fc.weight holds NaN"
    ):
        save_model_file(path, broken, tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # the fixture's; nothing else
    save_model_file(path, model, tokenizer, {"iteration": "5"})
    assert load_model(path)[1].vocab_size == tokenizer.vocab_size


def test_saving_refuses_weights_the_config_does_not_rebuild_and_what_is_no_model_or_tokenizer(saved, tmp_path):
    _, _, fixture_file = saved
    model, tokenizer = load_model(fixture_file)
    path, refused = tmp_path / "out.safetensors", r"^out.safetensors was not written: "
    model.extra = torch.nn.Linear(2, 2)  # added after it was built: load_model would refuse the file
    with pytest.raises(FluxtrainError, match=refused + r"the model has extra.bias, extra.weight, which a GPT built"):
        save_model_file(path, model, tokenizer)
    del model.extra
    block = model.blocks[1]
    del model.blocks[1]
    with pytest.raises(
        FluxtrainError, match=refused + r"the model lacks blocks.1.attn.proj.bias, .* and 7 more, which"
    ):
        save_model_file(path, model, tokenizer)
    model.blocks.append(block)
    fc = model.blocks[0].mlp.fc
    model.blocks[0].mlp.fc = torch.nn.Linear(32, 80)
    with pytest.raises(
        FluxtrainError,
        match=refused + r"weight blocks.0.mlp.fc.weight has shape \(80, 32\); a GPT built from the model's",
    ):
        save_model_file(path, model, tokenizer)
    model.blocks[0].mlp.fc = fc
    for args, problem in (
        ((model, None), "tokenizer must be a CharTokenizer or BPETokenizer, not NoneType"),
        ((model, "abc"), "tokenizer must be a CharTokenizer or BPETokenizer, not str"),
        ((torch.nn.Linear(2, 2), tokenizer), "model must be a fluxtrain GPT, not Linear"),
    ):
        with pytest.raises(FluxtrainError, match=refused + problem + "$"):
            save_model_file(path, *args)
    assert not path.exists()
    save_model_file(path, model, tokenizer)  # put back as built: written, and loads
    assert load_model(path)[0].cfg == model.cfg
