"""Downloading the default corpus against a local HTTP server: success, checksum mismatch, server down, resume."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fluxtrain.data import DataConfig, download, resolve_text_path
from fluxtrain.errors import FluxtrainError

BODY = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 400).encode()
SHA = hashlib.sha256(BODY).hexdigest()


class Server:
    """Serves BODY at /corpus.txt with HTTP Range support; `cut_after` drops the connection part-way once."""

    def __init__(self):
        self.requests: list[dict] = []
        self.cut_after: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(dict(self.headers))
                if self.path != "/corpus.txt":
                    self.send_error(404)
                    return
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(BODY) - start))
                self.end_headers()
                payload = BODY[start:]
                if server.cut_after is not None:
                    payload, server.cut_after = payload[: server.cut_after], None
                    self.wfile.write(payload)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

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
    assert path == tmp_path / "cache" / "tinyshakespeare.txt"
    assert path.read_bytes() == BODY
    assert not list(path.parent.glob("*.part"))
    resolve_text_path(cfg)  # second call: the verified file is reused, no request
    assert len(server.requests) == 1


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    dest = tmp_path / "corpus.txt"
    with pytest.raises(FluxtrainError, match="checksum mismatch.*data.sha256"):
        download(server.url, dest, sha256="0" * 64)
    assert not dest.exists() and not list(tmp_path.iterdir())


def test_server_down_names_url_and_destination(tmp_path):
    url = "http://127.0.0.1:9/corpus.txt"  # port 9 (discard): nothing listens
    dest = tmp_path / "corpus.txt"
    with pytest.raises(FluxtrainError) as e:
        download(url, dest, sha256=SHA, timeout=5)
    assert url in str(e.value) and str(dest) in str(e.value) and "\n" not in str(e.value)
    assert not dest.exists()
    # Offline with a wrong file in place: the message says that file is the problem.
    dest.write_text("hello")
    with pytest.raises(FluxtrainError) as e:
        download(url, dest, sha256=SHA, timeout=5)
    wrong = hashlib.sha256(b"hello").hexdigest()
    assert str(e.value).endswith(f"; the file already at {dest} has sha256 {wrong}, not data.sha256={SHA}")


def test_interrupted_download_resumes_with_range(server, tmp_path):
    dest = tmp_path / "corpus.txt"
    server.cut_after = 20_000
    with pytest.raises(FluxtrainError):
        download(server.url, dest, sha256=SHA, timeout=5)
    part = tmp_path / "corpus.txt.part"
    assert not dest.exists(), "an interrupted download must not look complete"
    kept = part.stat().st_size
    assert 0 < kept <= 20_000  # whole chunks received before the cut are kept
    download(server.url, dest, sha256=SHA, timeout=5)
    assert dest.read_bytes() == BODY
    assert server.requests[-1].get("Range") == f"bytes={kept}-"
    assert not part.exists()
