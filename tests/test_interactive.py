"""The interactive session: commands and their errors, prompts, Ctrl-C, history and exit (in a pseudo-terminal)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pexpect
import pytest
import torch

from fluxtrain import GPT, ModelConfig, interactive, load_model, save_model_file
from fluxtrain.generate import main
from fluxtrain.interactive import SETTINGS, Session
from fluxtrain.sampling import SamplingConfig, beam_search, generate
from fluxtrain.tokenizer import CharTokenizer
from tests.test_generate import metaspace_tokenizer, model_file_for

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT = "ROMEO:\nthe king my lord, good sir; love death night sweet heart.\nJULIET:\nwhy come go speak hear thou art!\n"
COMMANDS = "commands: /temp, /topk, /topp, /rep, /len, /beams, /seed, /help, /quit"
TIMEOUT = 120  # seconds; start-up imports torch, which is slow on a busy machine


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=16), len(set(TEXT)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)  # spread logits: varied text, so that settings visibly change it
    path = tmp_path / "run" / "best.safetensors"
    save_model_file(path, model, CharTokenizer.train(TEXT))
    return path


def spawn(model_file: Path, home: Path, *args: str, preexec_fn=None) -> pexpect.spawn:
    env = {
        "PYTHONPATH": str(REPO_ROOT),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TERM": "dumb",
        "OMP_NUM_THREADS": "1",
    }
    child = pexpect.spawn(
        sys.executable,
        ["-m", "fluxtrain.generate", str(model_file.parent), *args],
        env=env,
        cwd=str(REPO_ROOT),
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(40, 400),
        preexec_fn=preexec_fn,
    )
    child.expect_exact("> ")
    return child


def command(child: pexpect.spawn, line: str, reply: str) -> None:
    """Send a line and wait for `reply`, then for the next prompt."""
    child.sendline(line)
    child.expect_exact(reply)
    child.expect_exact("> ")


def expected_text(model_file: Path, prompt: str, cfg: SamplingConfig) -> str:
    model, tokenizer = load_model(model_file)
    ids = tokenizer.encode(prompt)
    new = beam_search(model, ids, cfg)[0] if cfg.beams > 1 else generate(model, ids, cfg)
    return prompt + tokenizer.decode(new)


def reply_to(child: pexpect.spawn, prompt: str) -> str:
    """Send a prompt and return what was printed before the next `> `, with the terminal's line ends undone."""
    child.sendline(prompt)
    child.expect_exact(prompt + "\r\n")  # the terminal's echo of the typed line
    child.expect_exact("> ")
    return child.before.replace("\r\n", "\n").removesuffix("\n")


def test_commands_change_settings_and_prompts_follow_them(model_file, tmp_path):
    child = spawn(model_file, tmp_path, "--seed", "3")
    command(child, "/temp 0", "temperature 0.0")
    command(child, "/len 24", "length 24")
    command(child, "/topk 5", "top-k 5")
    command(child, "/topp 0.5", "top-p 0.5")
    command(child, "/rep 1.5", "repetition penalty 1.5")
    command(child, "/seed 9", "seed 9")
    command(child, "/beams 3", "beams 3")
    command(
        child,
        "/help",
        "now: temperature 0.0, top-k 5, top-p 0.5, repetition penalty 1.5, length 24, beams 3, seed 9",
    )
    # Bad commands and values say what is allowed and leave the settings as they were.
    command(child, "/temp 5", "/temp needs a temperature from 0 to 2 (0 = greedy): got '5'\r\n")
    command(child, "/temp nan", "/temp needs a temperature from 0 to 2 (0 = greedy): got 'nan'\r\n")
    command(child, "/topk many", "/topk needs an integer top-k >= 0 (0 = off): got 'many'\r\n")
    command(
        child, "/beams 0", "/beams needs a number of beams from 1 to 100 (1 = sampling, no beam search): got '0'\r\n"
    )
    command(child, "/beams 10000000000", "/beams needs a number of beams from 1 to 100")
    command(child, "/seed -4", "/seed needs an integer from 0 to 2**32 - 1")
    command(child, "/seed 4294967296", "/seed needs an integer from 0 to 2**32 - 1")
    command(child, "/seed ²", "/seed needs an integer from 0 to 2**32 - 1")
    command(child, "/volume 11", "unknown command /volume; commands: /temp, /topk")

    beams = SamplingConfig(max_new_tokens=24, temperature=0.0, repetition_penalty=1.5, beams=3)
    assert reply_to(child, "ROMEO:") == expected_text(model_file, "ROMEO:", beams)
    command(child, "/beams 1", "beams 1")
    greedy = SamplingConfig(max_new_tokens=24, temperature=0.0, repetition_penalty=1.5)
    assert reply_to(child, "ROMEO:") == expected_text(model_file, "ROMEO:", greedy)
    command(child, "/rep 1", "repetition penalty 1.0")
    plain = reply_to(child, "ROMEO:")
    assert plain == expected_text(model_file, "ROMEO:", SamplingConfig(max_new_tokens=24, temperature=0.0))
    assert plain != expected_text(model_file, "ROMEO:", greedy)

    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/temp 2.5", "/temp needs a temperature from 0 to 2 (0 = greedy): got '2.5'"),
        ("/temp nan", "/temp needs a temperature from 0 to 2 (0 = greedy): got 'nan'"),
        ("/temp inf", "/temp needs a temperature from 0 to 2 (0 = greedy): got 'inf'"),
        ("/topk -1", "/topk needs an integer top-k >= 0 (0 = off): got '-1'"),
        ("/topk 1.5", "/topk needs an integer top-k >= 0 (0 = off): got '1.5'"),
        ("/topk ５", "/topk needs an integer top-k >= 0 (0 = off): got '５'"),  # a full-width digit
        ("/topp 0", "/topp needs a top-p in (0, 1] (1 = off): got '0'"),
        ("/topp nan", "/topp needs a top-p in (0, 1] (1 = off): got 'nan'"),
        ("/topp inf", "/topp needs a top-p in (0, 1] (1 = off): got 'inf'"),
        ("/rep 0.5", "/rep needs a repetition penalty from 1 to 10000 (1 = off): got '0.5'"),
        ("/rep inf", "/rep needs a repetition penalty from 1 to 10000 (1 = off): got 'inf'"),
        ("/rep nan", "/rep needs a repetition penalty from 1 to 10000 (1 = off): got 'nan'"),
        ("/rep 1e300", "/rep needs a repetition penalty from 1 to 10000 (1 = off): got '1e300'"),
        ("/len 0", "/len needs a number of new tokens >= 1: got '0'"),
        ("/len", "/len needs a number of new tokens >= 1: got ''"),
        ("/beams 0", "/beams needs a number of beams from 1 to 100 (1 = sampling, no beam search): got '0'"),
        ("/beams 101", "/beams needs a number of beams from 1 to 100 (1 = sampling, no beam search): got '101'"),
        ("/help me", "/help takes no value: got 'me'"),
        ("/quit now", "/quit takes no value: got 'now'"),  # a mistyped command does not end the session
        # More digits than int() reads (4300), shown shortened.
        ("/seed " + "9" * 5000, "/seed needs an integer from 0 to 2**32 - 1, got '" + "9" * 40 + "…'"),
        ("/len " + "9" * 5000, "/len needs a number of new tokens >= 1: got '" + "9" * 40 + "…'"),
        ("/beams " + "9" * 5000, f"/beams needs {SETTINGS['/beams'][3]}: got '" + "9" * 40 + "…'"),
        ("/" + "x" * 5000, "unknown command /" + "x" * 39 + "…; " + COMMANDS),
    ],
)
def test_a_bad_value_names_the_command_and_changes_nothing(capsys, model_file, line, message):
    model, tokenizer = load_model(model_file)
    cfg = SamplingConfig(max_new_tokens=24, temperature=0.5, top_k=5, top_p=0.9, repetition_penalty=1.5, beams=2)
    session = Session(model, tokenizer, cfg, seed=1, drop_unknown=False, stream=True)
    assert session.command(line)
    assert capsys.readouterr().err == message + "\n" and session.seed == 1
    assert session.cfg == cfg


def test_a_seed_may_have_leading_zeros(capsys, model_file):
    model, tokenizer = load_model(model_file)
    session = Session(model, tokenizer, SamplingConfig(), seed=1, drop_unknown=False, stream=True)
    assert session.command("/seed " + "0" * 5000 + "7") and session.seed == 7
    assert capsys.readouterr().err == "seed 7\n"


def test_a_tab_parts_a_command_from_its_value(capsys, model_file):
    model, tokenizer = load_model(model_file)
    session = Session(model, tokenizer, SamplingConfig(), seed=1, drop_unknown=False, stream=True)
    assert session.command("/len\t7") and session.cfg.max_new_tokens == 7
    assert capsys.readouterr().err == "length 7\n"
    assert session.command("/temp -0") and str(session.cfg.temperature) == "0.0"
    assert capsys.readouterr().err == "temperature 0.0\n"


def test_ctrl_c_as_the_prompt_is_echoed_stops_only_that_prompt(capsys, monkeypatch, model_file):
    model, tokenizer = load_model(model_file)
    session = Session(model, tokenizer, SamplingConfig(max_new_tokens=5), seed=1, drop_unknown=False, stream=True)
    writes = []

    def write(text: str) -> int:
        writes.append(text)
        if len(writes) == 1:
            raise KeyboardInterrupt
        return len(text)

    monkeypatch.setattr(sys.stdout, "write", write)
    session.generate("ROMEO:")
    assert capsys.readouterr().err == "[stopped]\n"


def test_running_out_of_memory_ends_that_prompt_and_names_what_to_lower(capsys, monkeypatch, model_file):
    import fluxtrain.interactive as interactive_module

    model, tokenizer = load_model(model_file)
    session = Session(model, tokenizer, SamplingConfig(max_new_tokens=5), seed=1, drop_unknown=False, stream=True)

    def out_of_memory(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 53687091200 bytes.")

    monkeypatch.setattr(interactive_module, "write_continuation", out_of_memory)
    session.generate("ROMEO:")  # the session goes on
    assert capsys.readouterr().err == (
        "out of memory (RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 53687091200 "
        "bytes.); lower /beams or /len, or use a smaller model\n"
    )


def test_sampling_is_reproducible_with_seed(model_file, tmp_path):
    child = spawn(model_file, tmp_path, "--max-new-tokens", "30")
    command(child, "/seed 5", "seed 5")
    first = reply_to(child, "the")
    command(child, "/seed 5", "seed 5")
    assert reply_to(child, "the") == first
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_generation_and_returns_to_the_prompt(model_file, tmp_path):
    # Started with SIGINT ignored, as a shell without job control starts its background jobs: the session still
    # takes Ctrl-C as its stop key.
    child = spawn(model_file, tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    command(child, "/len 1000000", "length 1000000")
    child.sendline("ROMEO:")
    child.expect_exact("ROMEO:\r\n")
    child.expect(re.compile(r"ROMEO:.{200}", re.DOTALL))  # generation is under way
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact("> ")
    command(child, "/len 5", "length 5")  # the session is alive
    assert len(reply_to(child, "JULIET:")) == len("JULIET:") + 5
    child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, not an exit
    child.expect_exact("> ")
    child.sendeof()  # Ctrl-D leaves cleanly
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_line_editing_history_and_unknown_characters(model_file, tmp_path):
    child = spawn(model_file, tmp_path)
    command(child, "/temp 0.5", "temperature 0.5")
    command(child, "/len 7", "length 7")
    child.send("\x10\x10\r")  # Ctrl-P twice: back to "/temp 0.5"
    child.expect_exact("temperature 0.5")
    child.expect_exact("> ")
    child.send("len 3\x01/\r")  # type "len 3", Ctrl-A to the start of the line, insert "/"
    child.expect_exact("length 3")
    child.expect_exact("> ")
    command(child, "ROMEO é", "1 character(s) not in the tokenizer's vocabulary: 'é'")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # The history is kept for the next session.
    history = (tmp_path / ".fluxtrain_generate_history").read_text()
    assert "/temp 0.5" in history and "/len 3" in history


def test_stdout_in_a_file_gets_the_text_alone_and_the_terminal_keeps_line_editing(model_file, tmp_path):
    """The `> ` prompt goes to stderr, as Python's does; readline edits a line only where stdout is a terminal, so
    while a line is typed stdout is stderr's terminal."""
    out = tmp_path / "out.txt"

    def stdout_to_file():
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT, 0o600), 1)

    child = spawn(model_file, tmp_path, "--temperature", "0", preexec_fn=stdout_to_file)
    command(child, "/len 5", "length 5")
    child.send("/len 6\r\x10\x10\r")  # Ctrl-P twice: back to "/len 5"
    child.expect_exact("length 5")
    child.expect_exact("> ")
    child.send("OMEO:\x01R\r")  # type "OMEO:", Ctrl-A to the start of the line, insert "R"
    command(child, "/len 2", "length 2")  # the reply comes once the text is written
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (
        out.read_text() == expected_text(model_file, "ROMEO:", SamplingConfig(max_new_tokens=5, temperature=0.0)) + "\n"
    )
    assert (tmp_path / ".fluxtrain_generate_history").read_text().splitlines() == [
        "/len 5",
        "/len 6",
        "/len 5",
        "ROMEO:",
        "/len 2",
        "/quit",
    ]


@pytest.mark.usefixtures("one_thread")
def test_ctrl_c_without_streaming_shows_the_text_so_far(capsys, monkeypatch, model_file):
    import fluxtrain.generate as generate_module

    model, tokenizer = load_model(model_file)
    real_stream = generate_module.sample_stream

    def interrupted(*args):
        yield from islice(real_stream(*args), 6)
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_module, "sample_stream", interrupted)
    cfg = SamplingConfig(max_new_tokens=50, temperature=0.0)
    session = Session(model, tokenizer, cfg, seed=1, drop_unknown=False, stream=False)
    session.generate("ROMEO:")
    six = generate(model, tokenizer.encode("ROMEO:"), SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert capsys.readouterr() == ("ROMEO:" + tokenizer.decode(six) + "\n", "[stopped]\n")


def test_a_line_that_starts_with_two_slashes_is_a_prompt_less_one_slash(capsys, monkeypatch, model_file):
    model, tokenizer = load_model(model_file)
    session = Session(model, tokenizer, SamplingConfig(), seed=1, drop_unknown=False, stream=True)
    lines = ["//temp 0", "/len 4", " ///", "/help"]

    def read_line(prompt: str = "") -> str:
        if not lines:
            raise EOFError  # Ctrl-D
        return lines.pop(0)

    prompts = []
    monkeypatch.setattr(Session, "_start_readline", lambda self: None)
    monkeypatch.setattr("builtins.input", read_line)
    monkeypatch.setattr(session, "generate", prompts.append)
    assert session.run() == 0
    assert prompts == ["/temp 0", " //"] and session.cfg.max_new_tokens == 4
    assert "  //text     the prompt /text (a prompt that starts with /)\n" in capsys.readouterr().err


def test_a_line_that_is_not_utf8_is_named_and_the_session_goes_on(capsys, monkeypatch, model_file):
    lines = io.TextIOWrapper(io.BytesIO(b"RO\xffMEO\n/len 3\nthe\n"), encoding="utf-8")  # strict, as in a UTF-8 locale
    monkeypatch.setattr(sys, "stdin", lines)
    monkeypatch.setattr(Session, "_start_readline", lambda self: None)
    assert main([str(model_file), "--interactive", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert "\n> the prompt is not valid UTF-8 (character 3 is a bad byte)\n> length 3\n> > \n" in err
    assert out == expected_text(model_file, "the", SamplingConfig(max_new_tokens=3, temperature=0.0)) + "\n"


@pytest.mark.parametrize(("stream", "beams"), [(True, 1), (False, 1), (True, 3)])
def test_the_continuation_reads_as_it_does_after_the_prompt(capsys, tmp_path, stream, beams):
    """With a Metaspace tokenizer the first new word keeps its space after the prompt (`why th`, not `whyth`)."""
    tokenizer = metaspace_tokenizer()
    model, _ = model_file_for(tokenizer, tmp_path / "model.safetensors")
    cfg = SamplingConfig(max_new_tokens=12, beams=beams)
    Session(model, tokenizer, cfg, seed=1, drop_unknown=False, stream=stream).generate("why")
    new = generate(model, tokenizer.encode("why"), cfg, torch.Generator().manual_seed(1))
    out = capsys.readouterr().out
    assert out == tokenizer.decode(tokenizer.encode("why") + new) + "\n" and out.startswith("why ")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_a_full_disk_ends_the_session_with_a_one_line_error(model_file, tmp_path, stream):
    """As a real process: `python -m` runs fluxtrain.generate as __main__, beside the fluxtrain.generate the session
    imports."""
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fluxtrain.generate", str(model_file), "--interactive", stream]
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        done = subprocess.run(cmd, input="/len 5\nthe\n", stdout=full, stderr=subprocess.PIPE, text=True, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.endswith("\n> length 5\n> error: cannot write the text to stdout: No space left on device\n")


def test_without_a_home_folder_the_session_keeps_no_history(capsys, monkeypatch, model_file):
    """HOME unset for a uid without a passwd entry (a container's arbitrary uid): `~` names no folder."""
    import pwd

    def no_entry(uid: int):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/len 3\nthe\n"))
    assert main([str(model_file), "--interactive", "--temperature", "0"]) == 0
    assert (
        capsys.readouterr().out
        == expected_text(model_file, "the", SamplingConfig(max_new_tokens=3, temperature=0.0)) + "\n"
    )


def test_a_piped_session_leaves_the_history_alone(capsys, monkeypatch, model_file, tmp_path):
    monkeypatch.setattr(interactive, "HISTORY_FILE", tmp_path / "history")
    monkeypatch.setattr(sys, "stdin", io.StringIO("/len 3\nthe\n"))
    assert main([str(model_file), "--interactive", "--temperature", "0"]) == 0
    assert not (tmp_path / "history").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_history_path_that_is_no_file_is_left_alone(model_file, tmp_path):
    """Reading a FIFO would wait for a writer before the first prompt."""
    os.mkfifo(tmp_path / ".fluxtrain_generate_history")
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fluxtrain.generate", str(model_file), "--interactive", "--temperature", "0"]
    done = subprocess.run(cmd, input="/len 3\nthe\n", capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert (done.returncode, done.stdout) == (
        0,
        expected_text(model_file, "the", SamplingConfig(max_new_tokens=3, temperature=0.0)) + "\n",
    )
    assert (tmp_path / ".fluxtrain_generate_history").is_fifo()


def test_characters_read_as_the_unknown_token_are_named(capsys, tmp_path):
    tokenizer = metaspace_tokenizer()
    model, _ = model_file_for(tokenizer, tmp_path / "model.safetensors")
    Session(model, tokenizer, SamplingConfig(max_new_tokens=3), seed=1, drop_unknown=False, stream=True).generate(
        "日why"
    )
    assert capsys.readouterr().err == (
        "1 prompt character(s) are not in the vocabulary and read as <unk>: '日' (--drop-unknown leaves them out)\n"
    )
