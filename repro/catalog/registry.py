"""Registry: every released checkpoint the paper presets start from, in one place.

Each entry: file name, URL, family and format, the architecture it carries, the paper number it should
reproduce, its licence, and its sha256 where known. Nothing here has been downloaded on the machine that
wrote this file (no internet), so no hash is known yet: the first download pins it in
``checkpoints.lock.json`` (commit that file), and later downloads must match (repro.storage.download.Lock).

Licences: EDM, EDM2 and DDO weights are CC BY-NC-SA 4.0 (non-commercial, share-alike). They and anything
derived from them (converted or fine-tuned weights) are downloaded at run time and never committed.

VAR models (torch state dicts, read with ``weights_only=True``) name the multi-scale VQ tokenizer their token maps
need (``tokenizer``), itself an entry here. Latent models (EDM2 ImageNet-512) name the decoder their samples need (``decoder``): an entry of
:data:`DECODERS`, fetched and verified the same way (repro.nets.sd_vae builds it from our config, no hub call).
"""

from __future__ import annotations

from dataclasses import dataclass

EDM = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained"
EDM2 = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
DDO = "https://huggingface.co/nvidia/DirectDiscriminativeOptimization/resolve/main"
VAR = "https://huggingface.co/FoundationVision/var/resolve/main"
SD_VAE = "https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main"
CC = "CC BY-NC-SA 4.0"


@dataclass(frozen=True)
class Checkpoint:
    name: str           # registry name (the file name without extension)
    url: str
    family: str         # edm | edm2 | var
    fmt: str            # edm-pickle (torch_utils.persistence) | torch-pth
    arch: str           # architecture preset it should match (repro.nets.edm / repro.nets.edm2)
    paper: str          # the number it should reproduce, with its source
    licence: str
    sha256: str | None = None
    convertible: bool = False  # our converter reads it today
    decoder: str | None = None  # latent models: the DECODERS entry that turns samples into images
    tokenizer: str | None = None  # VAR models: the CHECKPOINTS entry of the VQ tokenizer (tokens <-> images)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_ENTRIES = [
    Checkpoint("edm-cifar10-32x32-cond-vp", f"{EDM}/edm-cifar10-32x32-cond-vp.pkl", "edm", "edm-pickle",
               "edm-cifar10-32x32-cond-vp", "FID 1.79 (EDM paper); 1.85 retested in DDO Table 1", CC,
               convertible=True),
    Checkpoint("edm-cifar10-32x32-uncond-vp", f"{EDM}/edm-cifar10-32x32-uncond-vp.pkl", "edm", "edm-pickle",
               "edm-cifar10-32x32-uncond-vp", "FID 1.97 (EDM paper and DDO Table 1)", CC, convertible=True),
    Checkpoint("edm-cifar10-uncond-vp-ddo", f"{DDO}/edm-cifar10-uncond-vp-ddo.pkl", "edm", "edm-pickle",
               "edm-cifar10-32x32-uncond-vp", "FID 1.38 (DDO Table 1, 12 rounds)", CC, convertible=True),
    Checkpoint("edm-cifar10-cond-vp-ddo", f"{DDO}/edm-cifar10-cond-vp-ddo.pkl", "edm", "edm-pickle",
               "edm-cifar10-32x32-cond-vp", "FID 1.30 (DDO Table 1, 16 rounds)", CC, convertible=True),
    Checkpoint("edm2-img64-s-1073741-0.075", f"{EDM2}/edm2-img64-s-1073741-0.075.pkl", "edm2", "edm-pickle",
               "img64-s", "FID 1.58 (EDM2 paper); 1.60 retested class-balanced in DDO Table 2", CC,
               convertible=True),
    Checkpoint("edm2-img64-s-ddo", f"{DDO}/edm2-img64-s-ddo.pkl", "edm2", "edm-pickle", "img64-s",
               "FID 0.97 (DDO Table 2, 24 rounds)", CC, convertible=True),
    Checkpoint("edm2-img512-l-1879048-0.085", f"{EDM2}/edm2-img512-l-1879048-0.085.pkl", "edm2", "edm-pickle",
               "img512-l", "FID 2.06 (EDM2 preset); 1.96 retested class-balanced in DDO", CC,
               convertible=True, decoder="sd-vae-ft-mse"),
    Checkpoint("edm2-img512-xs-0134217-0.165", f"{EDM2}/edm2-img512-xs-0134217-0.165.pkl", "edm2", "edm-pickle",
               "img512-xs", "autoguidance guide for EDM2-L in DDO (w = 1.1)", CC, convertible=True,
               decoder="sd-vae-ft-mse"),
    Checkpoint("edm2-img512-l-ddo", f"{DDO}/edm2-img512-l-ddo.pkl", "edm2", "edm-pickle", "img512-l",
               "FID 1.26 without guidance, 1.21 with autoguidance (DDO README)", CC,
               convertible=True, decoder="sd-vae-ft-mse"),
    Checkpoint("var_d16", f"{VAR}/var_d16.pth", "var", "torch-pth", "var-d16",
               "FID 3.62/3.30 (VAR); 11.33/3.71 without sampling tricks (DDO Table 3)", "MIT", convertible=True,
               tokenizer="vae_ch160v4096z32"),
    Checkpoint("var_d30", f"{VAR}/var_d30.pth", "var", "torch-pth", "var-d30",
               "FID 2.17/1.90 (VAR); 4.74/1.92 without sampling tricks (DDO Table 3)", "MIT", convertible=True,
               tokenizer="vae_ch160v4096z32"),
    Checkpoint("vae_ch160v4096z32", f"{VAR}/vae_ch160v4096z32.pth", "var", "torch-pth", "var-vqvae",
               "VAR's multi-scale VQ-VAE (tokenizer for the VAR presets)", "MIT", convertible=True),
    Checkpoint("var_d16-ddo", f"{DDO}/var_d16-ddo.pth", "var", "torch-pth", "var-d16",
               "FID 3.12/2.54 (DDO Table 3)", CC, convertible=True, tokenizer="vae_ch160v4096z32"),
    Checkpoint("var_d30-ddo", f"{DDO}/var_d30-ddo.pth", "var", "torch-pth", "var-d30",
               "FID 1.79/1.73 (DDO Table 3)", CC, convertible=True, tokenizer="vae_ch160v4096z32"),
]

CHECKPOINTS: dict[str, Checkpoint] = {c.name: c for c in _ENTRIES}

# Latent decoders. sd-vae-ft-mse: Stability AI's kl-f8 VAE with the MSE-finetuned decoder (MIT), the one EDM2
# trained its ImageNet-512 latents with; 83.65M parameters (decoder + post_quant_conv 49.49M). Saved locally as
# <name>.safetensors (the URL's file name is generic).
DECODERS: dict[str, Checkpoint] = {c.name: c for c in [
    Checkpoint("sd-vae-ft-mse", f"{SD_VAE}/diffusion_pytorch_model.safetensors", "sd-vae", "safetensors",
               "sd-vae-ft-mse", "decoder of EDM2's ImageNet-512 latents (EDM2 encoders.py StabilityVAEEncoder)",
               "MIT"),
    # The micro stand-ins' decoder: a random-weight kl-f8 VAE of sd_vae's "kl-f8-tiny" config (8x down, 4 latent
    # channels, as sd-vae-ft-mse, with 8 channels per block). There is no published file: write one with
    # repro.nets.sd_vae.save_autoencoder(tiny_autoencoder(seed), path) and serve it through pretrain.mirror (a local
    # directory is enough; the tests do this). Its sha256 is pinned on first use like every entry's.
    Checkpoint("sd-vae-tiny", "https://example.invalid/repro-micro/sd-vae-tiny.safetensors", "sd-vae", "safetensors",
               "kl-f8-tiny", "none: a random-weight stand-in for sd-vae-ft-mse in the micro pipelines", "MIT"),
]}


# Discriminator Guidance's released files (Kim et al. 2023; research/dg.md a.4). The authors publish them in Google
# Drive folders, not at file URLs, so there is nothing to download automatically: put the file in checkpoints/ by hand,
# or in a mirror (pretrain.mirror: a base URL or a directory holding it under its file name). Its sha256 is pinned in
# checkpoints.lock.json on first use like every checkpoint's (no hash could be looked up from the development machine).
@dataclass(frozen=True)
class ReleasedFile:
    name: str           # registry name
    file: str           # the file name as released
    location: str       # where the authors publish it (a folder, not a file URL)
    kind: str           # adm-extractor (frozen feature extractor) | dg-head (trained discriminator head)
    conditional: bool   # a class-conditional head
    paper: str          # what it is for, with its source
    licence: str
    sha256: str | None = None

    @property
    def filename(self) -> str:
        return self.file

    @property
    def url(self) -> str:  # where to fetch it with a mirror: the mirror replaces everything but the file name
        return f"{self.location}/{self.file}"


_DRIVE = "https://drive.google.com/drive/folders"
_DG_LICENCE = "none stated (the DG repository's licence is CC BY-NC-SA 4.0)"
DG_FILES: dict[str, ReleasedFile] = {f.name: f for f in [
    ReleasedFile("dg-cifar10-adm-classifier", "32x32_classifier.pt", f"{_DRIVE}/1gb68C13-QOt8yA6ZnnS6G5pVIlPO7j_y",
                 "adm-extractor", False, "DG's frozen CIFAR-10 feature extractor (ADM classifier, 32x32, width 128, "
                 "depth 4), trained by the DG authors with ADM's code (alsdudrla10/DG README step 4)", _DG_LICENCE),
    ReleasedFile("dg-cifar10-uncond-discriminator-60", "discriminator_60.pt", f"{_DRIVE}/1Mf3F1yGfWT8bO0_iOBX-PWG3O-OLROE2",
                 "dg-head", False, "DG's unconditional CIFAR-10 head after 60 epochs: EDM 2.03 -> 1.77 with w = 2 "
                 "(DG README)", _DG_LICENCE),
    ReleasedFile("dg-cifar10-cond-discriminator-250", "discriminator_250.pt", f"{_DRIVE}/1P1u7cz7kY1BJDPVrPNiFcksy_HCHY_bI",
                 "dg-head", True, "DG's conditional CIFAR-10 head after 250 epochs: EDM 1.82 -> 1.64 with w = 1 and "
                 "boosting (DG README)", _DG_LICENCE),
]}


def get_dg_file(name: str) -> ReleasedFile:
    if name not in DG_FILES:
        raise KeyError(f"unknown DG file {name!r}; known: {', '.join(DG_FILES)}")
    return DG_FILES[name]


def get(name: str) -> Checkpoint:
    if name not in CHECKPOINTS:
        raise KeyError(f"unknown checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}")
    return CHECKPOINTS[name]


def get_decoder(name: str) -> Checkpoint:
    if name not in DECODERS:
        raise KeyError(f"unknown decoder {name!r}; known: {', '.join(DECODERS)}")
    return DECODERS[name]
