"""repro.storage.download against a local HTTP server on 127.0.0.1 (random port) with selectable misbehaviours.

The server serves bytes the tests generate, under /<mode>/<file name>:
  ok        Range honoured (206), else 200
  drop      the first request sends half of its body (with the full Content-Length) and closes; then like ok
  norange   the first request drops like `drop`; later requests ignore Range (200, full body)
  truncate  every request: 200 with the full Content-Length, half of the body, close
  slow      sends half, waits until the test sets `resume`, sends the rest
  flaky     the first request gets 503; then like ok
  missing   404
Nothing here may connect anywhere but 127.0.0.1 (an autouse fixture enforces it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from repro.storage import download
from repro.storage.download import DownloadError, Lock, fetch

SIZE = 2_000_000 + 123  # not a multiple of the read size


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class State:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.resume = threading.Event()
        self.mutex = threading.Lock()

    def seen(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _plain(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        state: State = self.server.state  # type: ignore[attr-defined]
        rng = self.headers.get("Range")
        with state.mutex:
            state.requests.append((self.path, rng))
            nth = len(state.seen(self.path))
        mode, _, fname = self.path.lstrip("/").partition("/")
        data = state.files.get(fname)
        if mode == "missing" or data is None:
            return self._plain(404, "not found")
        if mode == "flaky" and nth == 1:
            return self._plain(503, "try later")
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        honour = mode in ("ok", "drop", "slow", "flaky") or (mode == "norange" and nth == 1)
        if m and honour:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        half = len(body) // 2
        if mode == "truncate" or (mode in ("drop", "norange") and nth == 1):
            self.wfile.write(body[:half])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "slow":
            self.wfile.write(body[:half])
            self.wfile.flush()
            state.resume.wait(20)
            body = body[half:]
        self.wfile.write(body)


@pytest.fixture(autouse=True)
def only_localhost(monkeypatch):
    """Fail any connection to an address other than 127.0.0.1; ignore proxy settings of the environment."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"test tried to connect to {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = State()  # type: ignore[attr-defined]
    httpd.state.files["model.pkl"] = os.urandom(SIZE)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield base, httpd.state
    finally:
        httpd.state.resume.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
        assert not thread.is_alive()


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_plain_download_is_exact_and_dest_appears_only_at_the_end(server, tmp_path):
    base, state = server
    data = state.files["model.pkl"]
    dest = tmp_path / "ckpt" / "model.pkl"
    part = dest.with_name("model.pkl.part")
    result: dict = {}

    def run():
        try:
            result["path"] = fetch(f"{base}/slow/model.pkl", dest, sha256=sha(data), progress=False, backoff=0)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert part.exists() and part.stat().st_size > 0, "no .part while the body was streaming"
        assert not dest.exists(), "dest must not exist before the whole body arrived and was verified"
    finally:
        state.resume.set()
        t.join(20)
    assert "error" not in result, result.get("error")
    assert result["path"] == dest
    assert dest.read_bytes() == data
    assert files_in(dest.parent) == ["model.pkl"]
    assert state.seen("/slow/model.pkl") == [None]


def test_dropped_connection_resumes_with_range(server, tmp_path):
    base, state = server
    data = state.files["model.pkl"]
    dest = tmp_path / "model.pkl"
    fetch(f"{base}/drop/model.pkl", dest, sha256=sha(data), progress=False, backoff=0)
    assert dest.read_bytes() == data
    assert state.seen("/drop/model.pkl") == [None, f"bytes={SIZE // 2}-"]
    assert files_in(tmp_path) == ["model.pkl"]


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    base, state = server
    data = state.files["model.pkl"]
    dest = tmp_path / "model.pkl"
    (tmp_path / "model.pkl.part").write_bytes(data[:700_001])
    fetch(f"{base}/ok/model.pkl", dest, sha256=sha(data), progress=False, backoff=0)
    assert dest.read_bytes() == data
    assert state.seen("/ok/model.pkl") == ["bytes=700001-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    base, state = server
    data = state.files["model.pkl"]
    dest = tmp_path / "model.pkl"
    fetch(f"{base}/norange/model.pkl", dest, sha256=sha(data), progress=False, backoff=0)
    assert dest.read_bytes() == data
    # the retry asked for a range, got a 200 with the full body, and must not have appended it to the .part
    assert state.seen("/norange/model.pkl") == [None, f"bytes={SIZE // 2}-"]


def test_transient_503_is_retried(server, tmp_path):
    base, state = server
    dest = fetch(f"{base}/flaky/model.pkl", tmp_path / "m.pkl", progress=False, backoff=0)
    assert dest.read_bytes() == state.files["model.pkl"]
    assert len(state.seen("/flaky/model.pkl")) == 2


def test_404_fails_at_once_naming_the_url(server, tmp_path):
    base, state = server
    url = f"{base}/missing/model.pkl"
    dest = tmp_path / "sub" / "model.pkl"
    with pytest.raises(DownloadError) as e:
        fetch(url, dest, retries=5, progress=False, backoff=0)
    assert url in str(e.value) and "404" in str(e.value)
    assert len(state.seen("/missing/model.pkl")) == 1
    assert not dest.exists() and not dest.with_name("model.pkl.part").exists()
    assert files_in(dest.parent) == []


def test_explicit_hash_mismatch_is_refused_and_deleted(server, tmp_path):
    base, state = server
    dest = tmp_path / "model.pkl"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as e:
        fetch(f"{base}/ok/model.pkl", dest, sha256=wrong, progress=False, backoff=0)
    msg = str(e.value)
    assert wrong in msg and sha(state.files["model.pkl"]) in msg and "refused" in msg
    assert files_in(tmp_path) == []


def test_first_download_pins_and_tampered_file_is_refused(server, tmp_path, caplog):
    base, state = server
    data = state.files["model.pkl"]
    lock_path = tmp_path / "checkpoints.lock.json"
    dest = tmp_path / "ckpt" / "model.pkl"
    url = f"{base}/ok/model.pkl"
    with caplog.at_level(logging.INFO, logger="repro.storage.download"):
        fetch(url, dest, lock=Lock(lock_path), progress=False, backoff=0)
    assert json.loads(lock_path.read_text()) == {"model.pkl": {"sha256": sha(data), "size": SIZE, "url": url}}
    assert "commit" in caplog.text.lower() and lock_path.name in caplog.text

    # same size, one byte changed upstream
    state.files["model.pkl"] = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
    dest.unlink()
    with pytest.raises(DownloadError) as e:
        fetch(url, dest, lock=Lock(lock_path), progress=False, backoff=0)
    assert "no longer matches the pinned" in str(e.value) and str(lock_path) in str(e.value)
    assert files_in(dest.parent) == []

    # different size: refused from the headers
    state.files["model.pkl"] = data + b"x"
    with pytest.raises(DownloadError, match="no longer matches the pinned"):
        fetch(url, dest, lock=Lock(lock_path), progress=False, backoff=0)
    assert files_in(dest.parent) == []
    # the pin itself was not touched
    assert json.loads(lock_path.read_text())["model.pkl"]["sha256"] == sha(data)


def test_existing_verified_file_makes_no_request(server, tmp_path):
    base, state = server
    data = state.files["model.pkl"]
    lock = Lock(tmp_path / "checkpoints.lock.json")
    dest = tmp_path / "model.pkl"
    url = f"{base}/ok/model.pkl"
    fetch(url, dest, lock=lock, progress=False)
    assert len(state.requests) == 1
    assert fetch(url, dest, lock=Lock(lock.path), progress=False) == dest
    assert fetch(url, dest, sha256=sha(data), progress=False) == dest
    assert len(state.requests) == 1
    # a corrupted local copy is downloaded again
    dest.write_bytes(b"corrupt")
    fetch(url, dest, lock=lock, progress=False)
    assert dest.read_bytes() == data and len(state.requests) == 2


def test_local_path_and_mirror(server, tmp_path):
    base, state = server
    data = state.files["model.pkl"]
    src = tmp_path / "shared" / "model.pkl"
    src.parent.mkdir()
    src.write_bytes(data)
    lock = Lock(tmp_path / "checkpoints.lock.json")
    out = fetch(str(src), tmp_path / "a" / "model.pkl", lock=lock, progress=False)
    assert out.read_bytes() == data and lock.get("model.pkl")["sha256"] == sha(data)

    upstream = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/model.pkl"
    out = fetch(upstream, tmp_path / "b" / "model.pkl", mirror=f"{base}/ok/", sha256=sha(data), progress=False)
    assert out.read_bytes() == data
    assert [p for p, _ in state.requests] == ["/ok/model.pkl"]

    with pytest.raises(DownloadError) as e:
        fetch(str(tmp_path / "nowhere" / "model.pkl"), tmp_path / "c" / "model.pkl", progress=False)
    assert str(tmp_path / "nowhere" / "model.pkl") in str(e.value) and "does not exist" in str(e.value)
    assert not (tmp_path / "c" / "model.pkl").exists()


def test_disk_full_names_the_directory(server, tmp_path, monkeypatch):
    base, _ = server
    real_open = download._open_part

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(download, "_open_part", lambda part, mode: Full(real_open(part, mode)))
    dest = tmp_path / "disk" / "model.pkl"
    with pytest.raises(DownloadError) as e:
        fetch(f"{base}/ok/model.pkl", dest, progress=False, backoff=0)
    msg = str(e.value)
    assert "No space left" in msg and str(dest.parent.resolve()) in msg
    assert "Free space there" in msg and "another disk" in msg  # says what to do, not just the errno
    assert not dest.exists()


def test_truncated_on_every_attempt_fails_after_retries(server, tmp_path):
    base, state = server
    url = f"{base}/truncate/model.pkl"
    dest = tmp_path / "model.pkl"
    with pytest.raises(DownloadError) as e:
        fetch(url, dest, retries=3, progress=False, backoff=0)
    assert url in str(e.value) and "after 3 attempts" in str(e.value)
    assert len(state.seen("/truncate/model.pkl")) == 3
    assert not dest.exists()
