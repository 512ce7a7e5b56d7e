"""Pretrained: fetch a released checkpoint, verify it, and convert it into our networks (the seam of paper presets).

``pretrain.source`` names a registry entry (repro/registry.py). The file is downloaded (or copied from
``pretrain.mirror``, a base URL or a local directory) into ``checkpoints/`` (git-ignored: the weights are
CC BY-NC-SA), its sha256 checked against ``checkpoints.lock.json`` (pinned on first download; commit the lock),
read as data by the restricted unpickler (no code from the pickle runs), and written in our format
(safetensors + JSON architecture). Later stages read only our format.
"""

from __future__ import annotations

import logging
from pathlib import Path

from repro import registry
from repro.config import PretrainConfig

log = logging.getLogger(__name__)

LOCK_FILE = "checkpoints.lock.json"


def plan(cfg: PretrainConfig, root: Path, out: Path) -> dict:
    """What the stage would fetch, from where, and what it would write; touches nothing."""
    from repro.download import Lock

    ck = registry.get(cfg.source)
    lock_path = root / LOCK_FILE
    pinned = Lock(lock_path).get(ck.name) if lock_path.is_file() else None
    source = f"{cfg.mirror.rstrip('/')}/{ck.filename}" if cfg.mirror else ck.url
    return {
        "checkpoint": ck.name,
        "url": ck.url,
        "fetch_from": source,
        "download_to": str(root / "checkpoints" / ck.filename),
        "sha256": ck.sha256 or (pinned or {}).get("sha256") or f"not pinned yet (first download pins it in {LOCK_FILE})",
        "format": ck.fmt,
        "architecture": ck.arch,
        "targets": ck.paper,
        "licence": ck.licence,
        "convert_to": str(out),
        "supported": ck.convertible,
    }


def check(cfg: PretrainConfig) -> None:
    """Refuse, before anything is downloaded or written, a checkpoint our converter cannot read yet."""
    ck = registry.get(cfg.source)
    if not ck.convertible:
        raise ValueError(f"pretrain.source {ck.name}: converting {ck.family} checkpoints ({ck.fmt}) into our "
                         "networks is not supported yet; supported: "
                         + ", ".join(c.name for c in registry.CHECKPOINTS.values() if c.convertible))


def fetch_and_convert(cfg: PretrainConfig, root: Path, out: Path, progress: bool = True) -> dict:
    """Fetch + verify + convert ``cfg.source`` into ``out``; returns the converter's summary."""
    from repro.download import Lock, fetch
    from repro.edm_pickle import convert_edm_pickle

    check(cfg)
    ck = registry.get(cfg.source)
    dest = root / "checkpoints" / ck.filename
    path = fetch(ck.url, dest, sha256=ck.sha256, lock=Lock(root / LOCK_FILE), name=ck.name,
                 mirror=cfg.mirror or None, progress=progress)
    summary = convert_edm_pickle(path, out)
    log.info("converted %s (%s parameters, sha256 %s) into %s", path, summary.get("parameters"),
             str(summary.get("sha256"))[:12], out)
    return summary
