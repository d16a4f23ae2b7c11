"""Downloading the corpus against a local HTTP server: success, checksum mismatch, server down, resume (only of the
same version of the file), one file per URL, data.sha256's form, empty downloads, stalled and trickling servers, errors
that say why, and the log lines naming the URL and the file."""

import hashlib
import logging
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fluxtrain.data import (
    SHAKESPEARE_URL,
    DataConfig,
    download,
    download_path,
    load_corpus,
    resolve_text_path,
    validate,
)
from fluxtrain.errors import FluxtrainError
from fluxtrain.tokenizer import TokenizerConfig
from fluxtrain.train import train

BODY = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 400).encode()
SHA = hashlib.sha256(BODY).hexdigest()
OTHER = ("Second text, served at another URL.\n" * 300).encode()


def etag(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()[:16]}"'


def last_modified(body: bytes) -> str:
    return formatdate(1_700_000_000 + int(hashlib.sha256(body).hexdigest()[:6], 16), usegmt=True)


class Server:
    """Serves BODY at /corpus.txt (and OTHER at /other.txt) with HTTP Range and If-Range support; `cut_after` drops
    the connection part-way once; `chunk_delay` sends the body in pieces of 4 KiB, that many seconds apart.

    Each file names its version with an ETag and Last-Modified, both derived from its bytes, so that a file replaced
    in `files` is another version: a Range request whose If-Range names another one gets the whole file (200)."""

    def __init__(self):
        self.files = {"/corpus.txt": BODY, "/other.txt": OTHER}
        self.content_types: dict[str, str] = {}  # a Content-Type header per path
        self.requests: list[dict] = []
        self.statuses: list[int] = []  # the status of each answer
        self.sent = 0  # bytes of bodies sent, in all
        self.cut_after: int | None = None
        self.chunk_delay = 0.0
        self.refuse_ranges = False  # answer a Range request with 416 and no Content-Range (the file changed)
        self.stall_after: int | None = None  # send this many bytes, then nothing for 3 s
        self.trickle_after: int | None = None  # send this many bytes, then one byte every 0.2 s
        self.validators = "strong"  # "strong": ETag and Last-Modified; "weak": a weak ETag (W/) and Last-Modified;
        # "none": neither
        self.ignore_if_range = False  # answer a Range request with 206 whatever its If-Range says
        self.answer_after = 0.0  # seconds to wait before answering
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_response(self, code, message=None):
                server.statuses.append(code)
                super().send_response(code, message)

            def do_GET(self):
                server.requests.append(dict(self.headers))
                time.sleep(server.answer_after)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range") and server.refuse_ranges:
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                versions = {"strong": [etag(body), last_modified(body)], "weak": [last_modified(body)], "none": []}
                rng = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if rng and if_range and not server.ignore_if_range and if_range not in versions[server.validators]:
                    rng = None  # not the version the client has part of: the whole file
                if rng and int(rng.removeprefix("bytes=").split("-")[0]) >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                if self.path in server.content_types:
                    self.send_header("Content-Type", server.content_types[self.path])
                if server.validators != "none":
                    self.send_header("ETag", etag(body) if server.validators == "strong" else f"W/{etag(body)}")
                    self.send_header("Last-Modified", last_modified(body))
                self.end_headers()
                payload = body[start:]
                if server.stall_after is not None:
                    self.wfile.write(payload[: server.stall_after])
                    self.wfile.flush()
                    time.sleep(3)
                    return
                if server.trickle_after is not None:
                    self.send(payload[: server.trickle_after])
                    for i in range(server.trickle_after, len(payload)):
                        time.sleep(0.2)
                        if not self.send(payload[i : i + 1]):
                            return
                    return
                if server.cut_after is not None:
                    payload, server.cut_after = payload[: server.cut_after], None
                    self.send(payload)
                    self.close_connection = True
                    return
                for i in range(0, len(payload), 4096):
                    self.send(payload[i : i + 4096])
                    time.sleep(server.chunk_delay)

            def send(self, data: bytes) -> bool:
                """Write `data` to the client; False if the client hung up."""
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                except OSError:
                    return False
                server.sent += len(data)
                return True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/corpus.txt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_download_verifies_and_is_reused(server, tmp_path):
    cfg = DataConfig(path=None, url=server.url, sha256=SHA, cache_dir=str(tmp_path / "cache"))
    path = resolve_text_path(cfg)
    assert path.parent == tmp_path / "cache" and path.name.startswith("corpus-") and path.suffix == ".txt"
    assert path.read_bytes() == BODY
    assert not list(path.parent.glob("*.part"))
    resolve_text_path(cfg)  # second call: the verified file is reused, no request
    assert len(server.requests) == 1


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    dest = tmp_path / "corpus.txt"
    with pytest.raises(FluxtrainError) as e:
        download(server.url, dest, sha256="0" * 64)
    assert str(e.value) == (
        f"checksum mismatch for data.url={server.url}: expected sha256 {'0' * 64} (data.sha256), got {SHA}; "
        "the download was discarded (data.sha256 names the file data.url should hold, by default Tiny Shakespeare: "
        "for another file give its sha256, or data.sha256=null)"
    )
    assert not dest.exists() and not list(tmp_path.iterdir())


def test_checksum_mismatch_says_an_earlier_copy_is_kept_and_does_not_match_either(server, tmp_path):
    cache = tmp_path / "cache"
    unchecked = DataConfig(path=None, url=server.url, sha256=None, cache_dir=str(cache))
    dest = resolve_text_path(unchecked)
    wrong = DataConfig(path=None, url=server.url, sha256="0" * 64, cache_dir=str(cache))
    with pytest.raises(FluxtrainError) as e:
        resolve_text_path(wrong)
    assert str(e.value) == (
        f"checksum mismatch for data.url={server.url}: expected sha256 {'0' * 64} (data.sha256), got {SHA}; "
        f"the download was discarded, and the file already at {dest} (sha256 {SHA}) does not match either: "
        "correct data.sha256, or put the right file there by hand (data.sha256 names the file data.url should hold, "
        "by default Tiny Shakespeare: for another file give its sha256, or data.sha256=null)"
    )
    assert len(server.requests) == 2  # the copy was not trusted: the file was fetched again
    assert [p.name for p in cache.iterdir()] == [dest.name] and dest.read_bytes() == BODY  # as the message says


def test_an_empty_download_is_not_kept_and_an_empty_cached_file_is_fetched_again(server, tmp_path):
    server.files["/empty.txt"] = b""
    cache = tmp_path / "cache"
    empty = DataConfig(path=None, url=server.url.replace("corpus", "empty"), sha256=None, cache_dir=str(cache))
    dest = download_path(empty)
    for _ in range(2):  # each run asks the server again: nothing was kept to trust
        with pytest.raises(FluxtrainError) as e:
            load_corpus(empty, TokenizerConfig(), 16)
        assert str(e.value) == (
            f"could not download data.url={empty.url} (the server sent an empty file); download it by hand to "
            f"{dest}, or set data.path"
        )
        assert list(cache.iterdir()) == []
    assert len(server.requests) == 2
    # A 0-byte file left in the cache by an earlier version is fetched again, not trusted.
    corpus = DataConfig(path=None, url=server.url, sha256=None, cache_dir=str(cache))
    download_path(corpus).write_bytes(b"")
    assert resolve_text_path(corpus).read_bytes() == BODY
    assert len(server.requests) == 3
    # With the server down, the empty file is removed and the error is the download's, not "is empty".
    download_path(corpus).write_bytes(b"")
    server.close()
    with pytest.raises(FluxtrainError, match=r"^could not download data\.url=.* \(Connection refused\); download it"):
        resolve_text_path(corpus)
    assert list(cache.iterdir()) == []


def test_runs_sharing_the_cache_download_once(server, tmp_path):
    """A second run waits for the first one's download instead of writing into the same partial file."""
    server.chunk_delay = 0.02
    dest = tmp_path / "corpus.txt"
    results, errors = [], []

    def fetch():
        try:
            results.append(download(server.url, dest, SHA))
        except Exception as e:
            errors.append(e)

    first, second = threading.Thread(target=fetch), threading.Thread(target=fetch)
    first.start()
    part, deadline = dest.with_name(dest.name + ".part"), time.monotonic() + 10
    while not (part.exists() and part.stat().st_size) and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    second.start()
    first.join()
    second.join()
    assert errors == [] and results == [dest, dest]
    assert dest.read_bytes() == BODY and len(server.requests) == 1
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]  # no partial file, no lock file


def test_server_down_names_url_and_destination(tmp_path):
    url = "http://127.0.0.1:9/corpus.txt"  # port 9 (discard): nothing listens
    dest = tmp_path / "corpus.txt"
    with pytest.raises(FluxtrainError) as e:
        download(url, dest, sha256=SHA, timeout=5)
    assert f"data.url={url} (Connection refused)" in str(e.value) and str(dest) in str(e.value)
    assert "\n" not in str(e.value)
    assert not dest.exists()
    # Offline with a wrong file in place: the message says that file is the problem.
    dest.write_text("hello")
    with pytest.raises(FluxtrainError) as e:
        download(url, dest, sha256=SHA, timeout=5)
    wrong = hashlib.sha256(b"hello").hexdigest()
    assert f"; the file already at {dest} has sha256 {wrong}, not data.sha256={SHA} (the sha256 of" in str(e.value)
    assert str(e.value).endswith("for another file give its sha256, or data.sha256=null)")  # put there by hand


def test_interrupted_download_resumes_with_range(server, tmp_path, caplog):
    dest = tmp_path / "corpus.txt"
    server.cut_after = 20_000
    with caplog.at_level(logging.INFO, logger="fluxtrain"), pytest.raises(FluxtrainError):
        download(server.url, dest, sha256=SHA, timeout=5)
    part = tmp_path / "corpus.txt.part"
    assert not dest.exists(), "an interrupted download must not look complete"
    kept = part.stat().st_size
    assert 0 < kept <= 20_000  # whole chunks received before the cut are kept
    assert (tmp_path / "corpus.txt.part.validator").read_text().strip() == etag(BODY)  # the version they are of
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        download(server.url, dest, sha256=SHA, timeout=5)
    assert dest.read_bytes() == BODY
    assert server.requests[-1].get("Range") == f"bytes={kept}-" and server.requests[-1].get("If-Range") == etag(BODY)
    # Ranges count the file's own bytes: a compressed body would count others.
    assert all(request.get("Accept-Encoding") == "identity" for request in server.requests)
    assert server.statuses == [200, 206] and server.sent == 20_000 + len(BODY) - kept  # no byte sent twice
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]  # no partial file, no validator
    assert [r.message for r in caplog.records if r.name.startswith("fluxtrain")] == [
        f"downloading data.url={server.url} to {dest} ({len(BODY):,} bytes)",
        f"downloading data.url={server.url} to {dest} ({len(BODY):,} bytes, resuming at byte {kept:,})",
    ]


def test_a_partial_download_resumes_with_last_modified_when_the_etag_is_weak(server, tmp_path):
    dest = tmp_path / "corpus.txt"
    server.validators, server.cut_after = "weak", 20_000  # W/"..." may not be used for a range
    with pytest.raises(FluxtrainError):
        download(server.url, dest, timeout=5)
    assert download(server.url, dest, timeout=5).read_bytes() == BODY
    assert server.requests[-1].get("If-Range") == last_modified(BODY) and server.statuses == [200, 206]


def test_a_partial_download_of_a_file_changed_since_is_not_spliced_onto_the_new_one(server, tmp_path):
    dest = tmp_path / "corpus.txt"
    server.cut_after = 20_000
    with pytest.raises(FluxtrainError):
        download(server.url, dest, timeout=5)
    assert (tmp_path / "corpus.txt.part").stat().st_size > len(OTHER)
    server.files["/corpus.txt"] = OTHER  # a new version, shorter than the partial file of the old one
    assert download(server.url, dest, timeout=5).read_bytes() == OTHER  # the partial file was cut back to nothing
    assert server.requests[-1].get("If-Range") == etag(BODY) and server.statuses == [200, 200]
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


def test_a_server_that_ignores_if_range_is_caught_by_the_version_it_names(server, tmp_path):
    dest = tmp_path / "corpus.txt"
    server.cut_after, server.ignore_if_range = 20_000, True
    with pytest.raises(FluxtrainError):
        download(server.url, dest, timeout=5)
    server.files["/corpus.txt"] = BODY.upper()  # its 206 names this version, not the partial file's
    assert download(server.url, dest, timeout=5).read_bytes() == BODY.upper()
    assert [r.get("Range") is not None for r in server.requests] == [False, True, False]
    assert server.statuses == [200, 206, 200]


def test_a_partial_download_of_unknown_version_is_fetched_again_from_the_start(server, tmp_path):
    """A partial file without a validator (left by an older version, or from a server that names none) may be of
    another version of the file: it is not resumed, whatever the server has now."""
    dest = tmp_path / "corpus.txt"
    part = tmp_path / "corpus.txt.part"
    part.write_bytes(OTHER[:1200])
    assert download(server.url, dest, timeout=5).read_bytes() == BODY
    assert "Range" not in server.requests[-1] and "If-Range" not in server.requests[-1]
    server.validators, server.cut_after = "none", 20_000
    dest.unlink()
    with pytest.raises(FluxtrainError):
        download(server.url, dest, timeout=5)
    assert part.stat().st_size and not (tmp_path / "corpus.txt.part.validator").exists()
    assert download(server.url, dest, timeout=5).read_bytes() == BODY
    assert "Range" not in server.requests[-1] and server.statuses == [200, 200, 200]


def test_a_complete_partial_download_is_kept_after_a_416_unless_the_file_changed(server, tmp_path):
    """A partial file as long as the file (the run stopped before renaming it) gets 416 for the bytes after it."""
    dest = tmp_path / "corpus.txt"
    part, validator = tmp_path / "corpus.txt.part", tmp_path / "corpus.txt.part.validator"
    part.write_bytes(BODY)
    validator.write_text(etag(BODY))
    assert download(server.url, dest, sha256=SHA, timeout=5).read_bytes() == BODY
    assert server.statuses == [416] and sorted(p.name for p in tmp_path.iterdir()) == [dest.name]
    dest.unlink()
    part.write_bytes(BODY)
    validator.write_text(etag(BODY))
    server.files["/corpus.txt"] = BODY.upper()  # as long, but another version: If-Range asks for all of it
    assert download(server.url, dest, timeout=5).read_bytes() == BODY.upper()
    assert server.statuses == [416, 200]


def test_a_partial_download_whose_file_changed_is_fetched_again_whole(server, tmp_path):
    dest = tmp_path / "corpus.txt"
    server.cut_after = 20_000
    with pytest.raises(FluxtrainError):
        download(server.url, dest, timeout=5)
    server.refuse_ranges = True  # 416 without "bytes */<size of the partial file>": not the file the part began
    assert download(server.url, dest, timeout=5).read_bytes() == BODY
    assert [r.get("Range") is not None for r in server.requests] == [False, True, False]


def test_an_html_page_is_not_taken_for_the_text(server, tmp_path):
    server.content_types["/corpus.txt"] = "text/html; charset=utf-8"
    with pytest.raises(FluxtrainError) as e:
        download(server.url, tmp_path / "corpus.txt", timeout=5)
    assert str(e.value).startswith(
        f"could not download data.url={server.url} (the server sent an HTML page, not a text file: check the URL)"
    )
    assert not list(tmp_path.iterdir())
    server.content_types["/corpus.txt"] = "text/plain; charset=utf-8"
    assert download(server.url, tmp_path / "corpus.txt", timeout=5).read_bytes() == BODY


def test_a_silent_download_says_it_stalled_and_leaves_no_empty_part(server, tmp_path):
    server.stall_after = 0
    with pytest.raises(FluxtrainError) as e:
        download(server.url, tmp_path / "corpus.txt", timeout=1)
    assert str(e.value).startswith(
        f"could not download data.url={server.url} (the download stalled: less than 1 KiB arrived in the last 1 s); "
        "download it by hand"
    )
    assert not list(tmp_path.iterdir())
    server.stall_after, server.answer_after = None, 3  # no answer at all: the request timed out
    with pytest.raises(FluxtrainError) as e:
        download(server.url, tmp_path / "corpus.txt", timeout=1)
    assert str(e.value).startswith(f"could not download data.url={server.url} (timed out); download it by hand")


def test_a_trickling_download_is_stopped_and_what_arrived_is_resumed(server, tmp_path):
    """A byte every 0.2 s never trips the timeout of a read; less than 1 KiB in `timeout` seconds stops it."""
    dest = tmp_path / "corpus.txt"
    server.trickle_after = 20_000
    start = time.monotonic()
    with pytest.raises(FluxtrainError) as e:
        download(server.url, dest, timeout=1)
    assert time.monotonic() - start < 5
    assert str(e.value) == (
        f"could not download data.url={server.url} (the download stalled: less than 1 KiB arrived in the last 1 s); "
        f"download it by hand to {dest}, or set data.path"
    )
    kept = (tmp_path / "corpus.txt.part").stat().st_size
    assert 0 < kept <= 20_000 + 10
    server.trickle_after = None
    assert download(server.url, dest, timeout=1).read_bytes() == BODY
    assert server.requests[-1].get("Range") == f"bytes={kept}-" and server.statuses == [200, 206]


def test_each_url_gets_its_own_file_and_partial_download(server, tmp_path):
    cache = tmp_path / "cache"
    default = DataConfig(path=None, url=SHAKESPEARE_URL, cache_dir=str(cache))
    assert download_path(default) == cache / "tinyshakespeare.txt"  # where earlier versions saved it
    corpus = DataConfig(path=None, url=server.url, sha256=SHA, cache_dir=str(cache))
    other = DataConfig(path=None, url=server.url.replace("corpus", "other"), sha256=None, cache_dir=str(cache))
    server.cut_after = 20_000
    with pytest.raises(FluxtrainError):
        resolve_text_path(corpus)  # leaves a partial download of corpus.txt
    part = download_path(corpus).with_name(download_path(corpus).name + ".part")
    kept = part.read_bytes()
    assert kept
    assert resolve_text_path(other).read_bytes() == OTHER  # not appended to corpus.txt's partial file
    assert part.read_bytes() == kept
    assert resolve_text_path(corpus).read_bytes() == BODY  # resumed, not overwritten by other.txt
    assert resolve_text_path(other).read_bytes() == OTHER  # no checksum: still the file of its own URL
    with_sha = DataConfig(path=None, url=other.url, sha256=hashlib.sha256(OTHER).hexdigest(), cache_dir=str(cache))
    resolve_text_path(with_sha)
    assert download_path(corpus).read_bytes() == BODY
    assert sorted(p.name for p in cache.iterdir()) == sorted({download_path(corpus).name, download_path(other).name})
    # The same name on another server is another file.
    assert download_path(DataConfig(url="http://example.org/x/corpus.txt")) != download_path(corpus)


def test_sha256_ignores_case_and_spaces_and_a_malformed_one_is_refused_before_downloading(server, tmp_path):
    cfg = DataConfig(path=None, url=server.url, sha256=f" {SHA.upper()} ", cache_dir=str(tmp_path / "cache"))
    assert resolve_text_path(cfg).read_bytes() == BODY
    n_requests = len(server.requests)
    for bad in ("abc", "", SHA + "0", "g" * 64):
        cfg = DataConfig(path=None, url=server.url, sha256=bad, cache_dir=str(tmp_path / "other"))
        with pytest.raises(FluxtrainError, match=r"^data\.sha256=.* is not a sha256 \(64 hex digits\)"):
            validate(cfg)
        with pytest.raises(FluxtrainError, match=r"^data\.sha256="):
            resolve_text_path(cfg)
    assert len(server.requests) == n_requests and not (tmp_path / "other").exists()


def test_http_errors_give_status_and_reason(server, tmp_path):
    url = server.url.replace("corpus", "missing")
    with pytest.raises(FluxtrainError) as e:
        download(url, tmp_path / "missing.txt", timeout=5)
    message = str(e.value)
    assert message.startswith(f"could not download data.url={url} (HTTP 404 Not Found); download it by hand to ")
    assert "\n" not in message and not list(tmp_path.iterdir())


def test_the_data_log_lines_name_the_url_and_the_cached_file(server, tiny_cfg, tmp_path, caplog):
    cache = tmp_path / "cache"
    cfg = tiny_cfg("data.path=null", f"data.url={server.url}", "data.sha256=null", f"data.cache_dir={cache}")
    dest = download_path(DataConfig(path=None, url=server.url, cache_dir=str(cache)))
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        train(cfg, tmp_path / "run")
    named = f"data.url={server.url} (cached as {dest})"
    lines = [r.message for r in caplog.records if r.message.startswith("data: ")]
    assert lines[0] == f"data: {named}: 1 file(s), {len(BODY):,} bytes"
    assert lines[1].startswith(f"data: {named} | ") and " train / " in lines[1]
