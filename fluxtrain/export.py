"""Export a model file to a Hugging Face transformers folder: GPT2LMHeadModel weights and a fast tokenizer."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError

from fluxtrain import host
from fluxtrain.cuts import PER_CHARACTER_PATTERN
from fluxtrain.errors import FluxtrainError, OneLineErrorParser, first_line, paths_named
from fluxtrain.files import check_writable, parse_json
from fluxtrain.model import GPT, ModelConfig, eval_mode
from fluxtrain.model_file import load_model
from fluxtrain.quantize import is_quantized
from fluxtrain.resume import find_latest
from fluxtrain.runs import model_file_label, resolve_model_path, run_model_file, saved_iteration
from fluxtrain.tokenizer import Tokenizer

INSTALL_HINT = "pip install 'fluxtrain[hf]' (or pip install -e \".[hf]\" in a checkout)"
# GPT-2's MLP takes any activation from transformers' ACT2FN table; these are the exact equivalents of ours.
HF_ACTIVATIONS = {"gelu": "gelu", "relu2": "relu2"}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, used by every fluxtrain LayerNorm
# The files save_pretrained writes for a GPT2LMHeadModel and a fast tokenizer (a large model in shards, transformers
# 4 also special_tokens_map.json): `--overwrite` replaces a folder holding these alone.
EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise FluxtrainError(f"exporting to Hugging Face needs the transformers library: {INSTALL_HINT}") from None
    return transformers


def unsupported_blocks(cfg: ModelConfig) -> list[str]:
    """The settings of `cfg` that GPT2LMHeadModel cannot express, each with what GPT-2 has instead."""
    blocks = []
    if cfg.norm != "layernorm":
        blocks.append(f"model.norm={cfg.norm} (GPT-2 has LayerNorm)")
    if cfg.pos_emb != "learned":
        blocks.append(f"model.pos_emb={cfg.pos_emb} (GPT-2 has learned positions)")
    if cfg.activation not in HF_ACTIVATIONS:
        blocks.append(f"model.activation={cfg.activation} (GPT-2's MLP is not gated; {'/'.join(HF_ACTIVATIONS)} work)")
    return blocks


def check_exportable(model: GPT, source: str) -> None:
    if is_quantized(model):
        raise FluxtrainError(f"{source}: the model has int8 weights (quantize_int8); export the full-precision model")
    blocks = unsupported_blocks(model.cfg)
    if blocks:
        raise FluxtrainError(f"{source}: GPT2LMHeadModel has no equivalent for these blocks: {'; '.join(blocks)}")


def gpt2_config(cfg: ModelConfig, vocab_size: int, special: dict[str, int | None]):
    """The GPT2Config with the same shape as `cfg`; `special` holds bos/eos/pad token ids (None when absent)."""
    transformers = require_transformers()
    return transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.ff_dim,
        activation_function=HF_ACTIVATIONS[cfg.activation],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=LAYER_NORM_EPS,
        tie_word_embeddings=True,
        bos_token_id=special["bos"],
        eos_token_id=special["eos"],
        pad_token_id=special["pad"],
    )


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """fluxtrain weights under GPT2LMHeadModel's names.

    GPT-2's Conv1D stores weights as (in, out) where nn.Linear has (out, in), so those are transposed. Models
    trained with `bias=false` get zero biases, which compute the same function.
    """
    d = model.cfg.d_model
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def bias(name: str, size: int) -> torch.Tensor:
        return weights.get(name, torch.zeros(size))

    def conv1d(prefix: str, fluxtrain_name: str, n_out: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.weight": weights[f"{fluxtrain_name}.weight"].t().contiguous(),
            f"{prefix}.bias": bias(f"{fluxtrain_name}.bias", n_out),
        }

    def layer_norm(prefix: str, fluxtrain_name: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.weight": weights[f"{fluxtrain_name}.weight"],
            f"{prefix}.bias": bias(f"{fluxtrain_name}.bias", d),
        }

    state = {
        "transformer.wte.weight": weights["tok_emb.weight"],
        "transformer.wpe.weight": weights["pos_emb.weight"],
        "lm_head.weight": weights["tok_emb.weight"],  # tied
        **layer_norm("transformer.ln_f", "ln_f"),
    }
    for i in range(model.cfg.n_layers):
        hf, ours = f"transformer.h.{i}", f"blocks.{i}"
        state |= layer_norm(f"{hf}.ln_1", f"{ours}.ln1")
        state |= conv1d(f"{hf}.attn.c_attn", f"{ours}.attn.qkv", 3 * d)  # q, k, v in the same order
        state |= conv1d(f"{hf}.attn.c_proj", f"{ours}.attn.proj", d)
        state |= layer_norm(f"{hf}.ln_2", f"{ours}.ln2")
        state |= conv1d(f"{hf}.mlp.c_fc", f"{ours}.mlp.fc", model.cfg.ff_dim)
        state |= conv1d(f"{hf}.mlp.c_proj", f"{ours}.mlp.proj", d)
    return state


def char_tokenizers_model(chars: list[str]):
    """The character tokenizer as a `tokenizers.Tokenizer`: every character is a word of a WordLevel vocabulary."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PER_CHARACTER_PATTERN), behavior="isolated")  # one per character
    tok.decoder = decoders.Fuse()  # join the characters back without separators
    return tok


def tokenizers_model(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes and decodes exactly like `tokenizer`."""
    if tokenizer.kind == "char":
        return char_tokenizers_model(tokenizer.chars)
    if tokenizer.kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_str(tokenizer.hf.to_str())  # already a `tokenizers.Tokenizer`: a copy of it
        # fluxtrain encodes without the special tokens a post-processor adds (a bos token, say): left in, it would
        # make transformers' `tokenizer(text)` give ids the model never read.
        if tok.post_processor is not None and tok.post_processor.num_special_tokens_to_add(False) > 0:
            tok.post_processor = None
        return tok
    raise FluxtrainError(f"tokenizer kind {tokenizer.kind!r} cannot be exported (char and bpe can)")


def end_of_text(tok) -> str | None:
    """The end-of-text token, used as GPT-2 does for both bos and eos: `<|endoftext|>` when the vocabulary has it.

    A character vocabulary has none: each of its ids is a real character, so none can be a special token without
    changing what the model reads (`skip_special_tokens` would drop it). Generation then runs for `max_new_tokens`.
    """
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    return "<|endoftext|>" if "<|endoftext|>" in specials else None


def hf_tokenizer(tokenizer: Tokenizer, seq_len: int):
    transformers = require_transformers()
    tok = tokenizers_model(tokenizer)
    eot = end_of_text(tok)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=eot,
        eos_token=eot,
        model_max_length=seq_len,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
    )


def to_transformers(model: GPT, tokenizer: Tokenizer, source: str = "model"):
    """The equivalent (GPT2LMHeadModel, PreTrainedTokenizerFast) pair, in eval mode on the CPU."""
    transformers = require_transformers()
    check_exportable(model, source)
    hf_tok = hf_tokenizer(tokenizer, model.cfg.seq_len)
    special = {"bos": hf_tok.bos_token_id, "eos": hf_tok.eos_token_id, "pad": hf_tok.pad_token_id}
    hf_model = transformers.GPT2LMHeadModel(gpt2_config(model.cfg, model.vocab_size, special))
    hf_model.load_state_dict(gpt2_state_dict(model), strict=True)
    return hf_model.eval(), hf_tok


@torch.no_grad()
def check_same_logits(model: GPT, hf_model, source: str, tol: float = 1e-3) -> None:
    """Guard against a silent mismatch: one forward pass through both models must give the same logits."""
    x = torch.arange(min(model.cfg.seq_len, 16))[None, :] % model.vocab_size
    with eval_mode(model):
        ours = model(x.to(model.tok_emb.weight.device))[0].cpu()
    diff = (ours - hf_model(x).logits).abs().max().item()
    if diff > tol:
        raise FluxtrainError(f"{source}: the exported model's logits differ by {diff:.2e}; nothing was written")


def write_folder(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a new folder beside `out_dir`, then put it in `out_dir`'s place (an earlier `out_dir` is
    replaced whole, so none of its files outlives the new export).

    A failure while writing leaves `out_dir` as it was.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        write(tmp)
        usual_permissions(tmp)
        if not out_dir.exists():
            os.replace(tmp, out_dir)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        try:
            os.replace(out_dir, old / out_dir.name)
        except BaseException:
            old.rmdir()
            raise
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old / out_dir.name, out_dir)  # should this fail too, the earlier export stays in `old`
            old.rmdir()
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old)  # the earlier export, once the new one is in its place


def usual_permissions(folder: Path) -> None:
    """The permissions the umask gives new folders and files, for `folder` (made private by mkdtemp) and the files in
    it (some writers make theirs private too), so that others can read the export as they can a run folder."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def is_export(folder: Path) -> bool:
    """Whether `folder` holds a transformers export of a GPT2LMHeadModel (what `--overwrite` may replace)."""
    try:
        config = parse_json((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("architectures") == ["GPT2LMHeadModel"]


def not_exported(folder: Path) -> list[str]:
    """The names in `folder` that no export writes (the user's own files, or folders), which `--overwrite` keeps."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if not (p.is_file() and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in EXPORT_FILES))
    )


def check_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """OUT_DIR as a path, once it is known to be a new or empty folder, or an earlier export that --overwrite may
    replace."""
    if not str(out_dir).strip():
        raise FluxtrainError("OUT_DIR is empty; give a new folder to export into")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise FluxtrainError(f"OUT_DIR {out_dir} is a file, not a folder")
    if Path.cwd().resolve().is_relative_to(out_dir.resolve()):  # the export takes the folder's place whole
        raise FluxtrainError(f"OUT_DIR {out_dir} is the current folder or holds it; export into a new folder")
    if out_dir.is_dir() and (run_model_file(out_dir) or find_latest(out_dir)):
        raise FluxtrainError(
            f"OUT_DIR {out_dir} is a run folder (it holds fluxtrain model files or checkpoints); export into a new one"
        )
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FluxtrainError(f"OUT_DIR {out_dir} is not empty; choose a new folder or pass --overwrite")
        if not is_export(out_dir):
            raise FluxtrainError(
                f"OUT_DIR {out_dir} does not hold an earlier export (no GPT2LMHeadModel config.json), so --overwrite "
                "would delete other files; choose a new folder"
            )
        others = not_exported(out_dir)
        if others:
            raise FluxtrainError(
                f"OUT_DIR {out_dir} holds an earlier export and other files ({', '.join(others[:5])}), which "
                "--overwrite would delete; move them out or choose a new folder"
            )
    check_writable(out_dir, "OUT_DIR", folder=True)
    return out_dir


def export(model_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a folder that AutoModelForCausalLM and AutoTokenizer load, from a fluxtrain model file (a checkpoint, or
    a run folder's best model, ...); returns the folder."""
    require_transformers()
    out_dir = check_out_dir(out_dir, overwrite)
    return write_export(resolve_model_path(model_path), out_dir)


def write_export(model_path: Path, out_dir: Path) -> Path:
    """`export`'s work, once its checks have passed: `model_path` a model file or checkpoint, `out_dir` checked."""
    model, tokenizer = load_model(model_path)
    hf_model, hf_tok = to_transformers(model, tokenizer, str(model_path))
    check_same_logits(model, hf_model, str(model_path))

    def write(tmp: Path) -> None:
        hf_logging = require_transformers().utils.logging
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one small file: no "writing shards" bar
        try:
            hf_model.save_pretrained(tmp)
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        hf_tok.save_pretrained(tmp)
        # Name the class both transformers 4 and 5 know (5 would write its new name, TokenizersBackend).
        config_path = tmp / "tokenizer_config.json"
        config = parse_json(config_path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    try:
        write_folder(out_dir, write)
    except FluxtrainError:
        raise
    except Exception as e:
        # safetensors and tokenizers write from Rust: a full disk is their own error type, "... (os error 28)"
        if not (isinstance(e, (OSError, SafetensorError)) or "(os error " in str(e)):
            raise
        problem = getattr(e, "strerror", None) or first_line(e)
        raise FluxtrainError(f"OUT_DIR {out_dir} cannot be written: {problem}") from None
    return out_dir


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # the command, not a call from Python
        host.collect_less()
    p = OneLineErrorParser(
        prog="python -m fluxtrain.export",
        description="Write a Hugging Face transformers folder (GPT2LMHeadModel + fast tokenizer) from a model file.",
    )
    p.add_argument("model", help="a model file (.safetensors), a checkpoint (.ckpt) or a run folder (its best model)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (created; must be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR (the whole folder)")
    args = p.parse_args(argv)
    try:
        with paths_named():
            require_transformers()  # export()'s checks, in its order
            out_dir = check_out_dir(args.out_dir, args.overwrite)
            model_path = resolve_model_path(args.model)  # a run folder's best model, ...: the file it reads
            source = model_file_label(model_path, saved_iteration(model_path))
            out = write_export(model_path, out_dir)
    except FluxtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # write_folder leaves OUT_DIR as it was
        print("interrupted: nothing was written", file=sys.stderr)
        sys.exit(130)
    print(
        f"wrote {out} from {source}: load it with AutoModelForCausalLM.from_pretrained and "
        "AutoTokenizer.from_pretrained"
    )


if __name__ == "__main__":
    main()
