"""Latent presets: the SD-VAE decoder fetched, verified and loaded strictly; EDM2's latent whitening inverted exactly;
the ImageNet-512 presets end to end (checkpoint, autoguidance guide, decoder) from a mirror on 127.0.0.1.

The VAE here is a small random diffusers AutoencoderKL the tests build and save (the real one's config is
swapped for a small one with monkeypatch); the EDM2 pickles are small random EDM2 nets in the EDM2 format
(tests/test_edm2_pickle.py). Nothing connects anywhere but the server on 127.0.0.1 that the tests start.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_edm2_pickle import NAMES, edm2_container, make_edm2, write_pickle

from repro.catalog import registry
from repro.cli import main
from repro.config import load_config
from repro.nets import released as pretrained
from repro.nets import sd_vae as latents
from repro.nets.checkpoint import load_model
from repro.sampling.generate import generate_images
from repro.storage.download import DownloadError

SMALL_VAE = dict(latents.SD_VAE_FT_MSE, block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8)
DECODER = registry.DECODERS["sd-vae-ft-mse"]
MAIN = registry.CHECKPOINTS["edm2-img512-l-ddo"]
GUIDE = registry.CHECKPOINTS["edm2-img512-xs-0134217-0.165"]




@pytest.fixture
def small_vae(monkeypatch):
    """The registry's decoder is built from a small config in these tests; returns a random VAE of that config."""
    from diffusers import AutoencoderKL

    monkeypatch.setitem(latents.CONFIGS, DECODER.arch, SMALL_VAE)
    torch.manual_seed(0)
    return AutoencoderKL(**SMALL_VAE).eval()


def save_vae(vae, path, rename=None):
    tensors = {k: v.contiguous() for k, v in vae.state_dict().items()}
    if rename:
        tensors = {rename(k): v for k, v in tensors.items()}
    save_file(tensors, str(path))


def z(n=3, seed=0, res=8):
    return torch.randn(n, 4, res, res, generator=torch.Generator().manual_seed(seed))


def test_edm2_whitening_constants_and_exact_inverse():
    scale, bias = latents.edm2_scale_bias()
    assert scale.dtype == np.float32 and bias.dtype == np.float32
    assert np.array_equal(scale, np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]))
    assert np.array_equal(bias, -np.float32([5.81, 3.25, 0.12, -2.15]) * scale)

    class Identity(torch.nn.Module):  # a "VAE" whose decode returns its input's first 3 channels
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros([]))

        def decode(self, x):
            return SimpleNamespace(sample=x[:, :3])

    raw = torch.rand(5, 4, 4, 4) * 1.4 - 0.2  # some values outside [0, 1]: clamped
    final = raw * torch.as_tensor(scale).view(1, -1, 1, 1) + torch.as_tensor(bias).view(1, -1, 1, 1)
    out = latents.LatentDecoder(Identity(), batch=2)(final.double())
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 4, 4)
    expected = (raw[:, :3].clamp(0, 1) * 255).to(torch.uint8)  # EDM2: clamp to [0, 1], * 255, truncate
    assert (out.int() - expected.int()).abs().max() <= 1 and (out != expected).float().mean() < 0.02
    with pytest.raises(ValueError, match="expected latents"):
        latents.LatentDecoder(Identity())(torch.zeros(2, 3, 4, 4))


def test_real_decoder_config_has_the_published_size():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**latents.SD_VAE_FT_MSE)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(vae) == 83_653_863  # kl-f8, as published for sd-vae-ft-mse
    assert n(vae.decoder) + n(vae.post_quant_conv) == 49_490_199


def test_decoder_fetched_verified_loaded_strictly_and_decoding(tmp_path, mirror, small_vae):
    served, url = mirror
    save_vae(small_vae, served / DECODER.filename)
    cfg = load_config(preset="imagenet512-l", overrides=[f"pretrain.mirror={url}"]).pretrain
    root = tmp_path / "project"
    path = pretrained.fetch_decoder(cfg, DECODER.name, root, progress=False)
    assert path == root / "checkpoints" / "sd-vae-ft-mse.safetensors"
    lock = json.loads((root / pretrained.LOCK_FILE).read_text())
    assert lock[DECODER.name]["url"] == DECODER.url  # pinned under the public URL, fetched from the mirror

    decode = pretrained.load_decoder(root, DECODER.name)
    x = z()
    images = decode(x)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 16, 16)
    scale, bias = latents.edm2_scale_bias()
    with torch.no_grad():
        raw = (x - torch.as_tensor(bias).view(1, -1, 1, 1)) / torch.as_tensor(scale).view(1, -1, 1, 1)
        want = small_vae.decode(raw).sample.clamp(0, 1).mul(255).to(torch.uint8)
    assert (images.int() - want.int()).abs().max() <= 1
    assert images.float().std() > 1  # not a constant image

    # The file on disk is altered after pinning: refused when loaded.
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    from diffusers import AutoencoderKL

    save_vae(AutoencoderKL(**SMALL_VAE), other)
    path.write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match="does not match the pinned"):
        pretrained.load_decoder(root, DECODER.name)
    # ... and the mirror serves another file: the download is refused against the pin, nothing kept.
    path.unlink()
    (served / DECODER.filename).write_bytes(other.read_bytes())
    with pytest.raises(DownloadError, match="pinned"):
        pretrained.fetch_decoder(cfg, DECODER.name, root, progress=False)
    assert not path.exists()


def test_decoder_keys_and_shapes_are_strict_and_old_attention_names_load(tmp_path, small_vae):
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def to_old(k):
        for new, old in old_names.items():
            k = k.replace(f".{new}.", f".{old}.")
        return k

    save_vae(small_vae, tmp_path / "old.safetensors", rename=to_old)
    assert any(".query." in k for k in load_file(tmp_path / "old.safetensors"))
    loaded = latents.load_autoencoder(tmp_path / "old.safetensors", DECODER.arch)
    for k, v in small_vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)

    sd = {k: v.contiguous() for k, v in small_vae.state_dict().items()}
    first = sorted(sd)[0]
    for name, tensors, words in [
        ("missing", {k: v for k, v in sd.items() if k != first}, "missing"),
        ("extra", {**sd, "decoder.bonus.weight": torch.zeros(1)}, "unexpected"),
        ("reshaped", {**sd, "post_quant_conv.weight": torch.zeros(4, 4, 3, 3)}, "shape mismatch"),
    ]:
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=words):
            latents.load_autoencoder(tmp_path / f"{name}.safetensors", DECODER.arch)


def _serve_img512(served, monkeypatch, main_seed=0, guide_seed=5):
    kw = dict(img_channels=4, label_dim=10)
    write_pickle(served / MAIN.filename, edm2_container(make_edm2(monkeypatch, seed=main_seed, **kw)), NAMES)
    write_pickle(served / GUIDE.filename, edm2_container(make_edm2(monkeypatch, seed=guide_seed, model_channels=8,
                                                                   **kw)), NAMES)


def test_imagenet512_with_autoguidance_end_to_end_from_a_local_mirror(tmp_path, mirror, small_vae, monkeypatch):
    served, url = mirror
    _serve_img512(served, monkeypatch)
    save_vae(small_vae, served / DECODER.filename)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("REPRO_TRACKING", "off")
    preset = "released-ddo-imagenet512-l-ag"

    r = CliRunner().invoke(main, ["pretrained", "--preset", preset, "--dry-run"])
    assert r.exit_code == 0, r.output
    for ck in (MAIN, GUIDE, DECODER):
        assert ck.url in r.output
    assert "guide.safetensors" in r.output and list(project.iterdir()) == []

    r = CliRunner().invoke(main, ["pretrained", "--preset", preset, "--no-progress", "--set", f"pretrain.mirror={url}",
                                  "--set", "sample.protocol=custom", "--set", "sampler.num_steps=4"])
    assert r.exit_code == 0, r.output
    lock = json.loads((project / pretrained.LOCK_FILE).read_text())
    assert set(lock) == {MAIN.name, GUIDE.name, DECODER.name}
    _, arch, info = load_model(project / "models/base.safetensors")
    gnet, garch, ginfo = load_model(project / "models/guide.safetensors")
    assert ginfo["source_file"] == GUIDE.filename and garch["model_channels"] == 8
    from PIL import Image

    grid = Image.open(project / "models/base_grid.png")
    assert grid.size == (8 * 16 * 4, 4 * 16 * 4) and grid.mode == "RGB"  # 32 decoded 16x16 RGB images, 8 a row, x4

    # The extras the sample stage uses: guided and unguided images differ, w = 1 ignores the guide.
    cfg = load_config(preset=preset, overrides=["sample.protocol=custom", "sampler.num_steps=4"])
    extras = pretrained.sampling_extras(cfg, project, arch, info)
    assert set(extras) == {"guide", "decoder"}
    net, _, _ = load_model(project / "models/base.safetensors")

    def imgs(c, **kw):
        return torch.cat([x for _, x, _ in generate_images(net, range(4), img_shape=(4, 8, 8), label_dim=10,
                                                           sampler=c.sampler, **kw)])

    guided = imgs(cfg, **extras)
    assert guided.shape == (4, 3, 16, 16) and guided.dtype == torch.uint8
    unguided_cfg = load_config(preset=preset, overrides=["sample.protocol=custom", "sampler.num_steps=4",
                                                         "sampler.guidance=1.0"])
    unguided = imgs(unguided_cfg, **extras)
    assert torch.equal(unguided, imgs(unguided_cfg, decoder=extras["decoder"]))
    assert (guided.int() - unguided.int()).abs().float().mean() > 0.5


def test_a_guide_that_does_not_match_is_refused(tmp_path, mirror, small_vae, monkeypatch):
    served, url = mirror
    _serve_img512(served, monkeypatch)
    write_pickle(served / GUIDE.filename, edm2_container(make_edm2(monkeypatch, seed=3, img_channels=3, label_dim=10)),
                 NAMES)
    save_vae(small_vae, served / DECODER.filename)
    cfg = load_config(preset="released-ddo-imagenet512-l-ag", overrides=[f"pretrain.mirror={url}"])
    root = tmp_path / "project"
    pretrained.fetch_and_convert(cfg.pretrain, root, root / "models/base.safetensors", progress=False)
    pretrained.fetch_extras(cfg, root, progress=False)
    _, arch, info = load_model(root / "models/base.safetensors")
    with pytest.raises(ValueError, match="img_channels"):
        pretrained.sampling_extras(cfg, root, arch, info)
    # a guide converted for another name is stale: refused
    other = load_config(preset="released-ddo-imagenet512-l-ag",
                        overrides=["sampler.guide=edm2-img512-l-1879048-0.085"])
    with pytest.raises(ValueError, match="rerun the pretrain stage"):
        pretrained.sampling_extras(other, root, arch, info)
    # no guide file at all
    (root / "models/guide.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="repro pretrain"):
        pretrained.sampling_extras(cfg, root, arch, info)


def test_the_selection_metric_of_a_latent_model_is_the_metric_of_its_decoded_images(inception_weights, tmp_path):
    """DDO's selection score on latents: the samples go through the decoder before Inception, batch by batch as the
    sampler makes them; the same images decoded by hand score the same, and another VAE (or none) does not."""
    from dataclasses import replace

    from repro.evaluation import fidelity
    from repro.evaluation.extractor import data_statistics
    from repro.evaluation.metric import load_metric
    from repro.methods.ddo.family import selection_score
    from repro.nets.factory import build_network
    from repro.sampling.generate import to_uint8

    weights, _ = inception_weights
    rng = np.random.default_rng(0)
    data_statistics(fidelity.INCEPTION_EXTRACTOR, weights, rng.integers(0, 256, (6, 3, 64, 64), dtype=np.uint8)
                    ).save(tmp_path / "ref.npz")
    decoder = latents.LatentDecoder(latents.tiny_autoencoder(seed=0))
    torch.manual_seed(0)
    net = build_network(dict(precond="edm2", img_resolution=8, img_channels=4, label_dim=0, model_channels=4,
                             channel_mult=[1], num_blocks=1, attn_resolutions=[])).eval()
    sampler = replace(load_config(preset="micro").sampler, num_steps=2, batch=3)
    seeds, shape = np.arange(5), (4, 8, 8)

    metric = load_metric("inception", weights, tmp_path / "ref.npz", decoder=decoder)
    got = selection_score(metric, net, seeds, 0, shape, sampler)
    z = [x for _, x, _ in generate_images(net, seeds, img_shape=shape, label_dim=0, sampler=sampler,
                                          decoder=lambda x: x.float())]
    assert [tuple(b.shape) for b in z] == [(3, 4, 8, 8), (2, 4, 8, 8)]
    images = [decoder(b) for b in z]
    assert all(b.dtype == torch.uint8 and b.shape[1:] == (3, 64, 64) for b in images)
    assert got == metric.score_images(images) and np.isfinite(got)
    other = load_metric("inception", weights, tmp_path / "ref.npz",
                        decoder=latents.LatentDecoder(latents.tiny_autoencoder(seed=1)))
    assert abs(selection_score(other, net, seeds, 0, shape, sampler) - got) > 1e-3 * abs(got)
    undecoded = [to_uint8(b[:, :3]) for b in z]  # what skipping the decoder would score (its first 3 channels)
    assert abs(metric.score_images(undecoded) - got) > 1e-3 * abs(got)
