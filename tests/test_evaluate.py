"""Evaluation of a model file on text: window planning, sliding windows, agreement with the trainer, and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fluxtrain.data import load_corpus
from fluxtrain.errors import FluxtrainError
from fluxtrain.evaluate import count_windows, evaluate_ids, evaluate_text, main, plan_windows
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.model_file import load_model, save_model_file
from fluxtrain.runs import ITERATION_KEY
from fluxtrain.tokenizer import BPETokenizer, CharTokenizer
from fluxtrain.train import estimate_loss, train

from .conftest import REPO_ROOT, make_text

SEQ_LEN = 16


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    tokenizer = CharTokenizer.train(make_text(5_000))
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=SEQ_LEN)
    return GPT(cfg, tokenizer.vocab_size).eval(), tokenizer


@pytest.fixture
def model_file(tmp_path, tiny_model):
    path = tmp_path / "model.safetensors"
    save_model_file(path, *tiny_model)
    return path


@pytest.mark.parametrize("n_ids", [2, 10, 16, 17, 18, 33, 100, 257])
@pytest.mark.parametrize("stride", [1, 3, 8, 16])
def test_windows_score_every_token_once_with_context_from_the_stride(n_ids, stride):
    windows = plan_windows(n_ids, SEQ_LEN, stride)
    scored = []
    for start, n_scored in windows:
        length = min(SEQ_LEN, n_ids - 1)
        assert 0 <= start and start + length <= n_ids - 1  # the window and its targets lie inside the text
        targets = list(range(start + length - n_scored + 1, start + length + 1))
        scored += targets
        if start > 0:  # every window after the first gives each scored token at least seq_len - stride context
            assert targets[0] - start >= SEQ_LEN - stride
    assert scored == list(range(1, n_ids))
    assert count_windows(n_ids, SEQ_LEN, stride) == len(windows)  # the progress bar's total, without the list


def test_default_windows_do_not_overlap():
    assert plan_windows(49, SEQ_LEN) == [(0, 16), (16, 16), (32, 16)]
    # The last window is moved back to keep a full context and scores only the tokens not scored yet.
    assert plan_windows(53, SEQ_LEN) == [(0, 16), (16, 16), (32, 16), (36, 4)]


@pytest.mark.parametrize("stride", [0, SEQ_LEN + 1])
def test_bad_stride_is_an_error_naming_the_option(stride):
    with pytest.raises(FluxtrainError, match="--stride"):
        plan_windows(100, SEQ_LEN, stride)


def brute_force_loss(model: GPT, ids: list[int], context: int) -> float:
    """Mean loss of each token given at most `context` tokens before it, one forward pass per token."""
    losses = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            x = torch.tensor([ids[max(0, t - context) : t]])
            logits, _ = model(x)
            losses.append(F.cross_entropy(logits[0, -1], torch.tensor(ids[t])).item())
    return sum(losses) / len(losses)


def test_stride_one_gives_every_token_its_full_context(tiny_model):
    model, tokenizer = tiny_model
    text = make_text(60, seed=3)
    result = evaluate_text(model, tokenizer, text, stride=1, batch_size=7)
    assert result.n_scored == len(text) - 1
    assert result.loss == pytest.approx(brute_force_loss(model, tokenizer.encode(text), SEQ_LEN), abs=1e-5)


def test_non_overlapping_windows_match_a_token_by_token_reference(tiny_model):
    model, tokenizer = tiny_model
    text = make_text(4 * SEQ_LEN + 1, seed=4)
    ids = tokenizer.encode(text)
    result = evaluate_text(model, tokenizer, text, batch_size=3)
    # Each window starts afresh: the token at offset j of a window sees j tokens of context.
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, SEQ_LEN):
            for j in range(SEQ_LEN):
                logits, _ = model(torch.tensor([ids[start : start + j + 1]]))
                losses.append(F.cross_entropy(logits[0, -1], torch.tensor(ids[start + j + 1])).item())
    assert result.loss == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.bits_per_byte == pytest.approx(result.loss / math.log(2))  # ASCII: one byte per character


def test_batch_size_does_not_change_the_figures(tiny_model):
    model, tokenizer = tiny_model
    text = make_text(300, seed=5)
    a = evaluate_text(model, tokenizer, text, stride=5, batch_size=1)
    b = evaluate_text(model, tokenizer, text, stride=5, batch_size=64)
    assert a.n_scored == b.n_scored == len(text) - 1
    assert a.loss == pytest.approx(b.loss, abs=1e-6)


class FixedWindows:
    """Stands in for TokenData in the trainer's `estimate_loss`: hands out the given windows in order."""

    def __init__(self, ids: torch.Tensor, starts: list[int], seq_len: int):
        self.ids, self.starts, self.seq_len = ids, starts, seq_len
        self.next = {"train": 0, "val": 0}

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator):
        i = self.next[split]
        starts = torch.tensor(self.starts[i : i + batch_size])
        assert len(starts) == batch_size, "estimate_loss asked for more windows than planned"
        self.next[split] += batch_size
        window = self.ids[starts[:, None] + torch.arange(self.seq_len + 1)]
        return window[:, :-1], window[:, 1:]


def test_agrees_with_the_trainers_val_loss_on_the_same_windows(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    train(cfg, tmp_path / "run")
    model, tokenizer = load_model(tmp_path / "run" / "model_final.safetensors")
    data, _, _ = load_corpus(cfg.data, cfg.tokenizer, SEQ_LEN)
    val_ids = torch.from_numpy(data.val.astype(np.int64))
    # The val split as text, cut to whole windows that fill whole batches of the trainer's batch size.
    text = Path(cfg.data.path).read_text(encoding="utf-8")
    val_text = text[len(text) - len(val_ids) :]
    assert tokenizer.encode(val_text) == val_ids.tolist()
    batch_size = cfg.train.batch_size
    n_windows = (len(val_ids) - 1) // SEQ_LEN // batch_size * batch_size
    assert n_windows >= 2 * batch_size
    val_text = val_text[: n_windows * SEQ_LEN + 1]
    (tmp_path / "val.txt").write_text(val_text, encoding="utf-8")

    main(
        [str(tmp_path / "run" / "model_final.safetensors"), "--data", str(tmp_path / "val.txt"), "--device", "cpu"]
        + ["--batch-size", "5", "--json", str(tmp_path / "eval.json")]
    )
    figures = json.loads((tmp_path / "eval.json").read_text())

    starts = [start for start, _ in plan_windows(n_windows * SEQ_LEN + 1, SEQ_LEN)]
    assert starts == list(range(0, n_windows * SEQ_LEN, SEQ_LEN))
    windows = FixedWindows(val_ids, starts, SEQ_LEN)
    trainer_cfg = cfg.train.copy()
    trainer_cfg.eval_iters = n_windows // batch_size
    trainer_val = estimate_loss(model, windows, trainer_cfg, torch.device("cpu"), seed=0)["val"]
    assert windows.next["val"] == n_windows
    assert figures["loss"] == pytest.approx(trainer_val, abs=1e-4)
    assert figures["n_scored"] == n_windows * SEQ_LEN
    assert figures["perplexity"] == pytest.approx(math.exp(trainer_val), rel=1e-4)
    # The run trained: well below a uniform guess over the vocabulary.
    assert figures["loss"] < math.log(tokenizer.vocab_size) - 0.5


def test_cli_prints_figures_and_writes_json(model_file, tmp_path):
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(make_text(600, seed=7), encoding="utf-8")
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fluxtrain.evaluate", str(model_file), "--data", str(text_file)]
        + ["--device", "cpu", "--stride", "8", "--json", str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    assert figures["stride"] == 8 and figures["n_tokens"] == 600 and figures["n_bytes"] == 600
    assert f"loss {figures['loss']:.4f} nats/token" in proc.stdout
    assert f"perplexity {figures['perplexity']:.3f}" in proc.stdout
    assert f"bits per byte {figures['bits_per_byte']:.4f}" in proc.stdout


def test_folder_is_read_as_all_its_files(model_file, tmp_path, capsys):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(make_text(300, seed=1), encoding="utf-8")
    (folder / "sub" / "b.txt").write_text(make_text(300, seed=2), encoding="utf-8")
    main([str(model_file), "--data", str(folder), "--device", "cpu", "--json", "-"])
    out, err = capsys.readouterr()
    figures = json.loads(out)  # stdout holds the JSON alone; the summary lines go to stderr
    assert figures["n_tokens"] == 601  # both files, joined by a newline
    assert f"loss {figures['loss']:.4f} nats/token" in err
    main([str(model_file), "--data", str(folder / "**" / "*.txt"), "--device", "cpu", "--json", "-"])
    assert json.loads(capsys.readouterr().out)["n_tokens"] == 601  # a glob
    # A fluxtrain run folder among the texts is left out, as data.path leaves it out: its log is no text to score.
    (folder / "run" / ".hydra").mkdir(parents=True)
    (folder / "run" / "train.log").write_text(make_text(300, seed=3), encoding="utf-8")
    main([str(model_file), "--data", str(folder), "--device", "cpu", "--json", "-"])
    out, err = capsys.readouterr()
    assert json.loads(out)["n_tokens"] == 601 and "1 file(s) in fluxtrain run folders left out" in err


def test_a_run_folder_names_its_best_model_and_a_folder_is_no_model_file(model_file, tmp_path, capsys):
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(make_text(300, seed=1), encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(model_file.read_bytes())
    main([str(run), "--data", str(text_file), "--device", "cpu", "--json", "-"])
    from_run = json.loads(capsys.readouterr().out)
    main([str(model_file), "--data", str(text_file), "--device", "cpu", "--json", "-"])
    assert json.loads(capsys.readouterr().out)["loss"] == from_run["loss"]
    with pytest.raises(FluxtrainError, match=f"^model file {tmp_path} is a folder, not a file$"):
        load_model(tmp_path)


def test_a_run_folder_is_reported_as_the_model_file_it_holds_and_that_files_iteration(tiny_model, tmp_path, capsys):
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(make_text(300, seed=1), encoding="utf-8")
    run = tmp_path / "run"

    def evaluated() -> tuple[str, dict]:
        """The model the summary names, and the model, model file and iteration of the JSON."""
        main([str(run), "--data", str(text_file), "--device", "cpu", "--json", "-"])
        out, err = capsys.readouterr()
        figures = json.loads(out)
        return err.split(" | ")[0], {key: figures[key] for key in ("model", "model_file", "iteration")}

    final, best = run / "model_final.safetensors", run / "best.safetensors"
    save_model_file(final, *tiny_model)  # records no iteration
    assert evaluated() == (str(final), {"model": str(run), "model_file": str(final), "iteration": None})
    save_model_file(best, *tiny_model, {ITERATION_KEY: "500"})  # preferred to the final model
    assert evaluated() == (f"{best} (iteration 500)", {"model": str(run), "model_file": str(best), "iteration": 500})


def one_line_error(capsys, model_file, data, *args: str) -> str:
    """Run the command on `data`; it must exit with code 1 and a single line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_file), "--data", str(data), "--device", "cpu", *args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size=0"),
        (["--stride", "17"], "--stride=17"),
        (["--device", "nonsense"], "--device"),
    ],
)
def test_bad_options_are_one_line_errors(model_file, tmp_path, capsys, args, message):
    text_file = tmp_path / "t.txt"
    text_file.write_text(make_text(200), encoding="utf-8")
    assert message in one_line_error(capsys, model_file, text_file, *args)


def test_unknown_characters_are_a_one_line_error(model_file, tmp_path, capsys):
    text_file = tmp_path / "t.txt"
    text_file.write_text("the king ~ said Ω\n", encoding="utf-8")
    err = one_line_error(capsys, model_file, text_file)
    assert "'~'" in err and "'Ω'" in err and str(text_file) in err
    assert err.endswith(f"(the tokenizer comes from the model {model_file}; --drop-unknown leaves them out)\n")


def test_drop_unknown_scores_the_text_without_the_characters_the_tokenizer_lacks(model_file, tmp_path, capsys):
    text = make_text(400)
    clean, marked = tmp_path / "clean.txt", tmp_path / "marked.txt"
    clean.write_text(text, encoding="utf-8")
    marked.write_text("~" + text[:200] + "ΩΩ" + text[200:] + "~", encoding="utf-8")
    main([str(model_file), "--data", str(clean), "--device", "cpu", "--json", "-"])
    expected = json.loads(capsys.readouterr().out)
    threads = torch.get_num_threads()
    try:
        main(
            [
                str(model_file),
                "--data",
                str(marked),
                "--device",
                "cpu",
                "--json",
                "-",
                "--drop-unknown",
                "--threads",
                "1",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert json.loads(out)["loss"] == expected["loss"] and json.loads(out)["n_bytes"] == expected["n_bytes"]
    assert "left out of the text, which the figures are over: '~' x2, 'Ω' x2" in err
    assert f"(over {expected['n_bytes']:,} bytes of text kept)" in err
    marked.write_text("~ΩΩ~", encoding="utf-8")  # nothing the tokenizer knows
    with pytest.raises(SystemExit):
        main([str(model_file), "--data", str(marked), "--device", "cpu", "--drop-unknown"])
    err = capsys.readouterr().err
    assert "left out of the text, which the figures are over: '~' x2, 'Ω' x2" in err
    assert err.endswith("the text is 0 token(s) once --drop-unknown left characters out; evaluation needs at least 2\n")


def test_text_that_is_not_utf8_is_an_error_naming_the_option_that_reads_it(model_file, tmp_path, capsys):
    text_file = tmp_path / "latin1.txt"
    text_file.write_bytes(make_text(200).encode() + b"\xe9" + make_text(200).encode())
    err = one_line_error(capsys, model_file, text_file)
    assert "is not valid UTF-8 (byte offset 200); pass --encoding-errors=replace" in err
    # Read with U+FFFD for the bad byte, the text gets as far as the char model's vocabulary, which lacks U+FFFD.
    err = one_line_error(capsys, model_file, text_file, "--encoding-errors", "replace")
    assert "1 character(s) not in the tokenizer's vocabulary: '\ufffd'" in err


def test_missing_data_is_a_one_line_error(model_file, tmp_path, capsys):
    assert "does not exist" in one_line_error(capsys, model_file, tmp_path / "nope.txt")
    assert (
        one_line_error(capsys, model_file, "~no-such-user-xyz/f.txt")
        == "error: --data: no home folder for ~no-such-user-xyz\n"
    )


def test_a_one_token_text_is_a_one_line_error(model_file, tmp_path, capsys):
    text_file = tmp_path / "t.txt"
    text_file.write_text("k", encoding="utf-8")
    err = one_line_error(capsys, model_file, text_file)
    assert "--data" in err and "at least 2" in err


def test_a_json_path_that_cannot_be_written_is_refused_before_evaluating(model_file, tmp_path, capsys, monkeypatch):
    text_file = tmp_path / "t.txt"
    text_file.write_text(make_text(200), encoding="utf-8")
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr("fluxtrain.evaluate.evaluate_ids", lambda *a: pytest.fail("the evaluation ran"))
    for target, message in (
        (tmp_path, f"--json {tmp_path} is a folder, not a file"),
        (tmp_path / "a_file" / "x.json", f"--json {tmp_path / 'a_file' / 'x.json'} cannot be written: "),
        ("/proc/x.json", "--json /proc/x.json cannot be written: cannot create a file in /proc ("),
    ):
        assert one_line_error(capsys, model_file, text_file, "--json", str(target)).startswith(f"error: {message}")


def test_json_replaces_an_earlier_evaluations_file_but_no_other_file(model_file, tmp_path, capsys):
    text_file = tmp_path / "t.txt"
    text_file.write_text(make_text(200), encoding="utf-8")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    model_bytes, text_bytes = model_file.read_bytes(), text_file.read_bytes()
    for target in (model_file, text_file, notes):
        err = one_line_error(capsys, model_file, text_file, "--json", str(target))
        expected = (
            f"--json {target} is a file that no evaluation wrote: not replaced (give a new file, or remove it first)"
        )
        assert err == f"error: {expected}\n"
    assert model_file.read_bytes() == model_bytes and text_file.read_bytes() == text_bytes
    assert notes.read_text() == '{"mine": 1}\n'
    out = tmp_path / "figures.json"
    for _ in range(2):  # the second run replaces the first one's figures
        main([str(model_file), "--data", str(text_file), "--device", "cpu", "--json", str(out)])
        assert json.loads(out.read_text())["n_tokens"] == 200


def test_json_to_a_device_or_a_pipe_is_refused_without_reading_it(model_file, tmp_path, capsys):
    text_file = tmp_path / "t.txt"
    text_file.write_text(make_text(200), encoding="utf-8")
    fifo = tmp_path / "figures.json"
    os.mkfifo(fifo)  # reading it would wait for a writer for ever
    for target in (fifo, Path("/dev/zero")):  # reading /dev/zero whole would take all the memory
        err = one_line_error(capsys, model_file, text_file, "--json", str(target))
        assert err == f"error: --json {target} is not a regular file: give a file to write the figures to, or -\n"
    big = tmp_path / "big.json"
    big.write_text('{"n_tokens": 1, "pad": "' + "x" * (2 << 20) + '"}')
    assert "is a file that no evaluation wrote" in one_line_error(capsys, model_file, text_file, "--json", str(big))


def test_ctrl_c_is_one_line_and_exit_code_130(model_file, tmp_path, capsys, monkeypatch):
    text_file = tmp_path / "t.txt"
    text_file.write_text(make_text(200), encoding="utf-8")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("fluxtrain.evaluate.evaluate_ids", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_file), "--data", str(text_file), "--device", "cpu"])
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "t.txt", "--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
        (["--data", "t.txt", "--batches", "3"], "unrecognized arguments: --batches 3"),
        (["--data", "t.txt", "--encoding-errors", "ignore"], "argument --encoding-errors: invalid choice: 'ignore'"),
        ([], "the following arguments are required: --data"),
    ],
)
def test_options_the_parser_refuses_are_one_line_too(model_file, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_file), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m fluxtrain.evaluate: error: {message}") and err.endswith(" (see --help)\n")
    assert err.count("\n") == 1


def test_empty_data_json_or_model_is_an_error_not_the_working_folder(model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working folder holds a text and the model: "" must not read either
    text_file = tmp_path / "t.txt"
    text_file.write_text(make_text(200), encoding="utf-8")
    assert one_line_error(capsys, model_file, "") == "error: --data is empty; give a text file, a folder or a glob\n"
    err = one_line_error(capsys, model_file, text_file, "--json", "")
    assert err == "error: --json is empty; give a file to write the figures to, or - for stdout\n"
    err = one_line_error(capsys, "", text_file)
    assert err == "error: MODEL is empty (give a model file, a checkpoint or a run folder)\n"


def test_a_checkpoints_folder_is_named_as_such_with_its_newest_checkpoint(tmp_path, capsys):
    text_file = tmp_path / "t.txt"
    text_file.write_text(make_text(200), encoding="utf-8")
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for iteration in (900, 1000):
        (checkpoints / f"iter_{iteration:06d}.ckpt").write_bytes(b"")
    assert one_line_error(capsys, checkpoints, text_file) == (
        f"error: MODEL {checkpoints} is a folder of checkpoints, not a run folder: give one of its checkpoints (the "
        f"newest is {checkpoints / 'iter_001000.ckpt'}) or the run folder {tmp_path / 'run'}\n"
    )
    err = one_line_error(capsys, tmp_path / "run", text_file)  # the run folder: its newest checkpoint is the model
    assert err == f"error: model file {checkpoints / 'iter_001000.ckpt'} is empty\n"
    (tmp_path / "empty").mkdir()
    assert one_line_error(capsys, tmp_path / "empty", text_file) == (
        f"error: MODEL {tmp_path / 'empty'} is a folder that holds no model file (best.safetensors or "
        "model_final.safetensors) and no checkpoints/iter_*.ckpt: give a model file, a checkpoint or a run folder\n"
    )


def test_the_python_api_names_ids_outside_the_vocabulary_and_a_byte_count_that_is_no_count(tiny_model):
    model, tokenizer = tiny_model
    ids = tokenizer.encode(make_text(200, seed=3))
    with pytest.raises(FluxtrainError, match=rf"^token id {model.vocab_size} is not in the vocabulary"):
        evaluate_ids(model, [*ids, model.vocab_size], 200)
    with pytest.raises(FluxtrainError, match=rf"^token id {model.vocab_size} is not in the vocabulary"):
        evaluate_ids(model, np.array([*ids, model.vocab_size], dtype=np.uint32), 200)  # an encoded corpus, vectorised
    for n_bytes in (0, -1, "200", 2.5, True, np.True_):
        with pytest.raises(FluxtrainError, match=r"^n_bytes=.* must be the positive number of bytes"):
            evaluate_ids(model, ids, n_bytes)
    assert evaluate_ids(model, ids, np.int64(200)).n_bytes == 200  # the model's device by default, here the CPU


def test_bits_per_byte_count_the_bytes_of_the_text_read_not_of_what_a_normalizer_made_of_it(tmp_path, capsys):
    """An NFKC tokenizer reads full-width letters and ligatures as their plain forms, so its tokens stand for fewer
    bytes than the text has: bits per byte are over the text as read, on the command line as from Python."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    from fluxtrain.tokenizer import BPETokenizer

    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFKC()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([make_text(2_000)], trainer)
    tokenizer = BPETokenizer(hf)
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=32, n_heads=2, n_layers=1, ff_dim=64, seq_len=SEQ_LEN), tokenizer.vocab_size)
    save_model_file(tmp_path / "m.safetensors", model, tokenizer)
    text = "ＲＯＭＥＯ： ﬁne ﬁrst ＡＢＣ\n" * 20
    (tmp_path / "fw.txt").write_text(text, encoding="utf-8")
    main([str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "fw.txt"), "--device", "cpu", "--json", "-"])
    out, err = capsys.readouterr()
    figures = json.loads(out)
    assert figures["n_bytes"] == len(text.encode("utf-8")) == 840 and "(over 840 bytes of text as read)" in err
    in_python = evaluate_text(model.eval(), tokenizer, text)
    assert figures["bits_per_byte"] == pytest.approx(in_python.bits_per_byte, rel=1e-6)


def test_an_exported_char_tokenizer_names_and_drops_unknown_characters_too(tiny_model, tmp_path, capsys):
    """A model trained with the char tokenizer that fluxtrain.export writes (tokenizer.path=.../tokenizer.json): a
    WordLevel vocabulary of single characters, without an unknown token."""
    from fluxtrain.export import char_tokenizers_model

    model, char_tokenizer = tiny_model
    path = tmp_path / "exported.safetensors"
    save_model_file(path, model, BPETokenizer(char_tokenizers_model(char_tokenizer.chars)))
    text = make_text(400)
    clean, marked = tmp_path / "clean.txt", tmp_path / "marked.txt"
    clean.write_text(text, encoding="utf-8")
    marked.write_text("~" + text[:200] + "Ω" + text[200:], encoding="utf-8")
    err = one_line_error(capsys, path, marked)
    assert "2 character(s) not in the tokenizer's vocabulary: '~', 'Ω'" in err
    assert err.endswith("; --drop-unknown leaves them out)\n")
    main([str(path), "--data", str(clean), "--device", "cpu", "--json", "-"])
    expected = json.loads(capsys.readouterr().out)
    main([str(path), "--data", str(marked), "--device", "cpu", "--json", "-", "--drop-unknown"])
    out, err = capsys.readouterr()
    assert json.loads(out)["loss"] == expected["loss"] and "'~' x1, 'Ω' x1" in err
