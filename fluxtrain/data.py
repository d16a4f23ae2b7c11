"""Text in, token batches out: finding or downloading the corpus, encoding it once, and sampling windows."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import torch
from tqdm import tqdm

from fluxtrain.errors import FluxtrainError

log = logging.getLogger(__name__)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclass
class DataConfig:
    path: str | None = None  # null: download Tiny Shakespeare from `url`
    url: str = SHAKESPEARE_URL
    sha256: str | None = SHAKESPEARE_SHA256
    val_fraction: float = 0.1
    cache_dir: str = "~/.cache/fluxtrain"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Download `url` to `dest` unless a verified copy is there already.

    Bytes go to `dest.part` first and are renamed into place only once complete and verified, so an interrupted
    download never leaves a file that looks complete; a later call resumes the partial file with an HTTP Range request.
    """
    dest = Path(dest)
    if dest.is_file() and (sha256 is None or _sha256(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
            if r.status_code == 416:  # the partial file is already complete
                pass
            else:
                r.raise_for_status()
                if offset and r.status_code != 206:  # the server ignored the Range header: start over
                    offset = 0
                total = int(r.headers.get("Content-Length", 0)) + offset or None
                with (
                    open(part, "ab" if offset else "wb") as f,
                    tqdm(
                        total=total, initial=offset, unit="B", unit_scale=True, desc=f"downloading {dest.name}"
                    ) as bar,
                ):
                    for chunk in r.iter_content(chunk_size=1 << 13):
                        f.write(chunk)
                        bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
    except requests.RequestException as e:
        raise FluxtrainError(
            f"could not download {url} ({type(e).__name__}); download it by hand to {dest}, or set data.path"
        ) from None
    if sha256 is not None:
        got = _sha256(part)
        if got != sha256:
            part.unlink()
            raise FluxtrainError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {got} (data.sha256); the file was removed"
            )
    os.replace(part, dest)
    return dest


def resolve_text_path(cfg: DataConfig) -> Path:
    """The corpus file: `data.path`, or Tiny Shakespeare downloaded into `data.cache_dir`."""
    if cfg.path:
        return Path(cfg.path).expanduser()
    dest = Path(cfg.cache_dir).expanduser() / "tinyshakespeare.txt"
    return download(cfg.url, dest, cfg.sha256)


def read_text(path: Path, setting: str = "data.path") -> str:
    """Read a UTF-8 text file, with a one-line error naming the file for every way it can be unusable."""
    if not path.exists():
        raise FluxtrainError(f"{setting}: file {path} does not exist")
    if not path.is_file():
        raise FluxtrainError(f"{setting}: {path} is not a file")
    raw = path.read_bytes()
    if not raw:
        raise FluxtrainError(f"{setting}: file {path} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FluxtrainError(f"{setting}: file {path} is not valid UTF-8 (byte offset {e.start})") from None


class TokenData:
    """A corpus encoded once into a compact id array, split into train and validation parts."""

    def __init__(self, ids: np.ndarray, val_fraction: float, seq_len: int, source: str, n_bytes: int):
        if not 0.0 < val_fraction < 1.0:
            raise FluxtrainError(f"data.val_fraction={val_fraction} must be between 0 and 1")
        n_val = int(len(ids) * val_fraction)
        self.train = torch.from_numpy(ids[: len(ids) - n_val].astype(np.int64))
        self.val = torch.from_numpy(ids[len(ids) - n_val :].astype(np.int64))
        for name, part in (("train", self.train), ("val", self.val)):
            if len(part) < seq_len + 1:
                raise FluxtrainError(
                    f"{source} is too short: its {name} split has {len(part)} tokens, "
                    f"fewer than model.seq_len + 1 = {seq_len + 1}"
                )
        self.seq_len = seq_len
        # Bytes per token, to report losses in bits per byte whatever the tokenizer.
        self.bytes_per_token = n_bytes / len(ids)

    def split(self, name: str) -> torch.Tensor:
        return self.train if name == "train" else self.val

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (B, T) and the next-token targets y (B, T)."""
        data = self.split(split)
        starts = torch.randint(len(data) - self.seq_len, (batch_size,), generator=generator)
        offsets = starts[:, None] + torch.arange(self.seq_len + 1)  # (B, T + 1)
        window = data[offsets]
        return window[:, :-1], window[:, 1:]


def encode_ids(tokenizer, text: str) -> np.ndarray:
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    return np.asarray(tokenizer.encode(text), dtype=dtype)
