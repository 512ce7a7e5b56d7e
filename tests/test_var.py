"""VAR and its multi-scale VQ tokenizer (issue 13): published sizes, strict loading of the released key layout,
the one-pass exact log-likelihood, sampling (CFG conventions, top-k/top-p), and the AR DDO loss."""

from __future__ import annotations

import pytest
import torch

from repro.nets.factory import build_network
from repro.nets.var import VAR, build_var, count_parameters, load_var, logp, token_logp
from repro.nets.vqvae import VQVAE, build_vqvae, load_vqvae

SMALL = dict(depth=2, embed_dim=32, num_heads=2, num_classes=5, vocab_size=16, Cvae=4, patch_nums=(1, 2, 3))
SMALL_VQ = dict(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), patch_nums=(1, 2, 3), in_channels=1)


def small_models(seed: int = 0) -> tuple[VAR, VQVAE]:
    torch.manual_seed(seed)
    net, vq = VAR(**SMALL), VQVAE(**SMALL_VQ)
    with torch.no_grad():  # perturb everything so no path is trivially zero (adaLN gains start near 0)
        for p in list(net.parameters()) + list(vq.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    return net.eval(), vq.eval()


# ---------------------------------------------------------------- sizes (meta device: nothing is allocated)
@pytest.mark.parametrize("arch,count", [("var-d16", 310_283_520), ("var-d30", 2_010_020_356)])
def test_var_parameter_counts(arch, count):
    with torch.device("meta"):
        net = build_var(arch)
    assert count_parameters(net) == count
    assert net.L == 680 and net.class_emb.num_embeddings == 1001 and net.head.out_features == 4096


def test_tokenizer_parameter_count():
    with torch.device("meta"):
        vq = build_vqvae("var-vqvae")
    assert count_parameters(vq) == 108_948_355
    assert vq.quantize.embedding.weight.shape == (4096, 32) and len(vq.quantize.quant_resi.qresi_ls) == 4


def test_factory_builds_token_models():
    net = build_network(dict(precond="var", **SMALL))
    assert isinstance(net, VAR) and net.L == 14
    with pytest.raises(ValueError, match="unknown architecture key 'img_resolution'"):
        build_network(dict(precond="var", img_resolution=8, **SMALL))


# ---------------------------------------------------------------- the released key layout, written independently
def released_var_layout(depth, C, heads, classes, V, Cvae, patch_nums) -> dict[str, tuple]:
    """Keys and shapes of a released var_d*.pth, written out from the published layout (not from our module)."""
    L = sum(p * p for p in patch_nums)
    keys = {"word_embed.weight": (C, Cvae), "word_embed.bias": (C,), "class_emb.weight": (classes + 1, C),
            "pos_start": (1, 1, C), "pos_1LC": (1, L, C), "lvl_embed.weight": (len(patch_nums), C),
            "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
            "head.weight": (V, C), "head.bias": (V,), "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "attn.scale_mul_1H11": (1, heads, 1, 1), b + "attn.q_bias": (C,), b + "attn.v_bias": (C,),
                     b + "attn.zero_k_bias": (C,), b + "attn.mat_qkv.weight": (3 * C, C),
                     b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
                     b + "ffn.fc1.weight": (4 * C, C), b + "ffn.fc1.bias": (4 * C,),
                     b + "ffn.fc2.weight": (C, 4 * C), b + "ffn.fc2.bias": (C,),
                     b + "ada_lin.1.weight": (6 * C, C), b + "ada_lin.1.bias": (6 * C,)})
    return keys


def test_d16_key_layout_matches_the_released_one():
    with torch.device("meta"):
        net = build_var("var-d16")
    want = released_var_layout(16, 1024, 16, 1000, 4096, 32, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == want


def _fake_release(layout: dict[str, tuple]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: (torch.zeros(s, dtype=torch.long) if k == "lvl_1L" else torch.randn(s, generator=g))
            for k, s in layout.items()}


def test_released_layout_loads_strictly_and_bad_files_are_refused(tmp_path):
    state = _fake_release(released_var_layout(2, 32, 2, 5, 16, 4, (1, 2, 3)))
    torch.save(state, tmp_path / "var.pth")
    net = load_var(tmp_path / "var.pth", SMALL)
    assert torch.equal(net.head.weight, state["head.weight"])
    assert torch.equal(net.blocks[1].attn.mat_qkv.weight, state["blocks.1.attn.mat_qkv.weight"])

    reshaped = dict(state, **{"head.weight": state["head.weight"].T.contiguous()})
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError, match=r"shape mismatch.*head.weight"):
        load_var(tmp_path / "reshaped.pth", SMALL)
    extra = dict(state, **{"blocks.2.attn.q_bias": torch.zeros(32)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected \['blocks.2.attn.q_bias'\]"):
        load_var(tmp_path / "extra.pth", SMALL)
    foreign = {k.replace("ada_lin", "adaLN_modulation"): v for k, v in state.items()}
    torch.save(foreign, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="missing"):
        load_var(tmp_path / "foreign.pth", SMALL)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"head.weight": torch.zeros(1), "fn": VAR}, tmp_path / "obj.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_var(tmp_path / "obj.pth", SMALL)


def test_tokenizer_layout_loads_strictly(tmp_path):
    vq = VQVAE(**SMALL_VQ)
    keys = {k: tuple(v.shape) for k, v in vq.state_dict().items()}
    # the parts the VAR tokenizer file is known to carry (quantizer, phi convs, 1x1 attention qkv, resample convs)
    for k, s in {"quantize.embedding.weight": (16, 4), "quantize.ema_vocab_hit_SV": (3, 16),
                 "quantize.quant_resi.qresi_ls.3.weight": (4, 4, 3, 3), "quant_conv.weight": (4, 4, 3, 3),
                 "post_quant_conv.bias": (4,), "encoder.down.1.attn.1.qkv.weight": (48, 16, 1, 1),
                 "encoder.down.0.downsample.conv.weight": (8, 8, 3, 3), "decoder.up.1.upsample.conv.weight":
                 (16, 16, 3, 3), "decoder.up.1.block.2.conv2.weight": (16, 16, 3, 3),
                 "decoder.up.0.block.0.nin_shortcut.weight": (8, 16, 1, 1), "encoder.mid.attn_1.proj_out.bias": (16,),
                 "encoder.conv_out.weight": (4, 16, 3, 3)}.items():
        assert keys[k] == s, k
    state = _fake_release(keys)
    torch.save(state, tmp_path / "vae.pth")
    assert torch.equal(load_vqvae(tmp_path / "vae.pth", SMALL_VQ).quantize.embedding.weight,
                       state["quantize.embedding.weight"])
    del state["quantize.quant_resi.qresi_ls.3.bias"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="missing"):
        load_vqvae(tmp_path / "short.pth", SMALL_VQ)


def test_tokenizer_round_trip_shapes():
    _, vq = small_models()
    img = torch.rand(3, 1, 6, 6) * 2 - 1
    tokens = vq.encode(img)
    assert tokens.shape == (3, 14) and tokens.dtype == torch.long and int(tokens.max()) < 16
    assert vq.decode(tokens).shape == (3, 1, 6, 6)
    assert torch.equal(vq.decode(tokens), vq.decode_fhat(vq.quantize.to_fhat(tokens)))


def test_tokenizer_is_residual():
    """With identity phi convs, a feature map equal to code c everywhere is explained by scale 1 (token c); scale 2
    quantizes the zero residual to the code z nearest the origin, and scale 3 the residual -z left by it."""
    _, vq = small_models()
    q = vq.quantize
    with torch.no_grad():
        for phi in q.quant_resi.qresi_ls:
            phi.weight.zero_()
            phi.weight[:, :, 1, 1] = torch.eye(4)
            phi.bias.zero_()
    c = 7
    f = q.embedding.weight[c].view(1, 4, 1, 1).expand(2, 4, 3, 3).contiguous()
    tokens = q.tokenize(f)
    nearest_zero = int(q.embedding.weight.norm(dim=1).argmin())
    assert tokens[:, 0].tolist() == [c, c]
    nearest_minus_z = int((q.embedding.weight + q.embedding.weight[nearest_zero]).norm(dim=1).argmin())
    assert (tokens[:, 1:5] == nearest_zero).all() and (tokens[:, 5:] == nearest_minus_z).all()


# ---------------------------------------------------------------- exact log-likelihood (step 2)
def test_one_pass_logp_equals_scale_by_scale_sum():
    from repro.sampling.var import scalewise_token_logp

    net, vq = small_models()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 16, (4, net.L), generator=g)
    labels = torch.tensor([0, 3, 5, 5])  # 5 = the unconditional class (label dropout kept)
    with torch.no_grad():
        one_pass = token_logp(net, vq.quantize, tokens, labels)
    stepwise = scalewise_token_logp(net, vq.quantize, tokens, labels)
    assert one_pass.shape == (4, 14)
    torch.testing.assert_close(one_pass, stepwise, rtol=0, atol=1e-5)
    torch.testing.assert_close(logp(net, vq.quantize, tokens, labels), stepwise.sum(1), rtol=0, atol=1e-4)
    # the label matters, and so does every scale's prefix (a later token changes nothing before it)
    assert (one_pass[1] - token_logp(net, vq.quantize, tokens[1:2], torch.tensor([4]))[0]).abs().max() > 1e-3
    other = tokens.clone()
    other[:, 5:] = (other[:, 5:] + 1) % 16
    with torch.no_grad():
        changed = token_logp(net, vq.quantize, other, labels)
    torch.testing.assert_close(changed[:, :5], one_pass[:, :5], rtol=0, atol=1e-6)
    assert (changed[:, 5:] - one_pass[:, 5:]).abs().max() > 1e-3


def test_logp_is_a_normalised_distribution_over_token_maps():
    """With 3 codes and scales (1, 2) there are 3^5 token maps: their probabilities sum to 1 for every class."""
    from repro.nets.vqvae import VectorQuantizer

    torch.manual_seed(0)
    net = VAR(depth=1, embed_dim=16, num_heads=2, num_classes=2, vocab_size=3, Cvae=4, patch_nums=(1, 2)).eval()
    quant = VectorQuantizer(3, 4, (1, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5 * torch.randn_like(p))
    grid = torch.cartesian_prod(*[torch.arange(3)] * 5)
    for label in (0, 1, 2):
        with torch.no_grad():
            lp = logp(net, quant, grid, torch.full((len(grid),), label))
        assert abs(lp.exp().sum().item() - 1) < 1e-5
        assert lp.exp().max() > 2 * lp.exp().min()  # not uniform: the check has teeth


def test_label_dropout_rate():
    net, _ = small_models()
    g = torch.Generator().manual_seed(0)
    dropped = net.drop_labels(torch.zeros(20000, dtype=torch.long), generator=g)
    assert set(dropped.unique().tolist()) == {0, 5}
    assert abs((dropped == 5).float().mean().item() - 0.1) < 0.01


# ---------------------------------------------------------------- sampling (step 3)
def _teacher_logits(net, vq, tokens, labels):
    with torch.no_grad():
        return net(labels, vq.quantize.var_input(tokens))


@pytest.mark.parametrize("cfg", [1.0, 1.5])
def test_cfg_conventions(cfg):
    from repro.sampling.var import sample_tokens

    net, vq = small_models()
    labels = torch.tensor([1, 2, 4])
    uncond = torch.full_like(labels, 5)
    slices = [slice(0, 1), slice(1, 5), slice(5, 14)]
    for mode in ("upstream", "guidance-free-at-1"):
        g = torch.Generator().manual_seed(7)
        tokens, logits = sample_tokens(net, vq.quantize, labels, cfg=cfg, cfg_mode=mode, generator=g,
                                       return_logits=True)
        cond, unc = _teacher_logits(net, vq, tokens, labels), _teacher_logits(net, vq, tokens, uncond)
        for si, sl in enumerate(slices):
            t = cfg * si / 2 if mode == "upstream" else (cfg - 1) * si / 2
            torch.testing.assert_close(logits[si], (1 + t) * cond[:, sl] - t * unc[:, sl], rtol=1e-4, atol=1e-4)
            is_cond = torch.allclose(logits[si], cond[:, sl], rtol=1e-4, atol=1e-4)
            # exactly where they should: upstream guides at every scale but the first even at cfg 1.0; the shifted
            # convention is the conditional model at cfg 1.0 and guides, more weakly than upstream, above it
            assert is_cond == (si == 0 or (mode == "guidance-free-at-1" and cfg == 1.0)), (mode, si)


def test_sampling_is_seeded():
    from repro.sampling.var import sample_tokens

    net, vq = small_models()
    labels = torch.tensor([0, 1])
    a = sample_tokens(net, vq.quantize, labels, cfg=1.5, generator=torch.Generator().manual_seed(1))
    b = sample_tokens(net, vq.quantize, labels, cfg=1.5, generator=torch.Generator().manual_seed(1))
    c = sample_tokens(net, vq.quantize, labels, cfg=1.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_token_map_i_depends_only_on_seed_i():
    from repro.sampling.var import sample_tokens

    net, vq = small_models()
    seeds, labels = [11, 12, 13], torch.tensor([0, 3, 4])
    batch = sample_tokens(net, vq.quantize, labels, cfg=1.5, seeds=seeds)
    alone = sample_tokens(net, vq.quantize, labels[1:2], cfg=1.5, seeds=seeds[1:2])
    pair = sample_tokens(net, vq.quantize, labels.flip(0), cfg=1.5, seeds=seeds[::-1])
    assert torch.equal(batch[1:2], alone) and torch.equal(batch.flip(0), pair)
    assert not torch.equal(batch[0], sample_tokens(net, vq.quantize, labels[:1], cfg=1.5, seeds=[99])[0])


def _direct_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus, one row at a time in plain Python."""
    out = logits.clone()
    for row in out.view(-1, out.shape[-1]):
        vals = row.tolist()
        if top_k > 0:
            kth = sorted(vals, reverse=True)[top_k - 1]
            for j, v in enumerate(vals):
                if v < kth:
                    row[j] = -torch.inf
        if top_p > 0:
            probs = row.softmax(0).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            for j, pj in enumerate(probs):
                below = sum(q for q in probs if q < pj) + pj  # mass of j and every less likely token
                if below <= 1 - top_p and j != best:
                    row[j] = -torch.inf
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (5, 0.0), (0, 0.8), (6, 0.7), (1, 0.0), (0, 0.01)])
def test_top_k_top_p_matches_direct_computation(top_k, top_p):
    from repro.sampling.var import filter_top_k_top_p

    logits = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(top_k))
    got = filter_top_k_top_p(logits, top_k, top_p)
    want = _direct_filter(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], logits[~torch.isinf(got)])
    kept = (~torch.isinf(got)).sum(-1)
    if top_k:
        assert (kept <= top_k).all()
    if top_p == 0.01 or top_k == 1:
        assert (kept == 1).all()


def test_sampled_tokens_stay_in_the_filtered_set():
    from repro.sampling.var import sample_tokens

    net, vq = small_models()
    labels = torch.arange(5).repeat(8)
    tokens, logits = sample_tokens(net, vq.quantize, labels, cfg=1.5, top_k=2, top_p=0.9,
                                   generator=torch.Generator().manual_seed(0), return_logits=True)
    full = torch.cat(logits, 1)
    assert torch.isfinite(full.gather(-1, tokens.unsqueeze(-1))).all()
    assert ((~torch.isinf(full)).sum(-1) <= 2).all() and (torch.isinf(full).sum(-1) >= 14).all()


# ---------------------------------------------------------------- AR DDO (step 4)
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_ar_ddo_reaches_theorem_3_3_optimum_on_a_toy_categorical(beta):
    """A two-token autoregressive categorical model p(x1) p(x2 | x1) over 3 x 3 outcomes, trained on the exact
    expectations of the AR DDO loss, reaches p* ~ p_ref^(1 - 1/beta) p_data^(1/beta) (Theorem 3.3). Pointwise the
    optimum has e^(beta r) = p_data / (alpha p_ref); it is normalised when alpha = Z^beta, Z = sum of the right side."""
    from repro.methods.ddo.loss import ar_ddo_objective

    g = torch.Generator().manual_seed(int(beta * 10))
    p_data = torch.rand(9, generator=g, dtype=torch.float64) + 0.1
    p_data /= p_data.sum()
    ref1 = torch.randn(3, generator=g, dtype=torch.float64)
    ref2 = torch.randn(3, 3, generator=g, dtype=torch.float64)

    def ar_logp(l1, l2):  # log p(x1, x2) for all 9 outcomes, as the sum of the two token log-probs
        return (l1.log_softmax(0).view(3, 1) + l2.log_softmax(1)).flatten()

    lp_ref = ar_logp(ref1, ref2)
    target = (1 - 1 / beta) * lp_ref + p_data.log() / beta
    Z = target.exp().sum()
    alpha = float(Z ** beta)
    p_star = (target - Z.log()).exp()
    l1, l2 = ref1.clone().requires_grad_(), ref2.clone().requires_grad_()  # theta starts at the reference
    opt = torch.optim.LBFGS([l1, l2], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    no = torch.zeros(9, dtype=torch.bool)

    def closure():
        opt.zero_grad()
        r = ar_logp(l1, l2) - lp_ref
        # E_data[real term] + E_ref[fake term]: one objective call per expectation, weighted by the true masses
        real = (p_data * ar_ddo_objective(r, torch.full_like(r, -1e4), no, alpha, beta)).sum()
        fake = (lp_ref.exp() * ar_ddo_objective(torch.full_like(r, 1e4), r, no, alpha, beta)).sum()
        loss = real + fake
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    p = ar_logp(l1, l2).exp().detach()
    assert (p - p_star).abs().sum() < 1e-4
    assert (p_star - p_data).abs().sum() > 0.05 and (p_star - lp_ref.exp()).abs().sum() > 0.05  # not trivial


def test_ar_ddo_objective_weights_and_scale():
    from repro.methods.ddo.loss import ar_ddo_objective

    r_real, r_fake = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([1.0, 0.5, -0.2])
    uncond = torch.tensor([False, True, False])
    got = ar_ddo_objective(r_real, r_fake, uncond, alpha=10.0, beta=0.02)
    sig = torch.nn.functional.logsigmoid
    want = (-sig(0.02 * r_real) - 10.0 * torch.tensor([1.0, 0.0, 1.0]) * sig(-0.02 * r_fake)) / 10.0
    torch.testing.assert_close(got, want)
    small = ar_ddo_objective(r_real, r_fake, uncond, alpha=0.5, beta=0.02)  # max(alpha, 1) = 1: not divided
    torch.testing.assert_close(small, -sig(0.02 * r_real) - 0.5 * torch.tensor([1.0, 0.0, 1.0]) * sig(-0.02 * r_fake))


def test_ar_ddo_loss_on_a_small_var():
    import copy

    from repro.methods.ddo.loss import ar_ddo_loss

    net, vq = small_models()
    ref = copy.deepcopy(net).requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    real, fake = torch.randint(0, 16, (4, 14), generator=g), torch.randint(0, 16, (4, 14), generator=g)
    y_real, y_fake = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 3, 2, 1])
    uncond = torch.tensor([False, True, False, False])
    loss, stats = ar_ddo_loss(net, ref, vq.quantize, real, y_real, fake, y_fake, uncond, alpha=4.0, beta=0.1)
    # theta = ref: every r is 0, so each pair costs log 2 (1 + alpha w_fake) / max(alpha, 1)
    want = torch.log(torch.tensor(2.0)) * torch.tensor([5.0, 1.0, 5.0, 5.0]).mean() / 4.0
    torch.testing.assert_close(loss.detach(), want)
    assert stats["margin"] == 0.0 and stats["uncond_fraction"] == 0.25
    loss.backward()
    assert net.head.weight.grad.abs().sum() > 0 and all(p.grad is None for p in ref.parameters())
    # after a step: the unconditional pair's fake tokens do not enter the loss, a conditional pair's do
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def at(f):
        return ar_ddo_loss(net, ref, vq.quantize, real, y_real, f, y_fake, uncond, alpha=4.0, beta=0.1)[0].item()

    base = at(fake)
    f1, f0 = fake.clone(), fake.clone()
    f1[1] = (f1[1] + 3) % 16
    f0[0] = (f0[0] + 3) % 16
    assert at(f1) == pytest.approx(base, abs=1e-7) and at(f0) != pytest.approx(base, abs=1e-6)


def test_ar_fakes_are_reencoded_reference_samples():
    from repro.methods.ddo.loss import ar_fakes
    from repro.sampling.var import sample_tokens

    net, vq = small_models()
    labels, seeds = torch.tensor([0, 1, 2, 3]), [5, 6, 7, 8]
    fakes = ar_fakes(net, vq, labels, seeds)
    raw = sample_tokens(net, vq.quantize, labels, cfg=1.0, cfg_mode="guidance-free-at-1", seeds=seeds)
    assert fakes.shape == raw.shape == (4, 14)
    assert torch.equal(fakes, vq.encode(vq.decode(raw)))
    assert torch.equal(fakes, ar_fakes(net, vq, labels, seeds))  # seeded


def test_ar_ddo_steps_separate_data_from_reference_samples():
    """A few AR DDO steps on a small VAR: the implicit discriminator sig(beta r) learns to call the data real
    (r_real > 0) and fresh reference samples fake (r_fake < 0), with the unconditional pairs trained on data only."""
    import copy

    from repro.methods.ddo.loss import ar_ddo_loss
    from repro.nets.var import logp
    from repro.sampling.var import sample_tokens

    ref, vq = small_models()
    ref.requires_grad_(False)
    net = copy.deepcopy(ref).requires_grad_(True)
    teacher, _ = small_models(seed=1)  # the "data": another model's samples
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(8)
    real = sample_tokens(teacher, vq.quantize, labels, seeds=range(40))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(25):
        fake = sample_tokens(ref, vq.quantize, labels, cfg=1.0, cfg_mode="guidance-free-at-1",
                             seeds=range(1000 + 40 * step, 1040 + 40 * step))
        uncond = net.drop_labels(labels, generator=g) == net.num_classes
        loss, stats = ar_ddo_loss(net, ref, vq.quantize, real, labels, fake, labels, uncond, alpha=1.0, beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = sample_tokens(ref, vq.quantize, labels, cfg=1.0, cfg_mode="guidance-free-at-1", seeds=range(9000, 9040))
    with torch.no_grad():
        r_real = logp(net, vq.quantize, real, labels) - logp(ref, vq.quantize, real, labels)
        r_fake = logp(net, vq.quantize, held_out, labels) - logp(ref, vq.quantize, held_out, labels)
    assert r_real.mean() > 1.0 and r_fake.mean() < 0, (r_real.mean(), r_fake.mean())


# ---------------------------------------------------------------- presets and dry runs (step 5)
VAR_PRESETS = {"var-d16": ("var_d16", "imagenet256/var-d16-no-tricks:fid_no_guidance"),
               "var-d30": ("var_d30", "imagenet256/var-d30-no-tricks:fid_no_guidance"),
               "released-ddo-var-d16": ("var_d16-ddo", "imagenet256/var-d16-ddo:fid_no_guidance"),
               "released-ddo-var-d30": ("var_d30-ddo", "imagenet256/var-d30-ddo:fid_no_guidance")}


@pytest.mark.parametrize("preset", sorted(VAR_PRESETS))
def test_var_presets_dry_run_with_plan_protocol_and_cost(tmp_path, monkeypatch, preset):
    import yaml
    from click.testing import CliRunner

    from repro.cli import main

    monkeypatch.chdir(tmp_path)
    source, cell = VAR_PRESETS[preset]
    plans = {}
    for stage in ("pretrained", "sample", "fid", "ddo"):
        r = CliRunner().invoke(main, [stage, "--preset", preset, "--dry-run"])
        assert r.exit_code == 0, r.output
        plans[stage] = yaml.safe_load(r.output.split("# would do:\n")[1])["plan"]
    assert list(tmp_path.iterdir()) == []  # nothing written
    p = plans["pretrained"]
    assert p["checkpoint"] == source and p["url"].endswith(f"/{source}.pth") and p["format"] == "torch-pth"
    assert p["architecture"] == source.split("-")[0].replace("_", "-") and p["supported"] is True
    assert p["tokenizer"]["checkpoint"] == "vae_ch160v4096z32" and p["tokenizer"]["licence"] == "MIT"
    assert p["licence"] == ("MIT" if "released" not in preset else "CC BY-NC-SA 4.0")
    s = plans["sample"]
    assert s["protocol"]["name"] == "ddo-var-imagenet256-fid50k" and s["protocol"]["nfe"] == 10
    assert s["protocol"]["label_mode"] == "balanced" and s["protocol"]["reference_format"] == "openai-npz"
    assert s["sampler"]["cfg"] == 1.0 and s["sampler"]["cfg_mode"] == "upstream" and s["sampler"]["guided"]
    assert s["sampler"]["top_k"] == 0 and s["sampler"]["top_p"] == 0.0
    assert s["sampler"]["tokenizer"] == "vae_ch160v4096z32"
    # upstream's cfg 1.0 runs the unconditional pass too: 2 x 10 scales per image
    assert s["cost"]["images"] == 50000 and s["cost"]["network_evaluations_per_image"] == 20
    assert plans["fid"]["protocol"]["name"] == "ddo-var-imagenet256-fid50k"
    assert plans["ddo"]["cost"]["rounds"] == 0 and plans["ddo"]["evaluation_protocol"] == s["protocol"]["name"]
    from repro.config import load_config

    cfg = load_config(preset=preset)
    assert cfg.paper.cells == {"final": cell}
    free = load_config(preset=preset, overrides=["ar.cfg_mode=guidance-free-at-1"])
    from repro.pipeline.cost import nfe

    assert nfe(free) == 10 and nfe(cfg) == 20
    from repro.config import stage_dict

    # the ar section is a param of the sample stage for a VAR model, left out for a diffusion one (stable hashes)
    assert stage_dict(cfg, "sample")["ar"]["cfg_mode"] == "upstream"
    assert "ar" not in stage_dict(load_config(preset="tiny"), "sample")


@pytest.mark.parametrize("override,field,words", [
    (["ddo.rounds=2"], "ddo.rounds", "needs the data set (DDO trains on it)"),  # AR DDO rounds need data
    (["pretrain.source=vae_ch160v4096z32"], "pretrain.source", "tokenizer, not a generator"),
    (["ar.top_k=900"], "ar.top_k", "ddo-var-imagenet256-fid50k"),
    (["ar.cfg_mode=linear"], "ar.cfg_mode", "must be one of"),
    (["pretrain.source=edm2-img64-s-1073741-0.075", "sample.protocol=custom", "ar.top_k=5"], "ar", "not a VAR model"),
])
def test_var_preset_bad_settings_are_refused(tmp_path, monkeypatch, override, field, words):
    from click.testing import CliRunner

    from repro.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["sample", "--preset", "var-d16", "--dry-run"]
    for o in override:
        args += ["--set", o]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert field in r.output and words in r.output, r.output
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the pretrained stage: fetch, pin, strict load
def test_pretrained_stage_fetches_pins_and_converts_var_from_a_mirror(tmp_path, monkeypatch):
    """The registry's VAR entries through the pretrained stage, with stand-ins of the released files (small
    architectures, the released key layout) in a local mirror folder: both files pinned in the lock, the model
    converted to our format, the tokenizer checked, a sample grid drawn; then the sample stage; a swapped tokenizer
    is refused."""
    import hashlib
    import json

    from click.testing import CliRunner

    from repro.cli import main
    from repro.nets import var as var_mod
    from repro.nets import vqvae as vq_mod
    from repro.nets.checkpoint import load_model

    monkeypatch.setitem(var_mod.PRESETS, "var-d16", dict(SMALL))
    monkeypatch.setitem(vq_mod.PRESETS, "var-vqvae", dict(SMALL_VQ))
    monkeypatch.setenv("REPRO_TRACKING", "off")
    served, project = tmp_path / "served", tmp_path / "project"
    served.mkdir()
    project.mkdir()
    monkeypatch.chdir(project)
    net, vq = small_models()
    torch.save(net.state_dict(), served / "var_d16.pth")
    torch.save(vq.state_dict(), served / "vae_ch160v4096z32.pth")

    r = CliRunner().invoke(main, ["pretrained", "--preset", "var-d16", "--no-progress", "--set",
                                  f"pretrain.mirror={served}"])
    assert r.exit_code == 0, r.output
    got, arch, info = load_model(project / "models/base.safetensors")
    assert arch["precond"] == "var" and info["tokenizer"] == "vae_ch160v4096z32"
    for k, v in net.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    lock = json.loads((project / "checkpoints.lock.json").read_text())
    for name in ("var_d16", "vae_ch160v4096z32"):
        assert lock[name]["sha256"] == hashlib.sha256((served / f"{name}.pth").read_bytes()).hexdigest()
    assert (project / "models/base_grid.png").stat().st_size > 0

    # the sample stage: per-seed shards (seed i gets class i mod 5), the same images whatever the batch and shard
    # size, equal to the library sampler's with the preset's settings (upstream cfg 1.0)
    from repro.sampling.var import sample_images

    runner = CliRunner()
    common = ["--set", "sample.protocol=custom", "--set", "sample.n_samples=6", "--no-progress"]
    r = runner.invoke(main, ["sample", "--preset", "var-d16", *common, "--set", "sample.batch=4",
                             "--set", "sample.shard_size=3"])
    assert r.exit_code == 0, r.output
    shards = sorted((project / "samples/base").glob("seeds-*.npz"))
    assert len(shards) == 2
    import numpy as np

    z = [np.load(f) for f in shards]
    images, labels = np.concatenate([x["images"] for x in z]), np.concatenate([x["labels"] for x in z])
    assert images.shape == (6, 1, 6, 6) and images.dtype == np.uint8 and labels.tolist() == [0, 1, 2, 3, 4, 0]
    want = sample_images(net, vq, torch.tensor([0, 1, 2, 3, 4, 0]), cfg=1.0, cfg_mode="upstream", seeds=range(6))
    assert np.array_equal(images, want.numpy())
    assert not np.array_equal(images, sample_images(net, vq, torch.tensor([0, 1, 2, 3, 4, 0]), cfg=1.0,
                                                    cfg_mode="guidance-free-at-1", seeds=range(6)).numpy())
    # another guidance convention is another sampler: the shards are made again, with other images
    r = runner.invoke(main, ["sample", "--preset", "var-d16", *common, "--set", "ar.cfg_mode=guidance-free-at-1"])
    assert r.exit_code == 0, r.output
    again = np.concatenate([np.load(f)["images"] for f in sorted((project / "samples/base").glob("seeds-*.npz"))])
    assert not np.array_equal(again, images)

    # another tokenizer file on the mirror: refused against the pinned hash
    torch.save(small_models(seed=1)[1].state_dict(), served / "vae_ch160v4096z32.pth")
    (project / "checkpoints/vae_ch160v4096z32.pth").unlink()
    r = CliRunner().invoke(main, ["pretrained", "--preset", "var-d16", "--no-progress", "--set",
                                  f"pretrain.mirror={served}"])
    assert r.exit_code == 2 and "Traceback" not in r.output and "vae_ch160v4096z32" in r.output, r.output
