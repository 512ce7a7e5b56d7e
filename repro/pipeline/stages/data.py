"""Stage `data`: the data set as one uint8 array file + a manifest with its sha256 (repro.datasets); ImageNet as
shards data/<dataset>/shard-*.npy + an index + a manifest with each shard's sha256 (repro.datasets.imagenet), the
ImageNet-512 shards as SD-VAE latents (the encoder of pretrain.source's decoder, or of pretrain.decoder for a base
trained here, fetched and verified as the pretrain stage does)."""

from __future__ import annotations

import os

from repro.config import Config, ConfigError
from repro.datasets.imagenet import LATENT, checked_source, prepare_imagenet
from repro.datasets.images import prepare
from repro.pipeline.common import tracked
from repro.storage.layout import Paths


def _latent_encoder(cfg: Config, paths: Paths, progress: bool):
    """(encode, encoder_id): the SD-VAE encoder of the decoder the latents need (pretrain.source's registry entry,
    or pretrain.decoder for a base trained here); encoder_id '<name> sha256 <hex>' goes into the manifest."""
    import torch

    from repro.catalog import registry
    from repro.nets.released import decoder_name, fetch_decoder
    from repro.nets.sd_vae import LatentEncoder, load_autoencoder
    from repro.storage.files import sha256_file

    name = decoder_name(cfg.pretrain)
    if not name:
        raise ConfigError([("pretrain.source", f"{cfg.pretrain.source} names no latent decoder, but data.dataset "
                            f"{cfg.data.dataset} is encoded with its SD-VAE",
                            "set pretrain.source to a latent EDM2 model (e.g. edm2-img512-l-1879048-0.085), or for a "
                            "base trained here set pretrain.decoder (e.g. sd-vae-ft-mse)")])
    path = fetch_decoder(cfg.pretrain, name, paths.root, progress)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = load_autoencoder(path, registry.get_decoder(name).arch, device=device)
    return LatentEncoder(vae), f"{name} sha256 {sha256_file(path)}"


def array_task() -> tuple[int, int]:
    """(k, K) inside a SLURM job array (`sbatch --array=0-15 ... repro data ...`; task ids need not start at 0),
    else (0, 1): the task makes the ImageNet shards i with i mod K = k."""
    task, count = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if not task or not count:
        return 0, 1
    return int(task) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0")), int(count)


def run(cfg: Config, paths: Paths, progress: bool) -> None:
    with tracked("data", cfg, paths) as t:
        if cfg.data.dataset.startswith("imagenet"):
            checked_source(cfg.data)  # source errors first, before the encoder is fetched
            encode, encoder_id = (_latent_encoder(cfg, paths, progress) if cfg.data.dataset in LATENT
                                  else (None, ""))
            manifest = prepare_imagenet(cfg.data, paths.data, paths.manifest, encode, encoder_id, array_task())
            if manifest is None:  # a task of a job array whose shards are done while others' are not
                return
        else:
            manifest = prepare(cfg.data, paths.data, paths.manifest, root=paths.root, progress=progress)
        t.log_params({"sha256": manifest["sha256"], "n": manifest["n"]})
        t.log_artifact(paths.manifest)
