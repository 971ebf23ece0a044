"""model.py against Meta's segment_anything (same random weights), the SAM-Med2D adapter formula
written out by hand, and the checkpoint formats (official layouts written the way the official code
writes them)."""

import os
import pickle
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model
import model_cli
from model import Sam, SamConfig, load_checkpoint, save_checkpoint, select_best

TOL = 1e-5


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and buffer random, including the rel-pos tables (zero at init) and the norm
    weights and biases (one and zero): defaults would hide a wrong rel-pos layout or norm order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "neck.1" in name or "neck.3" in name or "downscaling.1" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            else:
                p.copy_(noise * (0.5 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.1))
    return module


def meta_sam(sa, cfg: SamConfig):
    """Meta's Sam with the same hyper-parameters as cfg (adapters are not part of Meta's SAM)."""
    m = sa.modeling
    encoder = m.ImageEncoderViT(
        img_size=cfg.image_size, patch_size=16, embed_dim=cfg.encoder_dim, depth=cfg.encoder_depth,
        num_heads=cfg.encoder_heads, mlp_ratio=4, out_chans=cfg.prompt_dim, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        global_attn_indexes=cfg.global_attn, window_size=cfg.window_size,
    )  # fmt: skip
    g = cfg.embed_size
    prompt = m.PromptEncoder(cfg.prompt_dim, (g, g), (cfg.image_size, cfg.image_size), 16)
    transformer = m.TwoWayTransformer(
        depth=cfg.decoder_depth, embedding_dim=cfg.prompt_dim, mlp_dim=cfg.decoder_mlp_dim,
        num_heads=cfg.decoder_heads,
    )  # fmt: skip
    decoder = m.MaskDecoder(
        transformer_dim=cfg.prompt_dim, transformer=transformer, iou_head_hidden_dim=cfg.prompt_dim
    )
    return m.Sam(encoder, prompt, decoder).eval()


def twin_models(sa, cfg, seed=0):
    ours = randomise(Sam(cfg), seed).eval()
    ref = meta_sam(sa, cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes
    return ours, ref


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# Parity with Meta's segment_anything
# ---------------------------------------------------------------------------------------------

SMALL = dict(encoder_dim=96, encoder_depth=4, encoder_heads=3, global_attn=(1, 3), adapter=False)


# The prompt encoder and mask decoder have SAM's real sizes in every config here (D = 256); only the
# encoder is made small where the test is not about its size.
SMALL_SAM = SamConfig(name="vit_b", image_size=256, **SMALL)


@pytest.fixture(scope="module")
def small_twins(segment_anything):
    """Ours and Meta's SMALL_SAM with the same random weights, built once for the module."""
    return twin_models(segment_anything, SMALL_SAM)


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(SamConfig.from_name("vit_b", adapter=False), marks=pytest.mark.slow),
        # 64x64 grid: windows padded 64 -> 70
        pytest.param(SamConfig(name="vit_b", image_size=1024, **SMALL), marks=pytest.mark.slow),
        SMALL_SAM,
    ],
    ids=["vit_b@256", "small@1024", "small@256"],
)
def test_image_encoder_matches_meta(segment_anything, cfg):
    ours, ref = twin_models(segment_anything, cfg)
    x = torch.randn(
        1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        a, b = ours.encode(x), ref.image_encoder(x)
    assert a.shape == (1, cfg.prompt_dim, cfg.embed_size, cfg.embed_size)
    assert b.abs().mean() > 0.1  # a real signal, not a degenerate all-zero output
    assert max_diff(a, b) <= TOL


def test_reference_encoder_is_bitwise_meta(segment_anything):
    """cfg.kernels="reference" is the official computation op for op: not close, identical."""
    cfg = SamConfig(name="vit_b", image_size=256, kernels="reference", **SMALL)
    ours, ref = twin_models(segment_anything, cfg)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours.encode(x), ref.image_encoder(x))


def prompts(S, P=3, N=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(P, N, 2, generator=g) * S
    labels = torch.randint(-1, 2, (P, N), generator=g)
    xy0 = torch.rand(P, 2, generator=g) * S / 2
    boxes = torch.cat([xy0, xy0 + torch.rand(P, 2, generator=g) * S / 2], dim=1)
    masks = torch.rand(P, 1, S // 4, S // 4, generator=g)  # probabilities, as fed back
    return (coords, labels), boxes, masks


COMBOS = ["points", "boxes", "masks", "points+boxes", "points+masks", "all"]


@pytest.mark.parametrize("combo", COMBOS)
def test_prompt_encoder_matches_meta(small_twins, combo):
    cfg, (ours, ref) = SMALL_SAM, small_twins
    pts, boxes, masks = prompts(cfg.image_size)
    kw = dict(
        points=pts if "points" in combo or combo == "all" else None,
        boxes=boxes if "boxes" in combo or combo == "all" else None,
        masks=masks if "masks" in combo or combo == "all" else None,
    )
    with torch.no_grad():
        s1, d1 = ours.prompt_encoder(**kw)
        s2, d2 = ref.prompt_encoder(**kw)
        pe1, pe2 = ours.prompt_encoder.dense_pe(), ref.prompt_encoder.get_dense_pe()
    assert s1.shape == s2.shape and d1.shape == d2.shape
    assert max(max_diff(s1, s2), max_diff(d1, d2), max_diff(pe1, pe2)) <= TOL


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("combo", ["points", "boxes", "all"])
def test_mask_decoder_matches_meta(small_twins, multimask, combo):
    cfg, (ours, ref) = SMALL_SAM, small_twins
    pts, boxes, masks = prompts(cfg.image_size)
    kw = dict(
        points=pts if combo in ("points", "all") else None,
        boxes=boxes if combo in ("boxes", "all") else None,
        masks=masks if combo == "all" else None,
    )
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(1, cfg.prompt_dim, cfg.embed_size, cfg.embed_size, generator=g)
    with torch.no_grad():
        logits, iou = ours.decode(emb, kw["points"], kw["boxes"], kw["masks"], multimask=multimask)
        sparse, dense = ref.prompt_encoder(**kw)
        ref_logits, ref_iou = ref.mask_decoder(
            emb, ref.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=multimask
        )
    K = 3 if multimask else 1
    assert logits.shape == (3, K, cfg.low_res_size, cfg.low_res_size) and iou.shape == (3, K)
    assert max(max_diff(logits, ref_logits), max_diff(iou, ref_iou)) <= TOL


def test_decode_shares_each_image_among_its_prompts():
    cfg = SamConfig.from_name("tiny")
    sam = randomise(Sam(cfg)).eval()
    (coords, labels), boxes, _ = prompts(cfg.image_size, P=4)
    emb = torch.randn(2, cfg.prompt_dim, cfg.embed_size, cfg.embed_size)
    with torch.no_grad():
        both, _ = sam.decode(emb, (coords, labels), boxes)  # image 0: prompts 0,1; image 1: 2,3
        one, _ = sam.decode(emb[1:], (coords[2:], labels[2:]), boxes[2:])
    assert max_diff(both[2:], one) <= TOL
    with pytest.raises(ValueError, match="3 prompts"):
        sam.decode(emb, (coords[:3], labels[:3]))


def test_select_best_picks_highest_iou():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float).reshape(2, 3, 2, 2)
    iou = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.7]])
    best, best_iou = select_best(logits, iou)
    assert best.shape == (2, 1, 2, 2)
    assert torch.equal(best[0, 0], logits[0, 1]) and torch.equal(best[1, 0], logits[1, 0])
    assert torch.equal(best_iou, torch.tensor([0.9, 0.8]))


def test_vit_b_parameter_counts():
    with torch.device("meta"):
        sam = Sam(SamConfig.from_name("vit_b", image_size=256, adapter=True))
    counts = model_cli.count_parameters(sam)
    C = 768  # per block: channel gate 2*C*C/4, conv 9*C*C, deconv 16*C*C, LayerNorm 2*C
    assert counts["adapters"] == 12 * (2 * C * C // 4 + 9 * C * C + 16 * C * C + 2 * C)
    assert 270e6 < counts["total"] < 272e6  # the official vit_b@256 with adapters: ~271M


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def official_med2d_state_dict(cfg: SamConfig, seed=0) -> dict:
    """Official key names and shapes, built independently: Meta's SAM keys plus the adapter keys
    spelled out as in the SAM-Med2D checkpoints."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        base = Sam(SamConfig(**{**cfg.to_dict(), "adapter": False})).state_dict()
    sd = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in base.items()}
    C = cfg.encoder_dim
    for i in range(cfg.encoder_depth):
        pre = f"image_encoder.blocks.{i}.Adapter."
        sd[pre + "norm.weight"] = 1 + 0.1 * torch.randn(C, generator=g)
        sd[pre + "norm.bias"] = 0.1 * torch.randn(C, generator=g)
        sd[pre + "channel.0.weight"] = torch.randn(C // 4, C, generator=g) * C**-0.5
        sd[pre + "channel.2.weight"] = torch.randn(C, C // 4, generator=g) * (C // 4) ** -0.5
        sd[pre + "spatial.0.weight"] = torch.randn(C, C, 3, 3, generator=g) * (9 * C) ** -0.5
        sd[pre + "spatial.2.weight"] = torch.randn(C, C, 4, 4, generator=g) * (4 * C) ** -0.5
    return sd


def save_med2d(sd: dict, path):
    """As the official training code saves: plain torch.save of a dict with a pickled Adam."""
    params = [torch.nn.Parameter(v.clone()) for v in list(sd.values())[:3]]
    opt = torch.optim.Adam(params, lr=1e-4)
    sum(p.sum() for p in params).backward()
    opt.step()  # so the optimizer carries state tensors, as a real one does
    torch.save({"model": sd, "optimizer": opt, "epoch": 3}, path)


def test_med2d_checkpoint_loads_strictly_and_adapter_matches_formula(tmp_path):
    cfg = SamConfig.from_name("tiny", image_size=256)
    sd = official_med2d_state_dict(cfg)
    path = tmp_path / "sam-med2d_tiny.pth"
    save_med2d(sd, path)
    with pytest.raises(pickle.UnpicklingError):  # the file really holds a pickled object
        torch.load(path, weights_only=True)
    sam = load_checkpoint(path, verbose=False)
    assert sam.cfg.adapter and sam.cfg.channel_order == "BGR" and sam.cfg.image_size == 256
    for k, v in sam.state_dict().items():
        assert torch.equal(v, sd[k]), k

    # adapter(x) = LN(x + relu(deconv(relu(conv(g*x))))), g = sigmoid(W2 relu(W1 mean(x)))
    pre = "image_encoder.blocks.2.Adapter."
    x = torch.randn(2, 16, 16, cfg.encoder_dim)
    gate = torch.sigmoid(
        F.relu(x.mean((1, 2)) @ sd[pre + "channel.0.weight"].T) @ sd[pre + "channel.2.weight"].T
    )
    xc = (x * gate[:, None, None]).permute(0, 3, 1, 2)
    xs = F.relu(F.conv2d(xc, sd[pre + "spatial.0.weight"], stride=2, padding=1))
    xs = F.relu(F.conv_transpose2d(xs, sd[pre + "spatial.2.weight"], stride=2, padding=1))
    expected = F.layer_norm(
        x + xs.permute(0, 2, 3, 1), (cfg.encoder_dim,), sd[pre + "norm.weight"],
        sd[pre + "norm.bias"], eps=1e-5,
    )  # fmt: skip
    with torch.no_grad():
        got = sam.image_encoder.blocks[2].Adapter(x)
    assert max_diff(got, expected) <= TOL


class _Payload:
    """A pickle that would create a file if its reduce were executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_med2d_checkpoint_never_executes_pickled_code(tmp_path):
    cfg = SamConfig.from_name("tiny")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": official_med2d_state_dict(cfg), "optimizer": _Payload(marker)}, path)
    sam = load_checkpoint(path, verbose=False)
    assert not marker.exists()
    assert sam.cfg.name == "tiny"


def test_sam_1024_checkpoint_resized_to_256(tmp_path):
    cfg = SamConfig.from_name("tiny", image_size=1024, adapter=False)
    sd = randomise(Sam(cfg)).state_dict()
    path = tmp_path / "sam_tiny_1024.pth"
    torch.save(sd, path)  # Meta's layout: a bare state dict

    native = load_checkpoint(path, verbose=False)
    assert native.cfg.image_size == 1024 and native.cfg.channel_order == "RGB"

    # SAM's own decoder heads and conventions (the defaults follow the official build: next test)
    sam = load_checkpoint(path, image_size=256, adapter=True, verbose=False,
                          decoder_heads="keep", conventions="checkpoint")  # fmt: skip
    assert sam.cfg.image_size == 256 and sam.cfg.adapter
    assert (sam.cfg.channel_order, sam.cfg.resize_mode) == ("RGB", "longest")
    got = {k: v.detach() for k, v in sam.state_dict().items()}
    # pos_embed 64x64 -> 16x16, bilinear without corner alignment: every output token sits exactly
    # between source tokens 4i+1 and 4i+2 on each axis, so it is the mean of that 2x2 patch.
    pe = sd["image_encoder.pos_embed"][0].numpy()
    want = pe.reshape(16, 4, 16, 4, -1)[:, 1:3, :, 1:3].mean(axis=(1, 3))
    assert np.abs(got["image_encoder.pos_embed"][0].numpy() - want).max() < 1e-6
    # global blocks' tables 127 -> 31 offsets, linear interpolation at (i + 0.5) * 127 / 31 - 0.5
    src = np.clip((np.arange(31) + 0.5) * 127 / 31 - 0.5, 0, 126)
    for i in range(cfg.encoder_depth):
        for axis in "hw":
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            table = sd[key].numpy()
            if i in cfg.global_attn:
                want = np.stack([np.interp(src, np.arange(127), c) for c in table.T], axis=1)
                assert got[key].shape == (31, table.shape[1])
                assert np.abs(got[key].numpy() - want).max() < 1e-5  # float32 sample positions
            else:  # windowed blocks keep their 27-offset tables untouched
                assert torch.equal(got[key], sd[key])
    for k in sd:
        if not k.startswith("image_encoder.pos_embed") and "rel_pos" not in k:
            assert torch.equal(got[k], sd[k]), k  # the decoder and all else kept, bit for bit
    new = [k for k in got if ".Adapter." in k]
    assert new and any("initialised" in line for line in sam.load_report)
    assert sam.new_keys == new and native.new_keys == []
    assert all(got[k].abs().sum() > 0 for k in new if k.endswith("spatial.0.weight"))


def official_heads(cfg) -> list:
    """The keys build_sam.py's load_from drops (except_keys: mask_tokens,
    output_hypernetworks_mlps, iou_prediction_head), spelled out: 4 mask tokens in one embedding,
    4 hypernetwork MLPs and the IoU head, each 3 Linear layers."""
    mlp = lambda pre: [f"{pre}.layers.{j}.{w}" for j in range(3) for w in ("weight", "bias")]
    heads = ["mask_decoder.mask_tokens.weight"]
    for i in range(cfg.num_multimask + 1):
        heads += mlp(f"mask_decoder.output_hypernetworks_mlps.{i}")
    return heads + mlp("mask_decoder.iou_prediction_head")


def test_sam_file_becomes_a_sam_med2d_start_as_the_official_build(tmp_path):
    """A SAM file at 256 with adapters = building SAM-Med2D from SAM (build_sam.py:111-170): the
    decoder heads start afresh and the config gets SAM-Med2D's input conventions."""
    cfg = SamConfig.from_name("tiny", image_size=1024, adapter=False)
    sd = randomise(Sam(cfg)).state_dict()
    path = tmp_path / "sam_tiny_1024.pth"
    torch.save(sd, path)
    sam = load_checkpoint(path, image_size=256, adapter=True, seed=3, verbose=False)
    heads = official_heads(cfg)
    assert len(heads) == 31
    assert (sam.cfg.channel_order, sam.cfg.resize_mode) == ("BGR", "stretch")
    adapters = [k for k in sam.state_dict() if ".Adapter." in k]
    assert sorted(sam.new_keys) == sorted(adapters + heads)
    got = sam.state_dict()
    for k in heads:  # fresh: PyTorch's init of a new Sam, not the file's values
        assert not torch.equal(got[k], sd[k]), k
    for k in sd:  # every other decoder tensor (iou_token, upscaling, transformer) is the file's
        if k.startswith(("mask_decoder.", "prompt_encoder.")) and k not in heads:
            assert torch.equal(got[k], sd[k]), k
    tokens = got["mask_decoder.mask_tokens.weight"]  # nn.Embedding's init: N(0, 1)
    assert 0.8 < tokens.std() < 1.2 and abs(tokens.mean()) < 0.2
    assert any("re-initialised the 31 decoder head tensors" in line for line in sam.load_report)
    # the fresh tensors come from the seed: the same seed, the same start; another, another
    again = load_checkpoint(path, image_size=256, adapter=True, seed=3, verbose=False)
    other = load_checkpoint(path, image_size=256, adapter=True, seed=4, verbose=False)
    for k in sam.new_keys:
        assert torch.equal(again.state_dict()[k], got[k]), k
    assert not torch.equal(other.state_dict()[heads[0]], got[heads[0]])
    # named alternatives, each alone
    rgb = load_checkpoint(path, image_size=256, adapter=True, conventions="checkpoint",
                          verbose=False)  # fmt: skip
    assert (rgb.cfg.channel_order, rgb.cfg.resize_mode) == ("RGB", "longest")
    assert sorted(rgb.new_keys) == sorted(adapters + heads)
    keep = load_checkpoint(path, image_size=256, adapter=True, decoder_heads="keep", verbose=False)
    assert keep.cfg.channel_order == "BGR" and sorted(keep.new_keys) == sorted(adapters)
    with pytest.raises(ValueError, match="conventions must be sam-med2d or checkpoint"):
        load_checkpoint(path, image_size=256, adapter=True, conventions="rgb", verbose=False)


def test_other_loads_keep_heads_and_conventions(tmp_path):
    """Only SAM resized with adapters is "building SAM-Med2D": SAM at its own size (with or without
    new adapters), SAM resized without adapters, and SAM-Med2D files keep everything."""
    cfg = SamConfig.from_name("tiny", image_size=1024, adapter=False)
    sd = randomise(Sam(cfg)).state_dict()
    torch.save(sd, tmp_path / "sam.pth")
    for kw in (dict(adapter=True), dict(image_size=256), dict()):
        sam = load_checkpoint(tmp_path / "sam.pth", verbose=False, **kw)
        assert sam.cfg.channel_order == "RGB", kw
        assert not any(k.startswith("mask_decoder") for k in sam.new_keys), kw
    med = SamConfig.from_name("tiny", image_size=256)
    save_med2d(official_med2d_state_dict(med), tmp_path / "med.pth")
    sam = load_checkpoint(tmp_path / "med.pth", image_size=512, verbose=False)
    assert sam.cfg.channel_order == "BGR" and sam.new_keys == []
    torch.save(official_med2d_state_dict(med), tmp_path / "bare.pth")  # SAM's layout, adapters in
    sam = load_checkpoint(tmp_path / "bare.pth", image_size=512, adapter=True, verbose=False)
    assert sam.cfg.channel_order == "RGB" and sam.new_keys == []


def test_train_builds_from_sam_with_these_options(tmp_path):
    """train.py's --input-conventions / --decoder-heads reach load_checkpoint; --seed seeds the
    fresh tensors."""
    import train  # noqa: PLC0415  (only this test needs the training stage)

    sd = randomise(Sam(SamConfig.from_name("tiny", image_size=1024, adapter=False))).state_dict()
    torch.save(sd, tmp_path / "sam.pth")
    base = dict(data="unused", checkpoint=str(tmp_path / "sam.pth"), image_size=256, seed=7)
    sam = train.build_model(train.TrainConfig(**base), "cpu")
    want = load_checkpoint(tmp_path / "sam.pth", image_size=256, adapter=True, seed=7,
                           verbose=False)  # fmt: skip
    assert sam.cfg == want.cfg and sam.cfg.channel_order == "BGR"
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in sam.state_dict().items())
    keep = train.TrainConfig(**base, input_conventions="checkpoint", decoder_heads="keep")
    kept = train.build_model(keep, "cpu")
    assert kept.cfg.channel_order == "RGB" and all(".Adapter." in k for k in kept.new_keys)


def test_adapter_init_is_the_official_kaiming_fan_out():
    """kaiming_normal_(mode="fan_out", nonlinearity="relu") on all four adapter weights
    (image_encoder.py:39-41 of the official code): std = sqrt(2 / fan_out), fan_out = dim 0 x kernel
    area. At vit_b's width (C = 768, hidden 192), by hand:"""
    want = {
        "channel.0.weight": (2 / 192) ** 0.5,  # Linear (192, 768): fan_out 192 -> 0.1021
        "channel.2.weight": (2 / 768) ** 0.5,  # Linear (768, 192): fan_out 768 -> 0.0510
        "spatial.0.weight": (2 / (768 * 9)) ** 0.5,  # Conv2d (768, 768, 3, 3) -> 0.0170
        "spatial.2.weight": (2 / (768 * 16)) ** 0.5,  # ConvTranspose2d (768, 768, 4, 4) -> 0.0128
    }
    torch.manual_seed(0)
    for init in ("official", "torch"):
        w = dict(model.Adapter(768, 0.25, init=init).named_parameters())
        for name, std in want.items():
            t = w[name].detach()
            if init == "torch" and name.startswith("channel"):  # Linear's default: U(+-1/sqrt(in))
                bound = t.shape[1] ** -0.5
                assert t.abs().max() <= bound and abs(t.std() / (bound / 3**0.5) - 1) < 0.02
            else:  # >= 147k samples: the sample std is within 0.2% of the true one (1 sigma)
                assert abs(t.std() / std - 1) < 0.02, (init, name, t.std(), std)
                assert abs(t.mean()) < 0.02 * std
    assert SamConfig().adapter_init == "official"
    with pytest.raises(ValueError, match="adapter_init must be official or torch"):
        SamConfig(adapter_init="xavier")


def test_adapter_init_reaches_every_adapter(tmp_path):
    """The config field reaches the blocks (ViT and TinyViT) and load_checkpoint's new adapters.
    Each adapter's channel.0 weight (hidden, C) divided by its expected std: official
    sqrt(2 / hidden), torch's C**-0.5 / sqrt(3); tiny: 0.354 against 0.072."""

    def ratio(sam, init):
        ws = [m.channel[0].weight.detach() for m in sam.modules() if isinstance(m, model.Adapter)]
        assert ws
        std = lambda w: (2 / w.shape[0]) ** 0.5 if init == "official" else (3 * w.shape[1]) ** -0.5
        return torch.cat([(w / std(w)).flatten() for w in ws]).std().item()

    torch.manual_seed(0)
    for init, wrong in (("official", "torch"), ("torch", "official")):
        for name in ("tiny", "lite_medsam"):
            sam = Sam(SamConfig.from_name(name, adapter=True, adapter_init=init))
            assert abs(ratio(sam, init) - 1) < 0.1 and abs(ratio(sam, wrong) - 1) > 0.5, name
    torch.save(randomise(Sam(SamConfig.from_name("tiny", adapter=False))).state_dict(),
               tmp_path / "sam.pth")  # fmt: skip
    for init in ("official", "torch"):
        sam = load_checkpoint(tmp_path / "sam.pth", adapter=True, adapter_init=init, verbose=False)
        assert abs(ratio(sam, init) - 1) < 0.1 and sam.cfg.adapter_init == init
        assert any(f"new adapter tensors ({init})" in line for line in sam.load_report)


def test_safetensors_round_trip(tmp_path):
    sam = randomise(Sam(SamConfig.from_name("tiny", channel_order="BGR"))).eval()
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(sam, path)
    assert not list(tmp_path.glob(".*tmp*"))
    back = load_checkpoint(path, verbose=False)
    assert back.cfg == sam.cfg
    # The weights come back bit for bit: that is what saving and loading must do.
    want = sam.state_dict()
    assert set(back.state_dict()) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())
    # The outputs are the same computation on the same numbers; bitwise equality of two separately
    # allocated models is not promised (BLAS kernels may pick by memory alignment), so 1e-6.
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = back.encode(x), sam.encode(x)
    assert a.abs().mean() > 0.1 and max_diff(a, b) <= 1e-6


def test_convert_command_sheds_optimizer(tmp_path):
    from safetensors import safe_open

    cfg = SamConfig.from_name("tiny")
    src, dst = tmp_path / "med.pth", tmp_path / "med.safetensors"
    save_med2d(official_med2d_state_dict(cfg), src)
    model_cli.main(model_cli.parse_args(["convert", str(src), str(dst)]))
    sam = load_checkpoint(dst, verbose=False)
    assert sam.cfg.channel_order == "BGR" and sam.cfg.adapter
    with safe_open(str(dst), framework="pt") as f:  # the model's tensors, no optimizer state
        assert set(f.keys()) == set(sam.state_dict())
    # --image-size and --no-adapter reach load_checkpoint; absent flags keep the file's settings
    dst2 = tmp_path / "med512.safetensors"
    model_cli.main(model_cli.parse_args(["convert", str(src), str(dst2), "--image-size", "512",
                                         "--no-adapter"]))  # fmt: skip
    small = load_checkpoint(dst2, verbose=False)
    assert (small.cfg.image_size, small.cfg.adapter, small.cfg.channel_order) == (512, False, "BGR")


def test_convert_command_builds_a_sam_med2d_start_or_keeps_sam(tmp_path):
    sd = randomise(Sam(SamConfig.from_name("tiny", image_size=1024, adapter=False))).state_dict()
    torch.save(sd, tmp_path / "sam.pth")
    args = ["convert", str(tmp_path / "sam.pth"), "--image-size", "256", "--adapter"]
    model_cli.main(model_cli.parse_args([*args[:2], str(tmp_path / "med.safetensors"), *args[2:]]))
    med = load_checkpoint(tmp_path / "med.safetensors", verbose=False)
    assert (med.cfg.channel_order, med.cfg.resize_mode) == ("BGR", "stretch")
    assert not torch.equal(med.state_dict()["mask_decoder.mask_tokens.weight"],
                           sd["mask_decoder.mask_tokens.weight"])  # fmt: skip
    keep = [str(tmp_path / "keep.safetensors"), "--input-conventions", "checkpoint",
            "--decoder-heads", "keep"]  # fmt: skip
    model_cli.main(model_cli.parse_args([*args[:2], *keep, *args[2:]]))
    kept = load_checkpoint(tmp_path / "keep.safetensors", verbose=False)
    assert (kept.cfg.channel_order, kept.cfg.resize_mode) == ("RGB", "longest")
    assert torch.equal(kept.state_dict()["mask_decoder.mask_tokens.weight"],
                       sd["mask_decoder.mask_tokens.weight"])  # fmt: skip
    with pytest.raises(SystemExit):  # argparse: not a choice
        model_cli.parse_args([*args[:2], "x.safetensors", "--decoder-heads", "fresh"])


def test_bench_and_export_onnx_hand_the_line_over(capsys, monkeypatch):
    """`model.py bench ...` runs `bench.py encoder ...` (its flags, its output);
    `model.py export-onnx ...` hands its whole line to onnx_export.py the same way."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the handover sets sys.argv
    args = model_cli.parse_args(
        ["bench", "tiny", "--image-size", "64", "--runs", "1", "--warmup", "0"]
    )
    assert args.rest == ["tiny", "--image-size", "64", "--runs", "1", "--warmup", "0"]
    with pytest.raises(SystemExit) as done:
        model_cli.main(args)
    assert done.value.code == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first.startswith("parameters: encoder ") and second.startswith("tiny@64 adapter=True ")
    onnx = model_cli.parse_args(["export-onnx", "ckpt.safetensors", "out", "--opset", "17"])
    assert (onnx.command, onnx.rest) == (
        "export-onnx",
        ["ckpt.safetensors", "out", "--opset", "17"],
    )
    with pytest.raises(SystemExit):  # the other commands take no foreign flags
        model_cli.parse_args(["info", "tiny", "--runs", "3"])


def test_info_command_prints_the_counts(capsys):
    model_cli.main(model_cli.parse_args(["info", "tiny", "--no-adapter", "--image-size", "512"]))
    with torch.device("meta"):
        sam = Sam(SamConfig.from_name("tiny", adapter=False, image_size=512))
    counts = model_cli.count_parameters(sam)
    assert capsys.readouterr().out == (
        f"parameters: encoder {counts['encoder']:,}, adapters 0, prompt_encoder "
        f"{counts['prompt_encoder']:,}, mask_decoder {counts['mask_decoder']:,}, total "
        f"{counts['total']:,}\n"
    )
    with pytest.raises(SystemExit):  # argparse: not a preset
        model_cli.parse_args(["info", "vit_x"])


def test_legacy_format_checkpoint_loads(tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) files cannot be memory-mapped."""
    sam = randomise(Sam(SamConfig.from_name("tiny")))
    path = tmp_path / "legacy.pth"
    torch.save({"model": sam.state_dict(), "epoch": 1}, path, _use_new_zipfile_serialization=False)
    back = load_checkpoint(path, verbose=False)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in sam.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Errors name the file and what is wrong
# ---------------------------------------------------------------------------------------------


def fake_state_dict(cfg):
    """Right keys and shapes at almost no cost: every tensor is one stored zero, expanded."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Sam(cfg).state_dict().items()}
    return {k: torch.zeros(1).expand(s) for k, s in shapes.items()}


def test_wrong_model_is_named(tmp_path):
    path = tmp_path / "sam_vit_l.pth"
    torch.save(fake_state_dict(SamConfig.from_name("vit_l", image_size=1024, adapter=False)), path)
    with pytest.raises(ValueError, match=r"sam_vit_l\.pth: holds a vit_l model, but vit_b"):
        load_checkpoint(path, name="vit_b", verbose=False)


def test_non_finite_weights_are_refused_at_load(tmp_path):
    """Issue 13.9: a NaN weight gave an empty mask and exit 0; now the load names file and tensor
    (every layout: tests/test_checkpoints.py)."""
    sam = randomise(Sam(SamConfig.from_name("tiny")))
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[1].bias[3] = float("nan")
    save_checkpoint(sam, tmp_path / "diverged.safetensors")
    key = "mask_decoder.iou_prediction_head.layers.1.bias"
    with pytest.raises(ValueError, match=rf"diverged\.safetensors: tensor {key} holds non-finite"):
        load_checkpoint(tmp_path / "diverged.safetensors", verbose=False)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(randomise(Sam(SamConfig.from_name("tiny"))).state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.pth: cannot read checkpoint"):
        load_checkpoint(path, verbose=False)


def test_safetensors_with_a_foreign_config_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"config": '{"depth_multiplier": 2}'})
    with pytest.raises(ValueError, match=r"other\.safetensors: its config metadata"):
        load_checkpoint(path, verbose=False)


def test_missing_and_misshaped_keys_are_listed(tmp_path):
    sd = fake_state_dict(SamConfig.from_name("tiny"))
    del sd["mask_decoder.iou_token.weight"]
    sd["image_encoder.blocks.1.mlp.lin1.weight"] = torch.zeros(3, 3)
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        load_checkpoint(path, verbose=False)
    msg = str(e.value)
    assert "broken.pth" in msg and "mask_decoder.iou_token.weight" in msg
    assert "image_encoder.blocks.1.mlp.lin1.weight: file (3, 3)" in msg and "extra.weight" in msg


def test_unknown_layout_and_missing_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state": {"layer.weight": torch.zeros(2)}, "step": 1}, path)
    with pytest.raises(ValueError, match=r"other\.pth: not a SAM or SAM-Med2D checkpoint"):
        load_checkpoint(path, verbose=False)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_checkpoint(tmp_path / "nothere.pth")
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(bare))
    with pytest.raises(ValueError, match="bare.safetensors: safetensors file without a 'config'"):
        load_checkpoint(bare)
