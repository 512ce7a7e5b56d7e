"""ADM's classifier encoder (repro/nets/adm.py) and DG's discriminator (repro/nets/discriminators.py): the
released parameter layouts, strict loading, refusal of foreign files, and the layers against their formulas.

tests/golden/adm_dg_layouts.json lists every parameter name and shape, in state-dict order, of DG's CIFAR-10
extractor (``32x32_classifier.pt``), its unconditional head (``discriminator_60.pt``) and its conditional head
(``discriminator_250.pt``), as the reference code (alsdudrla10/DG @1a152b7, classifier_lib.load_classifier /
load_discriminator) builds them: facts (names and shapes), recorded once from that code; no code of it is here.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from repro.nets.adm import (DG_CIFAR10_EXTRACTOR, TINY_EXTRACTOR, ADMConfig, AttentionBlock, AttentionPool2d,
                            EncoderUNet, dg_head, load_adm, load_adm_state, timestep_embedding, tiny_head)
from repro.nets.discriminators import ADMDiscriminator

GOLDEN = json.loads((Path(__file__).parent / "golden" / "adm_dg_layouts.json").read_text())


@pytest.mark.parametrize("name, config", [("extractor", DG_CIFAR10_EXTRACTOR), ("head", dg_head()),
                                          ("head_cond", dg_head(condition=True))])
def test_released_layouts_match_the_reference(name, config):
    sd = EncoderUNet(config).state_dict()
    assert list(sd) == list(GOLDEN[name])  # same names, same order
    assert {k: list(v.shape) for k, v in sd.items()} == GOLDEN[name]
    assert DG_CIFAR10_EXTRACTOR.feature_shape == (512, 8, 8)


def _res(p, cin, cout, emb, scale_shift=True):
    """ADM ResBlock parameters under prefix p (names as released)."""
    out = {f"{p}.in_layers.0.weight": [cin], f"{p}.in_layers.0.bias": [cin],
           f"{p}.in_layers.2.weight": [cout, cin, 3, 3], f"{p}.in_layers.2.bias": [cout],
           f"{p}.emb_layers.1.weight": [(2 if scale_shift else 1) * cout, emb],
           f"{p}.emb_layers.1.bias": [(2 if scale_shift else 1) * cout],
           f"{p}.out_layers.0.weight": [cout], f"{p}.out_layers.0.bias": [cout],
           f"{p}.out_layers.3.weight": [cout, cout, 3, 3], f"{p}.out_layers.3.bias": [cout]}
    if cin != cout:
        out.update({f"{p}.skip_connection.weight": [cout, cin, 1, 1], f"{p}.skip_connection.bias": [cout]})
    return out


def _attn(p, c):
    return {f"{p}.norm.weight": [c], f"{p}.norm.bias": [c], f"{p}.qkv.weight": [3 * c, c, 1],
            f"{p}.qkv.bias": [3 * c], f"{p}.proj_out.weight": [c, c, 1], f"{p}.proj_out.bias": [c]}


def tiny_head_layout(cond: bool) -> dict:
    """tiny_head(): 64 -> 32 channels on 4x4, one ResBlock + attention, middle block, attention pool, 1 output;
    written out by hand in ADM's naming."""
    lay = {"time_embed.0.weight": [128, 32], "time_embed.0.bias": [128],
           "time_embed.2.weight": [128, 128], "time_embed.2.bias": [128]}
    if cond:
        lay["label_emb.weight"] = [1000, 128]
    lay.update({"input_blocks.0.0.weight": [32, 64, 3, 3], "input_blocks.0.0.bias": [32]})
    lay.update(_res("input_blocks.1.0", 32, 32, 128))
    lay.update(_attn("input_blocks.1.1", 32))
    lay.update(_res("middle_block.0", 32, 32, 128))
    lay.update(_attn("middle_block.1", 32))
    lay.update(_res("middle_block.2", 32, 32, 128))
    lay.update({"out.0.weight": [32], "out.0.bias": [32], "out.2.positional_embedding": [32, 17],
                "out.2.qkv_proj.weight": [96, 32, 1], "out.2.qkv_proj.bias": [96],
                "out.2.c_proj.weight": [1, 32, 1], "out.2.c_proj.bias": [1]})
    return lay


def tiny_extractor_layout() -> dict:
    """TINY_EXTRACTOR: 1 -> 32 channels (8x8), a down-sampling ResBlock, 64 channels with attention (4x4)."""
    lay = {"time_embed.0.weight": [128, 32], "time_embed.0.bias": [128],
           "time_embed.2.weight": [128, 128], "time_embed.2.bias": [128],
           "input_blocks.0.0.weight": [32, 1, 3, 3], "input_blocks.0.0.bias": [32]}
    lay.update(_res("input_blocks.1.0", 32, 32, 128))
    lay.update(_res("input_blocks.2.0", 32, 32, 128))   # resblock down-sampling: no extra parameters
    lay.update(_res("input_blocks.3.0", 32, 64, 128))
    lay.update(_attn("input_blocks.3.1", 64))
    lay.update(_res("middle_block.0", 64, 64, 128))
    lay.update(_attn("middle_block.1", 64))
    lay.update(_res("middle_block.2", 64, 64, 128))
    lay.update({"out.0.weight": [64], "out.0.bias": [64], "out.2.positional_embedding": [64, 17],
                "out.2.qkv_proj.weight": [192, 64, 1], "out.2.qkv_proj.bias": [192],
                "out.2.c_proj.weight": [10, 64, 1], "out.2.c_proj.bias": [10]})
    return lay


def _write(path, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in layout.items()}
    torch.save(sd, path)
    return sd


@pytest.mark.parametrize("cond", [False, True])
def test_tiny_head_and_extractor_load_a_state_dict_written_in_the_released_layout(tmp_path, cond):
    sd = _write(tmp_path / "head.pt", tiny_head_layout(cond))
    head = load_adm(tmp_path / "head.pt", tiny_head(condition=cond))
    assert all(torch.equal(head.state_dict()[k], v) for k, v in sd.items())
    sd_e = _write(tmp_path / "ext.pt", tiny_extractor_layout(), seed=1)
    ext = load_adm(tmp_path / "ext.pt", TINY_EXTRACTOR)
    assert all(torch.equal(ext.state_dict()[k], v) for k, v in sd_e.items())
    disc = ADMDiscriminator(ext, head)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    y = torch.tensor([1, 2, 3]) if cond else None
    logit = disc(x, t, y)
    assert logit.shape == (3,) and torch.isfinite(logit).all()
    # the loaded weights are the ones used: another file gives another output
    _write(tmp_path / "head2.pt", tiny_head_layout(cond), seed=2)
    other = ADMDiscriminator(ext, load_adm(tmp_path / "head2.pt", tiny_head(condition=cond)))
    assert not torch.allclose(other(x, t, y), logit)


def test_released_size_dg_head_file_loads_strictly(tmp_path):
    """A discriminator_60.pt-shaped file (DG's head, 2.9M parameters, written here from the reference layout)."""
    sd = _write(tmp_path / "discriminator_60.pt", GOLDEN["head"])
    head = load_adm(tmp_path / "discriminator_60.pt", dg_head())
    assert torch.equal(head.state_dict()["out.2.c_proj.weight"], sd["out.2.c_proj.weight"])
    out = head(torch.randn(2, 512, 8, 8), torch.tensor([0.2, 0.7]))
    assert out.shape == (2, 1)
    with pytest.raises(ValueError, match="label_emb"):  # the conditional head needs discriminator_250's key
        load_adm(tmp_path / "discriminator_60.pt", dg_head(condition=True))
    # the trainer's loader puts it into a discriminator's head (a small stand-in extractor with 8x8x512 features)
    from repro.methods.dg_train import load_trainable

    ext = EncoderUNet(ADMConfig(image_size=8, model_channels=512, num_res_blocks=1, channel_mult=(1,),
                                attention_resolutions=(), out_channels=1))
    disc = ADMDiscriminator(ext, EncoderUNet(dg_head()))
    load_trainable(disc, tmp_path / "discriminator_60.pt")
    assert torch.equal(disc.head.state_dict()["out.2.c_proj.weight"], sd["out.2.c_proj.weight"])


def test_wrong_shapes_missing_and_extra_keys_are_refused(tmp_path):
    layout = tiny_head_layout(False)
    sd = _write(tmp_path / "ok.pt", layout)
    bad = dict(sd, **{"out.2.positional_embedding": torch.zeros(32, 26)})       # a 5x5 map's embedding
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"shape mismatch.*positional_embedding.*\(32, 26\)"):
        load_adm(tmp_path / "shape.pt", tiny_head())
    torch.save({k: v for k, v in sd.items() if k != "time_embed.0.bias"}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing.*time_embed.0.bias"):
        load_adm(tmp_path / "missing.pt", tiny_head())
    torch.save(dict(sd, extra=torch.zeros(1)), tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected.*extra"):
        load_adm(tmp_path / "extra.pt", tiny_head())
    with pytest.raises(ValueError, match="weights do not fit"):   # a head file given as the extractor
        load_adm(tmp_path / "ok.pt", TINY_EXTRACTOR)


class Payload:  # a pickled object: torch.load(weights_only=True) must refuse to rebuild it
    def __reduce__(self):
        return (print, ("this must never run",))


def test_foreign_pickles_and_non_state_dicts_are_refused(tmp_path, capsys):
    torch.save({"w": Payload()}, tmp_path / "payload.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_adm_state(tmp_path / "payload.pt")
    assert "never run" not in capsys.readouterr().out
    torch.save(EncoderUNet(tiny_head()), tmp_path / "module.pt")              # a whole pickled module
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_adm(tmp_path / "module.pt", tiny_head())
    torch.save({"net": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path / "ckpt.pt")  # a training checkpoint
    with pytest.raises(ValueError, match="flat state dict"):
        load_adm_state(tmp_path / "ckpt.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        load_adm_state(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="no such file"):
        load_adm_state(tmp_path / "absent.pt")


def test_sha256_is_checked_before_reading(tmp_path):
    from repro.storage.files import sha256_file

    _write(tmp_path / "head.pt", tiny_head_layout(False))
    load_adm(tmp_path / "head.pt", tiny_head(), sha256=sha256_file(tmp_path / "head.pt"))
    with pytest.raises(ValueError, match="sha256"):
        load_adm(tmp_path / "head.pt", tiny_head(), sha256="0" * 64)


def test_timestep_embedding_formula_and_dg_time_scale():
    t = torch.tensor([0.0, 0.3, 1.0])
    e = timestep_embedding(t * 999, 8)
    f = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    want = torch.cat([torch.cos(999 * t[:, None] * f), torch.sin(999 * t[:, None] * f)], 1)
    assert torch.allclose(e, want, atol=1e-5)
    assert timestep_embedding(t, 5).shape == (3, 5) and torch.all(timestep_embedding(t, 5)[:, -1] == 0)
    net = EncoderUNet(tiny_head())
    assert torch.allclose(net.embed(t), net.time_embed(timestep_embedding(999 * t, 32)))


def test_attention_block_matches_a_direct_per_head_computation():
    """Heads of 32 channels; qkv channels grouped head by head as [q_h; k_h; v_h] (the released order)."""
    torch.manual_seed(0)
    blk = AttentionBlock(64, 32)
    torch.nn.init.normal_(blk.proj_out.weight)  # zero-initialised in ADM; make the branch visible
    x = torch.randn(2, 64, 3, 3)
    qkv = blk.qkv(blk.norm(x.reshape(2, 64, 9)))
    out = torch.empty(2, 64, 9)
    for h in range(2):
        q, k, v = (qkv[:, 96 * h + 32 * j: 96 * h + 32 * (j + 1)] for j in range(3))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(32), dim=-1)
        out[:, 32 * h: 32 * (h + 1)] = torch.einsum("bts,bcs->bct", w, v)
    want = x.reshape(2, 64, 9) + blk.proj_out(out)
    assert torch.allclose(blk(x), want.reshape(2, 64, 3, 3), atol=1e-5)


def test_attention_pool_matches_a_direct_computation():
    """Query = the mean token; qkv channels split as [all q; all k; all v], then into heads."""
    torch.manual_seed(1)
    pool = AttentionPool2d(2, 64, 32, 3)
    x = torch.randn(2, 64, 2, 2)
    tok = torch.cat([x.reshape(2, 64, 4).mean(-1, keepdim=True), x.reshape(2, 64, 4)], -1) \
        + pool.positional_embedding[None]
    q, k, v = pool.qkv_proj(tok).split(64, dim=1)
    heads = []
    for h in range(2):
        sl = slice(32 * h, 32 * (h + 1))
        w = torch.softmax(q[:, sl, 0:1].transpose(1, 2) @ k[:, sl] / math.sqrt(32), dim=-1)  # [b, 1, 5]
        heads.append((v[:, sl] @ w.transpose(1, 2))[..., 0])                                    # [b, 32]
    want = pool.c_proj(torch.cat(heads, 1)[:, :, None])[:, :, 0]
    assert torch.allclose(pool(x), want, atol=1e-5)


def test_conditional_head_and_feature_shapes():
    torch.manual_seed(2)
    head = EncoderUNet(tiny_head(condition=True, num_classes=10))
    for p in head.parameters():  # ADM zero-initialises each residual branch's output: the labels would not show
        torch.nn.init.normal_(p, std=0.2)
    h, t = torch.randn(3, 64, 4, 4), torch.full([3], 0.4)
    idx = torch.tensor([0, 3, 9])
    a = head(h, t, idx)
    assert torch.allclose(a, head(h, t, torch.nn.functional.one_hot(idx, 10).float()))  # one-hot: argmax (DG)
    assert not torch.allclose(a, head(h, t, torch.tensor([1, 3, 9])))
    with pytest.raises(ValueError, match="condition"):
        head(h, t)
    ext = EncoderUNet(TINY_EXTRACTOR)
    assert ext(torch.randn(2, 1, 8, 8), torch.full([2], 0.5), feature=True).shape == (2, *TINY_EXTRACTOR.feature_shape)
    assert ext(torch.randn(2, 1, 8, 8), torch.full([2], 0.5)).shape == (2, 10)


def test_adm_discriminator_freezes_the_extractor_but_passes_gradients_to_the_input():
    disc = ADMDiscriminator(EncoderUNet(TINY_EXTRACTOR), EncoderUNet(tiny_head()))
    disc.train()
    assert not disc.extractor.training and disc.head.training
    assert all(not p.requires_grad for p in disc.extractor.parameters())
    assert list(disc.trainable.parameters()) == list(disc.head.parameters())
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    disc(x, torch.full([2], 0.3)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.extractor.parameters())
    with pytest.raises(ValueError, match="in_channels=64"):
        ADMDiscriminator(EncoderUNet(TINY_EXTRACTOR), EncoderUNet(dg_head(in_channels=512, image_size=4)))


@pytest.mark.parametrize("bad, match", [(dict(model_channels=48), "multiple of 32"),
                                        (dict(pool="spatial"), "pool"),
                                        (dict(image_size=7), "divisible"),
                                        (dict(num_head_channels=48), "num_head_channels")])
def test_bad_configs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        ADMConfig(**{**dict(image_size=8, in_channels=1, model_channels=32, channel_mult=(1, 2),
                            num_head_channels=32), **bad})
