"""Export to Hugging Face transformers: same logits, same tokenization, same greedy text, and clear refusals."""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxtrain.errors import FluxtrainError
from fluxtrain.export import export, main, to_transformers, write_folder
from fluxtrain.generate import generate_ids
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.model_file import save_model_file
from fluxtrain.runs import ITERATION_KEY
from fluxtrain.tokenizer import BPETokenizer, CharTokenizer

from .conftest import REPO_ROOT, make_text

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed; pip install -e '.[hf]' to run the export tests"
)

SEQ_LEN = 16
TEXT = make_text(3_000) + "Some other marks: ?!;,'-é\t\r"


def tiny_model(vocab_size: int, **overrides) -> GPT:
    """A tiny model whose every weight, bias and norm parameter is random, so a misplaced one changes the logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{"d_model": 32, "n_heads": 2, "n_layers": 2, "ff_dim": 64, "seq_len": SEQ_LEN, **overrides})
    model = GPT(cfg, vocab_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def export_and_load(folder, tokenizer, **overrides):
    """A tiny model for `tokenizer`, written to a model file, exported, and loaded back with the Auto classes."""
    model = tiny_model(tokenizer.vocab_size, **overrides)
    save_model_file(folder / "model.safetensors", model, tokenizer)
    export(folder / "model.safetensors", folder / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder / "hf")
    return model, tokenizer, hf_model.eval(), hf_tok


@pytest.fixture(scope="module")
def char_export(tmp_path_factory):
    return export_and_load(tmp_path_factory.mktemp("char"), CharTokenizer.train(TEXT), dropout=0.1)


@pytest.fixture(scope="module")
def bpe_export(tmp_path_factory):
    return export_and_load(tmp_path_factory.mktemp("bpe"), BPETokenizer.train(TEXT, vocab_size=300))


def max_logit_difference(model: GPT, hf_model, n_prompts: int = 6) -> float:
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    with torch.no_grad():
        for _ in range(n_prompts):
            length = int(torch.randint(1, SEQ_LEN + 1, (1,), generator=generator))
            x = torch.randint(0, model.vocab_size, (3, length), generator=generator)
            worst = max(worst, (model(x)[0] - hf_model(x).logits).abs().max().item())
    return worst


def greedy_texts(model: GPT, tokenizer, hf_model, hf_tok, prompt: str) -> tuple[str, str]:
    ids = tokenizer.encode(prompt)
    n_new = SEQ_LEN - len(ids)  # stay within the context length
    ours = generate_ids(model, ids, n_new, temperature=0)
    x = torch.tensor([ids])
    out = hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n_new)
    theirs = out[0, len(ids) :].tolist()
    if hf_tok.eos_token_id is not None and hf_tok.eos_token_id in ours:  # transformers stops at the end of text
        ours = ours[: ours.index(hf_tok.eos_token_id) + 1]
    assert len(theirs) == len(ours)
    return tokenizer.decode(ours), hf_tok.decode(theirs)


def test_char_export_loads_as_gpt2_and_gives_the_same_logits(char_export):
    model, _, hf_model, hf_tok = char_export
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert hf_model.config.n_positions == SEQ_LEN and hf_model.config.attn_pdrop == 0.1
    assert max_logit_difference(model, hf_model) < 1e-4


def test_bpe_export_gives_the_same_logits(bpe_export):
    model, _, hf_model, hf_tok = bpe_export
    assert type(hf_model).__name__ == "GPT2LMHeadModel" and hf_model.config.vocab_size == 300
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert max_logit_difference(model, hf_model) < 1e-4


def byte_level_bpe(special_token: str):
    """A `tokenizers` byte-level BPE of 300 ids trained on TEXT, with one special token (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[special_token], initial_alphabet=alphabet)
    hf.train_from_iterator([TEXT], trainer)
    return hf


def test_bpe_end_of_text_token_becomes_bos_and_eos():
    hf = byte_level_bpe("<|endoftext|>")
    tokenizer = BPETokenizer(hf)
    hf_model, hf_tok = to_transformers(tiny_model(tokenizer.vocab_size), tokenizer)
    eot = hf.token_to_id("<|endoftext|>")
    assert hf_tok.eos_token == hf_tok.bos_token == "<|endoftext|>"
    assert hf_model.config.eos_token_id == hf_model.config.bos_token_id == eot
    ids = tokenizer.encode("KING:<|endoftext|>ROMEO:")
    assert eot in ids and hf_tok("KING:<|endoftext|>ROMEO:")["input_ids"] == ids
    assert hf_tok.decode(ids) == tokenizer.decode(ids)


def test_a_post_processor_that_adds_a_bos_token_is_left_out_so_the_ids_are_fluxtrains(tmp_path):
    from tokenizers import processors

    hf = byte_level_bpe("<|begin_of_text|>")
    hf.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tokenizer = BPETokenizer(hf)
    assert hf.encode("ROMEO:\n").ids[0] == 0  # the tokenizer file adds it; fluxtrain does not
    _, _, _, hf_tok = export_and_load(tmp_path, tokenizer)
    assert hf_tok("ROMEO:\n")["input_ids"] == tokenizer.encode("ROMEO:\n") and 0 not in tokenizer.encode("ROMEO:\n")


@pytest.mark.parametrize("overrides", [{"bias": False}, {"activation": "relu2"}, {"dropout": 0.2, "n_layers": 3}])
def test_variants_with_a_gpt2_equivalent_give_the_same_logits(overrides):
    tokenizer = CharTokenizer.train(TEXT)
    model = tiny_model(tokenizer.vocab_size, **overrides)
    hf_model, _ = to_transformers(model, tokenizer)
    assert max_logit_difference(model, hf_model) < 1e-4


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=sorted(set(TEXT)), max_size=80))
def test_exported_char_tokenizer_encodes_and_decodes_identically(char_export, text):
    _, tokenizer, _, hf_tok = char_export
    ids = tokenizer.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.decode(ids) == tokenizer.decode(ids) == text
    assert hf_tok.decode(ids, skip_special_tokens=True) == text


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80))
def test_exported_bpe_tokenizer_encodes_and_decodes_identically(bpe_export, text):
    _, tokenizer, _, hf_tok = bpe_export
    ids = tokenizer.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.decode(ids) == tokenizer.decode(ids)


@pytest.mark.parametrize("prompt", ["\n", "ROMEO:\nthe ", "KING"])
def test_greedy_generation_gives_the_same_text(char_export, bpe_export, prompt):
    for exported in (char_export, bpe_export):
        ours, theirs = greedy_texts(*exported, prompt)
        assert ours == theirs
        assert len(ours) > 0


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"norm": "rmsnorm"}, ["model.norm=rmsnorm"]),
        ({"pos_emb": "rope"}, ["model.pos_emb=rope"]),
        ({"activation": "swiglu"}, ["model.activation=swiglu"]),
        (
            {"norm": "rmsnorm", "pos_emb": "rope", "activation": "swiglu"},
            ["model.norm=rmsnorm", "model.pos_emb=rope", "model.activation=swiglu"],
        ),
    ],
)
def test_blocks_without_a_gpt2_equivalent_are_named_and_nothing_is_written(tmp_path, capsys, overrides, named):
    tokenizer = CharTokenizer.train(TEXT)
    save_model_file(tmp_path / "model.safetensors", tiny_model(tokenizer.vocab_size, **overrides), tokenizer)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "model.safetensors"), str(tmp_path / "hf")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(name in err for name in named)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_without_transformers_export_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(SystemExit):
        main([str(tmp_path / "model.safetensors"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install" in err and "[hf]" in err


def test_cli_writes_a_folder_and_refuses_to_mix_into_a_non_empty_one(tmp_path, capsys):
    tokenizer = CharTokenizer.train(TEXT)
    model_file, out = tmp_path / "model.safetensors", tmp_path / "hf"
    save_model_file(model_file, tiny_model(tokenizer.vocab_size), tokenizer)
    proc = subprocess.run(
        [sys.executable, "-m", "fluxtrain.export", str(model_file), str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # readable by others as the umask allows, not private
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == dict.fromkeys(names, 0o666 & ~umask)
    with pytest.raises(SystemExit):
        main([str(model_file), str(out)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
    main([str(model_file), str(out), "--overwrite"])
    assert {p.name for p in out.iterdir()} == names
    assert not list(tmp_path.glob(".hf.*"))  # no temporary folders left behind


def test_cli_names_the_model_file_a_run_folder_holds_and_its_iteration(tmp_path, capsys):
    tokenizer = CharTokenizer.train(TEXT)
    run = tmp_path / "run"
    save_model_file(run / "model_final.safetensors", tiny_model(tokenizer.vocab_size), tokenizer)
    save_model_file(run / "best.safetensors", tiny_model(tokenizer.vocab_size), tokenizer, {ITERATION_KEY: "300"})
    main([str(run), str(tmp_path / "hf")])
    assert capsys.readouterr().out.startswith(
        f"wrote {tmp_path / 'hf'} from {run / 'best.safetensors'} (iteration 300): "
    )
    main([str(run / "model_final.safetensors"), str(tmp_path / "hf2")])
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'hf2'} from {run / 'model_final.safetensors'}: ")


def test_overwrite_replaces_the_whole_earlier_export_and_refuses_other_folders(tmp_path, capsys):
    tokenizer = CharTokenizer.train(TEXT)
    model_file, out = tmp_path / "model.safetensors", tmp_path / "hf"
    save_model_file(model_file, tiny_model(tokenizer.vocab_size), tokenizer)
    export(model_file, out)
    names = {p.name for p in out.iterdir()}
    (out / "special_tokens_map.json").write_text("{}")  # a file an earlier export (of a BPE model) wrote
    assert export(model_file, out, overwrite=True) == out
    assert {p.name for p in out.iterdir()} == names  # nothing of the earlier export is left to be read
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf.")]

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        main([str(model_file), str(notes), "--overwrite"])
    err = capsys.readouterr().err
    assert err.startswith(f"error: OUT_DIR {notes} does not hold an earlier export") and err.count("\n") == 1
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


def test_overwrite_keeps_an_earlier_export_that_holds_other_files(tmp_path, capsys):
    """The model file exported from the export's own folder, or notes beside an export, are not the export's: a
    config.json of GPT-2 does not make them safe to delete."""
    tokenizer = CharTokenizer.train(TEXT)
    out = tmp_path / "hf"
    model_file = out / "model_v2.safetensors"
    export_and_load(tmp_path, tokenizer)
    save_model_file(model_file, tiny_model(tokenizer.vocab_size), tokenizer)
    (out / "plots").mkdir()
    names = sorted(p.name for p in out.iterdir())
    capsys.readouterr()  # transformers' progress bars while loading the export
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_file), str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: OUT_DIR {out} holds an earlier export and other files (model_v2.safetensors, plots)")
    assert sorted(p.name for p in out.iterdir()) == names


def test_the_current_folder_is_refused_as_out_dir(tmp_path, capsys, monkeypatch):
    """An export takes its folder's place whole, which the current folder cannot give up (it failed with 'Device or
    resource busy')."""
    tokenizer = CharTokenizer.train(TEXT)
    model_file = tmp_path / "model.safetensors"
    save_model_file(model_file, tiny_model(tokenizer.vocab_size), tokenizer)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_file), "."])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: OUT_DIR . is the current folder or holds it; export into a new folder\n"
    with pytest.raises(SystemExit):
        main([str(model_file), " "])
    assert capsys.readouterr().err == "error: OUT_DIR is empty; give a new folder to export into\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model.safetensors"]


def test_a_quantized_model_is_not_exported():
    from fluxtrain.quantize import quantize_int8

    with pytest.raises(FluxtrainError, match="^model: the model has int8 weights"):
        to_transformers(quantize_int8(tiny_model(10)), CharTokenizer(list("abcdefghij")))


@pytest.mark.parametrize("failing", ["the earlier export aside", "the new export into its place"])
def test_a_failed_swap_keeps_the_earlier_export_and_leaves_no_temporary_folders(tmp_path, monkeypatch, failing):
    out = tmp_path / "hf"
    write_folder(out, lambda folder: (folder / "config.json").write_text("earlier"))
    real_replace = os.replace

    def replace(src, dst):
        moving = "the new export into its place" if Path(src).name.endswith(".tmp") else "the earlier export aside"
        if moving == failing:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr("fluxtrain.export.os.replace", replace)
    with pytest.raises(OSError, match="No space left"):
        write_folder(out, lambda folder: (folder / "config.json").write_text("new"))
    assert (out / "config.json").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_in_memory_matches_the_file_round_trip(char_export):
    model, tokenizer, hf_model, _ = char_export
    in_memory, _ = to_transformers(model, tokenizer)
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(tensor, hf_model.state_dict()[name]), name


def test_unknown_tokenizer_kind_is_refused():
    class Odd:
        kind = "odd"

    with pytest.raises(FluxtrainError, match="'odd'"):
        to_transformers(tiny_model(10), Odd())


def test_an_out_dir_that_cannot_be_written_or_is_a_run_folder_is_refused_before_converting(
    tmp_path, capsys, monkeypatch
):
    tokenizer = CharTokenizer.train(TEXT)
    model_file = tmp_path / "run" / "best.safetensors"
    save_model_file(model_file, tiny_model(tokenizer.vocab_size), tokenizer)
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr("fluxtrain.export.load_model", lambda *a: pytest.fail("the model was loaded"))
    for out, message in (
        (
            tmp_path / "a_file" / "hf",
            f"OUT_DIR {tmp_path / 'a_file' / 'hf'} cannot be written: {tmp_path / 'a_file'} is a file",
        ),
        (
            Path("/proc/nope/hf"),
            "OUT_DIR /proc/nope/hf cannot be written: cannot create a file in /proc (No such file or directory)",
        ),
        (
            tmp_path / "run",
            f"OUT_DIR {tmp_path / 'run'} is a run folder (it holds fluxtrain model files or checkpoints)",
        ),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([str(model_file), str(out), "--overwrite"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1
        assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.safetensors"]


def test_ctrl_c_writes_nothing_and_exits_130(tmp_path, capsys, monkeypatch):
    tokenizer = CharTokenizer.train(TEXT)
    save_model_file(tmp_path / "model.safetensors", tiny_model(tokenizer.vocab_size), tokenizer)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("fluxtrain.export.check_same_logits", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "model.safetensors"), str(tmp_path / "hf")])
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted: nothing was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize(
    ("limit", "shape"),
    [(6_000, {}), (9_000, {"d_model": 4, "ff_dim": 8, "n_layers": 1})],
    ids=["weights", "tokenizer"],
)
def test_a_full_disk_is_one_line_and_leaves_no_folder(tmp_path, limit, shape):
    """A file-size limit stands in for a full disk: safetensors (the weights, 117 kB or 8 kB here) and tokenizers
    (tokenizer.json, 11 kB) write from Rust and report it as errors of their own, not as OSError."""
    tokenizer = BPETokenizer.train(make_text(20_000), vocab_size=600)
    model_file = tmp_path / "model.safetensors"
    save_model_file(model_file, tiny_model(tokenizer.vocab_size, **shape), tokenizer)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "fluxtrain.export", str(model_file), str(tmp_path / "hf")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: OUT_DIR {tmp_path / 'hf'} cannot be written: ")
    assert "too large" in proc.stderr.lower() and proc.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no folder, no temporary one
