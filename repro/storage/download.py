"""Downloads of released checkpoints: resumable, retried, verified, hash-pinned, atomic.

The paper presets start from released files (EDM/EDM2 pickles on nvlabs-fi-cdn.nvidia.com, DDO weights on
huggingface.co, VAR .pth files), some of them gigabytes. ``fetch`` brings one of them to a local path:

* HTTP(S) with ``Range`` resume: bytes go to ``<dest>.part``; a retry, or a rerun after a crash, continues from
  the size of the .part (a server that ignores ``Range`` and answers 200 restarts it from 0);
* retried with exponential backoff on connection errors, timeouts, 5xx and truncated bodies (4xx fail at once);
* the body length is checked against ``Content-Length`` / ``Content-Range``;
* verified: against an explicit ``sha256``, else against the hash pinned in a :class:`Lock` file; with neither,
  the hash of the first download is pinned ("trust on first use", like DVC's lock), and later downloads of that
  name must match it;
* atomic: the .part is renamed to ``dest`` only after the whole body arrived and the hash matched, so ``dest``
  never holds a partial or unverified file;
* a local path (or ``file://`` URL) works instead of a URL, for air-gapped clusters; ``mirror`` replaces the
  scheme, host and directory of a URL and keeps its file name (an http(s) base URL or a local directory).

Hand-written on the standard library (urllib) because pooch has no Range resume. Nothing is unpickled here:
this module only moves bytes and hashes them. Every failure is a :class:`DownloadError` whose message names
the URL or file and says what to do.

Example::

    from pathlib import Path
    from repro.storage.download import Lock, fetch

    lock = Lock("checkpoints.lock.json")           # commit this file
    path = fetch("https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl",
                 Path("checkpoints/edm-cifar10-32x32-cond-vp.pkl"), lock=lock)
    # first run: downloads, pins {url, sha256, size} under the name "edm-cifar10-32x32-cond-vp.pkl";
    # later runs: returns at once if the file is there and matches, else downloads and checks the pin.
    fetch(url, dest, lock=lock, mirror="http://fileserver.internal/ckpts")   # same file name on a mirror
    fetch("/shared/ckpts/edm-cifar10-32x32-cond-vp.pkl", dest, lock=lock)    # air-gapped: a local copy
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO, Callable

from tqdm.auto import tqdm

from repro.storage.files import sha256_file
from repro.storage.layout import QUARANTINE

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "repro-download/1 (+urllib)"
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DownloadError(Exception):
    """A download, copy or verification failed; the message names the URL/file and the fix."""


class _Retryable(Exception):
    """Internal: this attempt failed in a way that another attempt may fix."""


# ---------------------------------------------------------------------------------------------------------
# Hashing and the lock file


class Lock:
    """Pinned hashes: a JSON file mapping name -> {"url", "sha256", "size"} (sorted, human-readable).

    Commit the file next to the code: it is what makes a download "the same file" from one machine or year to
    the next. Each :meth:`pin` re-reads the file before writing (so entries written meanwhile by another
    process are kept) and replaces it atomically.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._mutex = threading.Lock()
        self._entries = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError) as e:
            raise DownloadError(f"Lock file {self.path} is not readable JSON ({e}). Fix it by hand (restore it "
                                f"from git), or delete it to pin every file afresh on its next download.") from e
        if not isinstance(data, dict) or not all(isinstance(v, dict) and "sha256" in v for v in data.values()):
            raise DownloadError(f"Lock file {self.path} must map each name to {{url, sha256, size}}. Restore "
                                f"it from git, or delete it to pin every file afresh on its next download.")
        return data

    def get(self, name: str) -> dict[str, Any] | None:
        entry = self._entries.get(name)
        return dict(entry) if entry is not None else None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._entries.items()}

    def pin(self, name: str, *, url: str, sha256: str, size: int) -> None:
        with self._mutex:
            entries = self._read()
            entries[name] = {"sha256": sha256, "size": int(size), "url": url}
            text = json.dumps(entries, indent=2, sort_keys=True) + "\n"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except OSError as e:
                raise DownloadError(f"Could not write the lock file {self.path}: {e}. Check that its directory "
                                    f"is writable and has free space.") from e
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self._entries = entries


# ---------------------------------------------------------------------------------------------------------
# Source resolution


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _resolve(source: str, mirror: str | None) -> tuple[str, bool]:
    """-> (URL or local path to read from, is_url)."""
    source = str(source)
    if source.startswith("file://"):
        source = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
    if mirror and _is_url(source):
        filename = urllib.parse.unquote(Path(urllib.parse.urlparse(source).path).name)
        if _is_url(mirror):
            return f"{mirror.rstrip('/')}/{urllib.parse.quote(filename)}", True
        return str(Path(mirror.removeprefix("file://")) / filename), False
    return source, _is_url(source)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _disk_full(e: OSError, part: Path, have: int, total: int | None) -> DownloadError:
    directory = part.parent.resolve()
    try:
        free = _fmt_bytes(shutil.disk_usage(directory).free)
    except OSError:
        free = "unknown"
    need = f"; the file is {_fmt_bytes(total)}" if total else ""
    return DownloadError(f"No space left on the device holding {directory} (while writing {part.name}, "
                         f"{_fmt_bytes(have)} written{need}, {free} free). Free space there or choose a destination "
                         f"on another disk; a rerun resumes from {part.name} (delete it to start over).")


# ---------------------------------------------------------------------------------------------------------
# fetch


def fetch(source: str, dest: Path, *, sha256: str | None = None, lock: Lock | None = None, name: str | None = None,
          mirror: str | None = None, retries: int = 5, timeout: float = 60, progress: bool = True,
          backoff: float = 1.0, verify: Callable[[Path], Any] | None = None) -> Path:
    """Bring ``source`` (http(s) URL, ``file://`` URL or local path) to ``dest``, verified; return ``dest``.

    ``sha256``: the expected hash (always wins, must match). ``lock``/``name``: the pin file and the entry name
    (default ``dest.name``); with no ``sha256`` and no pin, the hash is computed and pinned. ``mirror``: a base
    URL (or local directory) that replaces everything but the file name of a URL source. ``retries``: attempts
    in all; ``backoff``: seconds before the 2nd attempt, doubled after each (capped at 60; 0 in tests).
    ``verify``: called with the verified file (e.g. the conversion) before it is pinned: a file it refuses (any
    exception) is moved to ``checkpoints/quarantine/`` with the reason, never pinned, and the error propagates.
    """
    dest = Path(dest)

    def checked(sha: str, size: int, note: str | None, pin: bool = True) -> Path:
        if verify is not None:
            try:
                verify(dest)
            except Exception as e:
                quarantine(dest, name, sha, e)
                raise
        if pin and lock is not None and (pinned is None or pinned.get("sha256") != sha):
            _pin(lock, name, str(source), sha, size, note=note)
        return dest

    name = name or dest.name
    pinned = lock.get(name) if lock is not None else None
    expected = (sha256 or (pinned or {}).get("sha256") or "").lower() or None
    origin, is_url = _resolve(source, mirror)
    where = origin if is_url else f"local file {origin}"
    part = dest.with_suffix(dest.suffix + ".part")

    if dest.is_file():
        got = sha256_file(dest)
        if expected is None:
            return checked(got, dest.stat().st_size, f"existing file {dest}")
        if got == expected:
            return checked(got, dest.stat().st_size, "explicit sha256 argument", pin=bool(sha256 and pinned))
        log.warning("%s exists but its sha256 %s is not the expected %s; downloading it again.", dest, got, expected)

    if not is_url:
        src = Path(origin)
        if src.resolve() == dest.resolve():
            raise DownloadError(f"{name}: the local source {src} is the destination itself and does not match the "
                                f"expected sha256 {expected}. Point the source at an intact copy.")
        if not src.is_file():
            hint = f" (mirror {mirror!r} + file name of {source})" if mirror else ""
            raise DownloadError(f"{name}: local source {src}{hint} does not exist or is not a file. Check the path, "
                                f"or pass the http(s) URL to download it.")
        _copy_local(src, part, name=name, progress=progress)
    else:
        _download(origin, part, name=name, retries=retries, timeout=timeout, progress=progress, backoff=backoff,
                  pinned_size=(pinned or {}).get("size") if not sha256 else None, pinned=pinned if not sha256 else None,
                  lock=lock)

    got = sha256_file(part)
    size = part.stat().st_size
    if expected is not None and got != expected:
        part.unlink(missing_ok=True)
        if sha256:
            raise DownloadError(f"{name}: sha256 mismatch for {where}: expected {expected}, got {got}. The file is "
                                f"refused and was deleted. Check the URL/mirror/local copy; if the upstream file "
                                f"changed on purpose, update the expected hash.")
        raise DownloadError(_pin_message(name, where, lock, f"pinned sha256 {expected}, got {got}"))
    os.replace(part, dest)
    log.info("%s: %s (%s, sha256 %s)", name, dest, _fmt_bytes(size), got[:16])
    return checked(got, size, "explicit sha256 argument" if pinned else None)


def quarantine(path: Path, name: str, sha: str, error: BaseException) -> Path:
    """Move a downloaded file that failed its check aside, to ``<its folder>/quarantine/``, with the reason beside
    it: never pinned, never picked up again by a later run (which downloads afresh)."""
    folder = path.parent / QUARANTINE
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{path.name}.{sha[:12]}"
    os.replace(path, target)
    reason = " ".join(str(error).split())
    (folder / f"{target.name}.reason.txt").write_text(f"{name}: {path.name} (sha256 {sha}) refused: "
                                                      f"{type(error).__name__}: {reason}\n")
    log.warning("%s: %s refused (%s); moved to %s, not pinned", name, path, reason[:200], target)
    return target


def _pin_message(name: str, where: str, lock: Lock | None, detail: str) -> str:
    lock_path = lock.path if lock is not None else "the lock file"
    return (f"{name}: the file from {where} no longer matches the pinned entry in {lock_path} ({detail}). The file "
            f"is refused and was deleted. If the upstream file changed on purpose, delete the '{name}' entry from "
            f"{lock_path}, rerun to pin the new file, and commit the lock file; otherwise check the URL/mirror.")


def _pin(lock: Lock, name: str, url: str, sha: str, size: int, note: str | None = None) -> None:
    lock.pin(name, url=url, sha256=sha, size=size)
    why = f" (from the {note})" if note else ""
    log.info("Pinned %s: sha256 %s, %s%s in %s. Commit %s so that every later download of it is checked "
             "against this hash.", name, sha, _fmt_bytes(size), why, lock.path, lock.path.name)


def _open_part(part: Path, mode: str) -> BinaryIO:
    part.parent.mkdir(parents=True, exist_ok=True)
    return open(part, mode)  # noqa: SIM115


def _write(f: BinaryIO, block: bytes, part: Path, have: int, total: int | None) -> None:
    try:
        f.write(block)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise _disk_full(e, part, have, total) from e
        raise DownloadError(f"Could not write {part}: {e}. Check the destination directory {part.parent}.") from e


def _copy_local(src: Path, part: Path, *, name: str, progress: bool) -> None:
    total = src.stat().st_size
    have = 0
    try:
        with open(src, "rb") as fin, _open_part(part, "wb") as fout, \
                tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress,
                     leave=False) as bar:
            while block := fin.read(CHUNK):
                _write(fout, block, part, have, total)
                have += len(block)
                bar.update(len(block))
            _flush(fout, part, have, total)
    except DownloadError:
        raise
    except OSError as e:
        part.unlink(missing_ok=True)
        if e.errno in _DISK_FULL:
            raise _disk_full(e, part, have, total) from e
        raise DownloadError(f"{name}: could not copy the local file {src} to {part}: {e}.") from e


def _flush(f: BinaryIO, part: Path, have: int, total: int | None) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise _disk_full(e, part, have, total) from e
        raise


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.I)


def _download(url: str, part: Path, *, name: str, retries: int, timeout: float, progress: bool, backoff: float,
              pinned_size: int | None, pinned: dict | None, lock: Lock | None,
              sleep: Callable[[float], None] = time.sleep) -> None:
    """Fill ``part`` with the whole body of ``url`` (resuming an existing .part); raise DownloadError."""
    opener = urllib.request.build_opener()  # reads the proxy environment now, not at import
    retries = max(1, int(retries))
    attempt, last_error, total = 0, "no attempt made", None
    while attempt < retries:
        attempt += 1
        if attempt > 1 and backoff > 0:
            sleep(min(backoff * 2 ** (attempt - 2), 60.0))
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            status = e.code
            e.close()
            if status == 416 and have:  # the .part is as long as (or longer than) the file: start over
                log.warning("%s: server refused to resume at byte %d (HTTP 416); restarting from 0.", url, have)
                part.unlink(missing_ok=True)
                attempt -= 1
                continue
            if status in _RETRY_STATUS:
                last_error = f"HTTP {status} {e.reason}"
                log.warning("%s: %s (attempt %d/%d)", url, last_error, attempt, retries)
                continue
            raise DownloadError(f"{url}: HTTP {status} {e.reason}. The server refused the file (not retried): "
                                f"check the URL (or the mirror), or download the file by hand and pass its local "
                                f"path as the source.") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            log.warning("%s: cannot connect: %s (attempt %d/%d)", url, last_error, attempt, retries)
            continue

        with resp:
            status = resp.status
            length = resp.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            if status == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != have:
                    log.warning("%s: server answered a range other than the one asked for; restarting from 0.", url)
                    part.unlink(missing_ok=True)
                    attempt -= 1
                    continue
                total = int(m.group(3)) if m.group(3) != "*" else (have + length if length is not None else None)
                mode = "ab"
            else:
                if have:
                    log.info("%s: server ignored the Range request (HTTP %d); restarting from 0.", url, status)
                have, mode = 0, "wb"
                total = length
            if pinned_size is not None and total is not None and total != pinned_size:
                part.unlink(missing_ok=True)
                raise DownloadError(_pin_message(name, url, lock, f"pinned size {pinned_size} bytes, the server "
                                                                  f"announces {total} bytes"))
            try:
                have = _stream(resp, part, mode, have, total, name, progress)
            except OSError as e:  # closing/flushing the .part failed (the body's own errors are _Retryable)
                if e.errno in _DISK_FULL:
                    raise _disk_full(e, part, part.stat().st_size if part.exists() else 0, total) from e
                raise DownloadError(f"Could not write {part}: {e}. Check the destination directory.") from e
            except _Retryable as e:
                last_error = str(e)
                have = part.stat().st_size if part.exists() else 0
                log.warning("%s: connection lost at byte %d of %s: %s (attempt %d/%d)", url, have,
                            total if total is not None else "?", e, attempt, retries)
                continue
        if total is None or have == total:
            return
        if have > total:
            log.warning("%s: received %d bytes, more than the announced %d; restarting from 0.", url, have, total)
            part.unlink(missing_ok=True)
            last_error = f"body longer than announced ({have} > {total} bytes)"
            continue
        last_error = f"truncated body ({have} of {total} bytes)"
        log.warning("%s: %s (attempt %d/%d)", url, last_error, attempt, retries)
    have = part.stat().st_size if part.exists() else 0
    kept = (f"The partial file {part} ({_fmt_bytes(have)}) is kept: rerun to resume from it"
            if have else "Rerun later")
    raise DownloadError(f"{url}: download failed after {retries} attempts ({have} of "
                        f"{total if total is not None else '?'} bytes; last error: {last_error}). {kept}, or use "
                        f"mirror=... or a local copy of the file as the source.")


def _stream(resp: http.client.HTTPResponse, part: Path, mode: str, have: int, total: int | None, name: str,
            progress: bool) -> int:
    """Append the response body to ``part``; return the .part size. Network errors -> _Retryable."""
    with _open_part(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=name, disable=not progress, leave=False) as bar:
        try:
            while True:
                try:
                    block = resp.read1(CHUNK)
                except (http.client.HTTPException, OSError, socket.timeout) as e:
                    raise _Retryable(f"{type(e).__name__}: {e}") from e
                if not block:
                    break
                _write(f, block, part, have, total)
                have += len(block)
                bar.update(len(block))
        except DownloadError:
            try:  # keep what was written; a failing flush must not hide the DownloadError
                f.flush()
            except OSError:
                pass
            raise
        _flush(f, part, have, total)
    return have


__all__ = ["DownloadError", "Lock", "fetch", "sha256_file"]
