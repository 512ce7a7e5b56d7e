"""Files: atomic writes, sha256, and our checkpoint format (safetensors + JSON architecture in its metadata).

Every output of every stage is written through these helpers: to a temporary name in the same directory,
then renamed, so that a killed stage never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it.

    ``suffix`` keeps the extension libraries insist on (np.savez appends '.npz' otherwise).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
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
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------------------------------------
# Model checkpoints: safetensors weights + the JSON architecture needed to rebuild the network.


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors (moved to the CPU, contiguous) and string metadata atomically, the same bytes every time.
    Every safetensors file of the package is written here."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
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
