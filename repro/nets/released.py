"""Pretrained: fetch a released checkpoint, verify it, and convert it into our networks (the seam of paper presets).

``pretrain.source`` names a registry entry (repro/catalog/registry.py). The file is downloaded (or copied from
``pretrain.mirror``, a base URL or a local directory) into ``checkpoints/`` (git-ignored: the weights are
CC BY-NC-SA), its sha256 checked against ``checkpoints.lock.json`` (pinned on first download; commit the lock),
read as data by the restricted unpickler (no code from the pickle runs), and written in our format
(safetensors + JSON architecture). Later stages read only our format.

The same path brings what sampling needs beside the main network: the guide of autoguidance
(``sampler.guide``, converted into ``models/guide.safetensors``) and, for a latent model, the decoder its
registry entry names (the SD-VAE, kept as ``checkpoints/<name>.safetensors``, checked against the lock again
whenever it is loaded). :func:`sampling_extras` loads both for ``generate_images``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from repro.catalog import registry
from repro.config import Config, PretrainConfig, SamplerConfig
from repro.storage.layout import LOCK_FILE, Paths

log = logging.getLogger(__name__)



def _plan_one(ck: registry.Checkpoint, cfg: PretrainConfig, root: Path, dest: Path) -> dict:
    from repro.storage.download import Lock

    lock_path = Paths(root).lock
    pinned = Lock(lock_path).get(ck.name) if lock_path.is_file() else None
    source = f"{cfg.mirror.rstrip('/')}/{ck.filename}" if cfg.mirror else ck.url
    return {
        "checkpoint": ck.name,
        "url": ck.url,
        "fetch_from": source,
        "download_to": str(dest),
        "sha256": ck.sha256 or (pinned or {}).get("sha256") or f"not pinned yet (first download pins it in {LOCK_FILE})",
        "format": ck.fmt,
        "architecture": ck.arch,
        "targets": ck.paper,
        "licence": ck.licence,
    }


def plan(cfg: PretrainConfig, root: Path, out: Path, sampler: SamplerConfig | None = None) -> dict:
    """What the stage would fetch, from where, and what it would write; touches nothing."""
    ck = registry.get(cfg.source)
    out_plan = {**_plan_one(ck, cfg, root, Paths(root).checkpoint(ck.filename)), "convert_to": str(out),
                "supported": ck.convertible}
    if sampler is not None and sampler.guide:
        g = registry.get(sampler.guide)
        out_plan["guide"] = {**_plan_one(g, cfg, root, Paths(root).checkpoint(g.filename)),
                             "convert_to": str(Paths(root).guide), "guidance": sampler.guidance}
    if decoder_name(cfg):
        d = registry.get_decoder(decoder_name(cfg))
        out_plan["decoder"] = _plan_one(d, cfg, root, Paths(root).decoder(d.name))
    if ck.tokenizer:
        tk = registry.get(ck.tokenizer)
        out_plan["tokenizer"] = _plan_one(tk, cfg, root, Paths(root).checkpoint(tk.filename))
    return out_plan


def decoder_name(cfg: PretrainConfig) -> str | None:
    """The decoder a latent model's samples need (a registry DECODERS name), or None (pixels).

    A released model: the one its registry entry names. A model trained here on latents: ``pretrain.decoder``, the
    VAE the data stage encoded the data with (the data manifest records its name and sha256; the ddo stage checks
    that the decoder it loads is that file, :func:`check_encoded_with`). One name drives the encoder of the data
    stage and the decoder of the pretrain grid, the DDO selection metric and the sample stage, each time loaded from
    ``checkpoints/<name>.safetensors`` after its sha256 is checked against the lock (:func:`load_decoder`)."""
    if cfg.decoder:
        return cfg.decoder
    return None if cfg.source == "train" else registry.get(cfg.source).decoder


def check_encoded_with(manifest: dict, root: Path, name: str) -> None:
    """Refuse to decode latents with another VAE than the one the data stage encoded them with (the manifest's
    ``latents.encoder``: '<name> sha256 <hex>', as repro.pipeline.stages.data writes it)."""
    from repro.storage.files import sha256_file

    path = Paths(root).decoder(name)
    recorded = (manifest.get("latents") or {}).get("encoder", "")
    want = f"{name} sha256 {sha256_file(path)}" if path.is_file() else f"{name} (missing: {path})"
    if recorded != want:
        raise ValueError(f"the data's latents were encoded with {recorded or 'an unrecorded VAE'}, but the decoder "
                         f"here is {want}; the selection would decode them with another VAE. Fix: rerun the data "
                         "stage (`repro data`) with this pretrain.decoder / pretrain.source")


def check(cfg: PretrainConfig) -> None:
    """Refuse, before anything is downloaded or written, a checkpoint our converter cannot read yet."""
    ck = registry.get(cfg.source)
    if not ck.convertible:
        raise ValueError(f"pretrain.source {ck.name}: converting {ck.family} checkpoints ({ck.fmt}) into our "
                         "networks is not supported yet; supported: "
                         + ", ".join(c.name for c in registry.CHECKPOINTS.values() if c.convertible))


def fetch_and_convert(cfg: PretrainConfig, root: Path, out: Path, progress: bool = True) -> dict:
    """Fetch + verify + convert ``cfg.source`` into ``out``; returns the converter's summary."""
    from repro.nets.convert import convert_edm_pickle
    from repro.storage.download import Lock, fetch

    check(cfg)
    ck = registry.get(cfg.source)
    dest = Paths(root).checkpoint(ck.filename)
    summaries = []  # the conversion is the file's check: pinned only once it converted
    path = fetch(ck.url, dest, sha256=ck.sha256, lock=Lock(Paths(root).lock), name=ck.name,
                 mirror=cfg.mirror or None, progress=progress,
                 verify=lambda p: summaries.append(convert_var(p, ck, out) if ck.family == "var"
                                                   else convert_edm_pickle(p, out)))
    summary = summaries[-1]
    log.info("converted %s (%s parameters, sha256 %s) into %s", path, summary.get("parameters"),
             str(summary.get("sha256"))[:12], out)
    return summary


def convert_var(path: Path, ck: registry.Checkpoint, out: Path) -> dict:
    """A released VAR state dict (``weights_only=True``, strict keys and shapes) -> our format (precond 'var')."""
    from repro.nets.checkpoint import save_model
    from repro.nets.var import PRESETS, count_parameters, load_var
    from repro.storage.files import sha256_file

    net = load_var(path, ck.arch)
    digest = sha256_file(path)
    info = {"source_file": path.name, "source_sha256": digest, "parameters": count_parameters(net),
            "tokenizer": ck.tokenizer}
    save_model(out, net, {"precond": "var", **PRESETS[ck.arch]}, info)
    return {**info, "sha256": digest}


def fetch_tokenizer(cfg: PretrainConfig, name: str, root: Path, progress: bool = True) -> Path:
    """Fetch + verify VAR's tokenizer ``name`` into ``checkpoints/`` and check that it loads strictly."""
    from repro.nets.vqvae import load_vqvae
    from repro.storage.download import Lock, fetch

    ck = registry.get(name)
    path = fetch(ck.url, Paths(root).checkpoint(ck.filename), sha256=ck.sha256, lock=Lock(Paths(root).lock),
                 name=ck.name, mirror=cfg.mirror or None, progress=progress)
    load_vqvae(path, ck.arch)  # refuses a file whose tensors do not fit, before any sampling starts
    return path


def load_tokenizer(root: Path, name: str, device="cpu"):
    """VAR's tokenizer ``name``, its file checked against the lock (or registry hash) before it is read."""
    from repro.nets.vqvae import load_vqvae

    ck = registry.get(name)
    path = Paths(root).checkpoint(ck.filename)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: VAR models need the tokenizer {name}; run the pretrain stage "
                                "first (`repro pretrain`), which fetches and verifies it")
    _check_pinned(root, path, name, ck.sha256)
    return load_vqvae(path, ck.arch, device=device)


def _check_pinned(root: Path, path: Path, name: str, sha256: str | None) -> None:
    from repro.storage.download import Lock
    from repro.storage.files import sha256_file

    lock_path = Paths(root).lock
    want = sha256 or ((Lock(lock_path).get(name) or {}).get("sha256") if lock_path.is_file() else None)
    if not want:
        raise ValueError(f"{path}: no pinned sha256 for {name} in {lock_path}. Fix: rerun the pretrain stage, "
                         "which pins it on first download")
    got = sha256_file(path)
    if got != want:
        raise ValueError(f"{path}: sha256 {got} does not match the pinned {want}; refused. Fix: delete the file and "
                         "rerun the pretrain stage")


def fetch_guide(cfg: PretrainConfig, name: str, root: Path, progress: bool = True) -> dict:
    """Fetch + verify + convert the guide network ``name`` into ``models/guide.safetensors``."""
    from repro.nets.convert import convert_edm_pickle
    from repro.storage.download import Lock, fetch

    ck = registry.get(name)
    if not ck.convertible:
        raise ValueError(f"sampler.guide {name}: {ck.family} checkpoints ({ck.fmt}) cannot be converted yet. Fix: "
                         "name an EDM/EDM2 checkpoint, e.g. edm2-img512-xs-0134217-0.165")
    summaries = []  # pinned only once it converted
    fetch(ck.url, Paths(root).checkpoint(ck.filename), sha256=ck.sha256, lock=Lock(Paths(root).lock),
          name=ck.name, mirror=cfg.mirror or None, progress=progress,
          verify=lambda p: summaries.append(convert_edm_pickle(p, Paths(root).guide)))
    summary = summaries[-1]
    log.info("guide %s converted into %s (%s parameters)", name, Paths(root).guide, summary.get("parameters"))
    return summary


def fetch_decoder(cfg: PretrainConfig, name: str, root: Path, progress: bool = True) -> Path:
    """Fetch + verify the decoder ``name`` into ``checkpoints/<name>.safetensors`` and check that it loads strictly."""
    from repro.nets.sd_vae import load_autoencoder
    from repro.storage.download import Lock, fetch

    ck = registry.get_decoder(name)
    # load_autoencoder refuses a file whose tensors do not fit (before any sampling starts, and before it is pinned)
    path = fetch(ck.url, Paths(root).decoder(name), sha256=ck.sha256, lock=Lock(Paths(root).lock), name=ck.name,
                 mirror=cfg.mirror or None, progress=progress, verify=lambda p: load_autoencoder(p, ck.arch))
    return path


def fetch_extras(cfg: Config, root: Path, progress: bool = True) -> dict:
    """The pretrain stage's part for sampling: the guide (sampler.guide) and a latent model's decoder."""
    done = {}
    if cfg.sampler.guide:
        done["guide"] = fetch_guide(cfg.pretrain, cfg.sampler.guide, root, progress)["sha256"]
    if decoder_name(cfg.pretrain):
        from repro.storage.files import sha256_file

        done["decoder"] = sha256_file(fetch_decoder(cfg.pretrain, decoder_name(cfg.pretrain), root, progress))
    if tokenizer_name(cfg.pretrain):
        from repro.storage.files import sha256_file

        done["tokenizer"] = sha256_file(fetch_tokenizer(cfg.pretrain, tokenizer_name(cfg.pretrain), root, progress))
    return done


def tokenizer_name(cfg: PretrainConfig) -> str | None:
    """The VQ tokenizer a released VAR model's token maps need (registry), or None (not a VAR model)."""
    return None if cfg.source == "train" else registry.get(cfg.source).tokenizer


def load_guide(root: Path, sampler: SamplerConfig, arch: dict, device="cpu"):
    """The converted guide network, checked to be ``sampler.guide`` and to sample the main net's shape and labels."""
    from repro.nets.checkpoint import load_model

    path = Paths(root).guide
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: sampler.guide is {sampler.guide}; run the pretrain stage first "
                                "(`repro pretrain`), which fetches and converts it")
    gnet, garch, info = load_model(path, device)
    want = registry.get(sampler.guide).filename
    if info.get("source_file") != want:
        raise ValueError(f"{path} was converted from {info.get('source_file')!r}, but sampler.guide is "
                         f"{sampler.guide} ({want}). Fix: rerun the pretrain stage")
    for k in ("img_channels", "img_resolution", "label_dim"):
        if garch.get(k, 0) != arch.get(k, 0):
            raise ValueError(f"sampler.guide {sampler.guide}: its {k} is {garch.get(k, 0)} but the main network's is "
                             f"{arch.get(k, 0)}; a guide must sample the same space. Fix: name a matching guide")
    return gnet


def load_decoder(root: Path, name: str, encoder: dict | None = None, device="cpu"):
    """The latent decoder ``name``, its file checked against the lock (or registry hash) before it is read.

    ``encoder``: the EDM2 encoder record a converted checkpoint carries (info['encoder']); its whitening
    constants must be EDM2's, which the decoder inverts.
    """
    import numpy as np

    from repro.nets.sd_vae import LatentDecoder, edm2_scale_bias, load_autoencoder

    ck = registry.get_decoder(name)
    path = Paths(root).decoder(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the samples are latents and need the {name} decoder; run the "
                                "pretrain stage first (`repro pretrain`), which fetches and verifies it")
    _check_pinned(root, path, name, ck.sha256)
    scale, bias = edm2_scale_bias()
    attrs = (encoder or {}).get("attributes") or {}
    if "scale" in attrs and "bias" in attrs:
        if not (np.allclose(attrs["scale"], scale, rtol=0, atol=1e-7) and
                np.allclose(attrs["bias"], bias, rtol=0, atol=1e-7)):
            raise ValueError(f"the checkpoint's latent encoder has scale {attrs['scale']} and bias {attrs['bias']}, "
                             f"not EDM2's {scale.tolist()} / {bias.tolist()}; its latents would be decoded wrongly")
    return LatentDecoder(load_autoencoder(path, ck.arch, device=device), scale, bias)


def sampling_extras(cfg: Config, root: Path, arch: dict, info: dict | None = None, device="cpu") -> dict:
    """Keyword arguments for ``generate_images``: ``guide`` when guidance is on, ``decoder`` for a latent model;
    ``tokenizer`` for a VAR model (``generate_var_images``)."""
    extras = {}
    if cfg.sampler.guidance != 1.0:
        extras["guide"] = load_guide(root, cfg.sampler, arch, device)
    if decoder_name(cfg.pretrain):
        extras["decoder"] = load_decoder(root, decoder_name(cfg.pretrain), (info or {}).get("encoder"), device)
    if tokenizer_name(cfg.pretrain):
        extras["tokenizer"] = load_tokenizer(root, tokenizer_name(cfg.pretrain), device)
    return extras
