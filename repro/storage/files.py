"""Files: atomic writes, sha256, and our checkpoint format (safetensors + JSON architecture in its metadata).

Every output of every stage is written through these helpers: to a temporary name in the same directory,
then renamed, so that a killed stage never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch


class BadFile(ValueError):
    """An input file that cannot be read as what it should be (truncated, empty, random bytes, wrong format):
    names the file and the fix. The CLI prints it as one `error:` line, exit 2."""

    def __init__(self, path: Path | str, what: str, reason: str, fix: str | None = None):
        self.path = Path(path)
        super().__init__(f"{path}: {what} cannot be read ({reason}). Fix: "
                         f"{fix or 'delete it and rerun the stage that makes it (dvc repro), or restore it'}")


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if "allow_pickle" in text or "pickled" in text:  # numpy's advice to allow pickles is the wrong advice here
        text = "not a numpy array file (it would need pickle, which is never allowed)"
    return text[:200]


def _format_errors() -> tuple:
    import json
    import zipfile
    import zlib

    from safetensors import SafetensorError

    return (SafetensorError, zipfile.BadZipFile, zlib.error, EOFError, json.JSONDecodeError, UnicodeDecodeError,
            ValueError)


@contextlib.contextmanager
def readable(path: Path | str, what: str = "the file") -> Iterator[None]:
    """Turn a format error while reading ``path`` (safetensors, npz, JSON) into a BadFile naming it."""
    try:
        yield
    except BadFile:
        raise
    except _format_errors() as e:
        raise BadFile(path, what, _reason(e)) from e
    except RuntimeError as e:  # safetensors/torch on a truncated file
        if "safetensor" in str(e).lower() or "header" in str(e).lower():
            raise BadFile(path, what, _reason(e)) from e
        raise


def read_json(path: Path | str) -> Any:
    """A JSON file as data; a file that is not JSON is a BadFile naming it."""
    with readable(path, "JSON file"):
        return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask sets it to read it, which two
    threads doing at once could leave changed)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create 0600/0700; a published output gets the mode a plain open() would (umask 022:
    group- and world-readable), so that the rest of a group can read it on a shared cluster."""
    with contextlib.suppress(OSError):
        os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it.

    ``suffix`` keeps the extension libraries insist on (np.savez appends '.npz' otherwise).
    Temporary files of earlier writes of ``path`` whose process is dead (killed mid-write) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{socket.gethostname()}.{os.getpid()}.",
                               suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _honour_umask(tmp, 0o666)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Remove the temporary files or folders of earlier writes of ``path`` whose process is dead (killed mid-write):
    they are named ``.<name>.<host>.<pid>.<random>`` (one of another host, or of a live process, stays)."""
    host = socket.gethostname()
    for d in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(host)}.*"):
        pid = d.name[len(f".{path.name}.{host}."):].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` as a whole. Temporary folders
    left by a killed earlier publish of ``path`` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{socket.gethostname()}.{os.getpid()}.", dir=path.parent))
    try:
        yield tmp
        _honour_umask(tmp, 0o777)
        if path.exists():
            old = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def link_or_copy(src: Path, dest: Path) -> None:
    """A hard link to ``src`` at ``dest`` (no copy of the bytes), or a copy where links are not possible.

    Safe for files written only through atomic_path: a rewrite of ``src`` makes a new file and leaves ``dest``.
    """
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with readable(path, "array file (.npz)"), np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------------------------------------
# Model checkpoints: safetensors weights + the JSON architecture needed to rebuild the network.


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors (moved to the CPU, contiguous) and string metadata atomically, the same bytes every time.
    Every safetensors file of the package is written here."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(Path(path)) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as e:  # safetensors' I/O errors (a full disk) as the OSError they are
            code = re.search(r"code: (\d+)", str(e))
            if code:
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e
            raise
        _sort_safetensors_header(tmp)


def _sort_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys, in place: safetensors writes its metadata in hash-map
    order, which changes from call to call, so the same weights would not give the same bytes (DVC's hash)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        text = json.dumps(json.loads(f.read(n)), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # same content, so the same length; the header is padded with spaces
            f.seek(8)
            f.write(text.ljust(n))




def save_png(path: Path, image: np.ndarray, scale: int = 4) -> None:
    """A uint8 image (H, W) or (H, W, C) as a PNG, upscaled ``scale`` times (nearest), written atomically."""
    from PIL import Image

    img = Image.fromarray(image)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def load_safetensors(path: Path | str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated, empty or foreign file is a BadFile naming it."""
    from safetensors.torch import load_file

    with readable(path, "safetensors file"):
        return load_file(str(path), device=device)


def _recorded(path: Path) -> Path:
    from repro.storage.layout import SHA256_SUFFIX

    return Path(path).with_name(Path(path).name + SHA256_SUFFIX)


def record_sha256(path: Path) -> str:
    """Record ``path``'s sha256 beside it, as ``<name>.sha256`` (the format `sha256sum -c` reads), for the stages
    that read it later (:func:`check_recorded`). The file itself is not touched."""
    digest = sha256_file(Path(path))
    write_text(_recorded(path), f"{digest}  {Path(path).name}\n")
    return digest


def check_recorded(path: Path) -> None:
    """``path`` still has the sha256 its producing stage recorded beside it (no record: nothing to check), else a
    BadFile: a model changed after its stage wrote it is never used."""
    rec = _recorded(path)
    if not rec.is_file():
        return
    want = rec.read_text(encoding="utf-8", errors="replace").split(" ", 1)[0].strip()
    got = sha256_file(Path(path))
    if got != want:
        raise BadFile(path, "model file", f"its sha256 {got[:16]}... is not the {want[:16]}... its stage recorded in "
                      f"{rec.name}: it changed after it was written",
                      "restore it, or rerun the stage that makes it (`dvc repro -f -s <stage>`)")
