"""precision.py: the bf16 fast path against the fp32 computation (documented tolerances), on SAM's
ViT and on TinyViT; TinyViT's inference form (tinyvit.fuse_for_inference) against the module it
came from in fp32; the fp32 path bit for bit as it was; where bf16 actually runs; and `--dtype
auto` following torch's CPU check (patched both ways) into the JSON record. Figures on real
weights: docs/precision.md."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
import infer_cli
import model
import precision
import tinyvit
from kernels import onednn

ROOT = Path(__file__).resolve().parents[1]

# The fast path's tolerances (tiny preset, random weights): relative L2 error of the embedding and
# of the low-res logits. bf16 keeps 8 significant bits (relative rounding 2**-9 = 2e-3 per value);
# a handful of layers compound that to ~1e-2. LiteMedSAM's real figures are in docs/precision.md.
EMB_RTOL = 3e-2
LOGIT_RTOL = 3e-2


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return model.Sam(model.SamConfig.from_name("tiny", image_size=64)).eval()


@pytest.fixture(scope="module")
def tiny_lite():
    """A small TinyViT (LiteMedSAM's structure and heads; 16x16 grids in windows of 7 and 14, so
    windows are padded) with random BatchNorm statistics, so that folding them is not trivial."""
    torch.manual_seed(0)
    cfg = model.SamConfig.from_name(
        "lite_medsam", image_size=64, stage_dims=(16, 32, 40, 80), stage_depths=(1, 1, 2, 1),
        prompt_dim=32, decoder_heads=2, decoder_mlp_dim=64,
    )  # fmt: skip
    sam = model.Sam(cfg).eval()
    for m in sam.modules():
        if isinstance(m, tinyvit.FrozenBatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-1, 1)
    for m in sam.modules():
        if isinstance(m, tinyvit.TinyViTAttention):
            m.attention_biases.data.normal_()
    return sam


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 64, generator=g)  # (1, 3, S, S)
    boxes = torch.tensor([[8.0, 10.0, 40.0, 50.0], [20.0, 4.0, 60.0, 30.0]])  # (2, 4)
    return x, boxes


@torch.inference_mode()
def test_fast_path_within_tolerance_of_fp32(tiny, inputs):
    x, boxes = inputs
    fast = precision.apply(copy.deepcopy(tiny), precision.FAST)
    emb, emb_fast = tiny.encode(x), fast.encode(x)
    assert emb_fast.dtype == torch.float32  # handed on to the decoder in fp32
    err = rel(emb_fast, emb)
    assert 0 < err < EMB_RTOL  # > 0: bf16 did run
    low, iou = tiny.decode(emb, boxes=boxes)
    low_fast, iou_fast = fast.decode(emb_fast, boxes=boxes)
    assert rel(low_fast, low) < LOGIT_RTOL
    assert torch.allclose(iou_fast, iou, atol=2e-2)


@torch.inference_mode()
def test_fast_path_within_tolerance_of_fp32_on_tinyvit(tiny_lite, inputs):
    x, boxes = inputs
    fast = precision.apply(copy.deepcopy(tiny_lite), precision.FAST)
    emb, emb_fast = tiny_lite.encode(x), fast.encode(x)
    assert emb_fast.dtype == torch.float32
    assert 0 < rel(emb_fast, emb) < EMB_RTOL
    low, _ = tiny_lite.decode(emb, boxes=boxes)
    low_fast, _ = fast.decode(emb_fast, boxes=boxes)
    assert rel(low_fast, low) < LOGIT_RTOL


@torch.inference_mode()
def test_tinyvit_inference_form_computes_the_same_function(tiny_lite, inputs):
    """Folded BatchNorms, in-place GELUs and adds, SDPA attention: in fp32 equal to the module it
    came from up to rounding (1e-5), and really changed (the BatchNorms are gone)."""
    x, _ = inputs
    enc = tiny_lite.image_encoder
    fused = tinyvit.fuse_for_inference(copy.deepcopy(enc))
    assert not any(isinstance(m, tinyvit.FrozenBatchNorm2d) for m in fused.modules())
    want = enc(x)
    assert rel(fused(x), want) < 1e-5
    assert rel(fused(x.contiguous(memory_format=torch.channels_last)), want) < 1e-5
    attn = enc.layers[1].blocks[0].attn
    y = torch.randn(3, 7, 7, attn.qkv.in_features)  # (B, w, w, C): one window each
    fused_attn = copy.deepcopy(attn)
    fused_attn.fused = True
    assert rel(fused_attn(y), attn(y)) < 1e-5


@torch.inference_mode()
def test_fast_encoder_is_bf16_and_channels_last(tiny_lite):
    """What fast_encoder hands to the fast path: bf16 conv/Linear weights except the patch
    embedding's, TinyViT's 4-D weights channels-last; the model's own weights untouched."""
    fast = precision.apply(copy.deepcopy(tiny_lite), precision.FAST)
    enc = fast.image_encoder.forward.fast_encoder
    layouts = []  # 4-D weights whose layouts differ (not 1x1, not depthwise): the 3x3 neck conv
    for name, m in enc.named_modules():
        if isinstance(m, precision.WEIGHTED):
            want = torch.float32 if name.startswith("patch_embed") else torch.bfloat16
            assert m.weight.dtype == want, name
            if m.weight.ndim == 4 and m.weight.shape[1] > 1 and m.weight.shape[2:] != (1, 1):
                layouts.append(m.weight.is_contiguous(memory_format=torch.channels_last))
    assert layouts and all(layouts)
    assert all(p.dtype == torch.float32 for p in fast.parameters())


@torch.inference_mode()
def test_vit_adapters_take_the_tap_major_convolutions(tiny, inputs, monkeypatch):
    """On the ViT's fast copy the adapters' conv and deconv weights are channels-last, so
    kernels/adapter gathers the conv's taps and sums the deconv's by strided adds: F.unfold and
    F.fold (im2col, col2im) never run, and the embedding stays within the fast path's tolerance
    of fp32 (the same sums in another order)."""
    fast = precision.apply(copy.deepcopy(tiny), precision.FAST)
    enc = fast.image_encoder.forward.fast_encoder
    convs = [m.spatial[i] for m in enc.modules() if isinstance(m, model.Adapter) for i in (0, 2)]
    assert len(convs) == 2 * tiny.cfg.encoder_depth
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    import kernels.adapter as ad  # noqa: PLC0415

    def no_cols(*a, **k):
        raise AssertionError("im2col/col2im ran on the fast path")

    x, _ = inputs
    ref = tiny.encode(x)
    monkeypatch.setattr(ad.F, "fold", no_cols)
    monkeypatch.setattr(ad.F, "unfold", no_cols)
    assert rel(fast.encode(x), ref) < EMB_RTOL
    with pytest.raises(AssertionError, match="im2col"):  # the fp32 path still unfolds and folds
        tiny.encode(x)


@pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")
@torch.inference_mode()
def test_fast_path_runs_the_packed_matmuls(tiny, tiny_lite, inputs):
    """Every bf16 matmul of the fast copies goes through oneDNN's packed weights
    (kernels/onednn.py): per ViT block qkv, proj, lin2 and the adapter's deconv plain, lin1 with
    its GELU and the adapter conv with its ReLU fused; TinyViT's Linears, fc1 with its GELU, and
    the first two convs of its conv blocks with their GELUs. The fp32 model never does."""
    x, _ = inputs
    depth = tiny.cfg.encoder_depth
    convs = [m for m in tiny_lite.modules() if isinstance(m, tinyvit.MBConv | tinyvit.PatchMerging)]
    for sam, want in ((tiny, {"none": 4 * depth, "gelu": depth, "relu": depth}),
                      (tiny_lite, {"gelu": sum(tiny_lite.cfg.stage_depths[1:]),
                                   "conv_gelu": 2 * len(convs)})):  # fmt: skip
        fast = precision.apply(copy.deepcopy(sam), precision.FAST)
        onednn.calls.clear()
        sam.encode(x)
        assert not onednn.calls
        fast.encode(x)
        assert all(onednn.calls[act] == n for act, n in want.items()), onednn.calls
    fp32_copy = precision.fast_variant(tiny, [s for s in precision.STEPS if s != "bf16_weights"])
    onednn.calls.clear()
    fp32_copy(x)
    assert not onednn.calls  # packing needs bf16 weights


@torch.inference_mode()
def test_where_bf16_runs(tiny, inputs):
    """Encoder Linears see bf16; the patch embedding and the whole decoder see fp32."""
    x, boxes = inputs
    fast = precision.apply(copy.deepcopy(tiny), precision.FAST)
    seen = {}

    def record(name):
        def hook(m, args, out):
            seen[name] = (args[0].dtype, out.dtype)

        return hook

    enc = fast.image_encoder.forward.fast_encoder  # the copy the fast path runs
    hooks = [
        enc.blocks[0].mlp.register_forward_hook(record("encoder mlp in")),  # lin1 fused with GELU
        enc.blocks[-1].mlp.lin2.register_forward_hook(record("encoder mlp")),
        enc.patch_embed.proj.register_forward_hook(record("patch embed")),
        fast.mask_decoder.iou_prediction_head.register_forward_hook(record("decoder iou head")),
        fast.mask_decoder.output_upscaling.register_forward_hook(record("decoder upscaling")),
    ]
    try:
        fast.decode(fast.encode(x), boxes=boxes)
    finally:
        for h in hooks:
            h.remove()
    assert seen["encoder mlp in"] == (torch.float32, torch.bfloat16)  # after fp32 LayerNorm
    assert seen["encoder mlp"] == (torch.bfloat16, torch.bfloat16)
    assert seen["patch embed"] == (torch.float32, torch.float32)  # handed on in bf16
    assert seen["decoder iou head"] == (torch.float32, torch.float32)
    assert seen["decoder upscaling"] == (torch.float32, torch.float32)


@torch.inference_mode()
def test_float32_path_is_bitwise_unchanged(tiny, inputs):
    """apply(..., "float32") leaves the model computing exactly as a model never given to it;
    the same weights and state_dict keys after the fast path too (only forward is wrapped)."""
    x, boxes = inputs
    same = precision.apply(copy.deepcopy(tiny), "float32")
    emb = tiny.encode(x)
    assert torch.equal(same.encode(x), emb)
    for a, b in zip(same.decode(emb, boxes=boxes), tiny.decode(emb, boxes=boxes), strict=True):
        assert torch.equal(a, b)
    fast = precision.apply(copy.deepcopy(tiny), precision.FAST)
    sd, ref = fast.state_dict(), tiny.state_dict()
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert all(p.dtype == torch.float32 for p in fast.parameters())


def test_cpu_check_asks_torch(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert not precision.cpu_has_bf16()
    assert precision.resolve("auto", "cpu") == "float32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert precision.cpu_has_bf16() == torch.backends.mkldnn.is_available()
    assert precision.resolve("auto", torch.device("cuda")) == "float32"  # measured on CPUs only
    assert precision.resolve("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="int4"):
        precision.resolve("int4", "cpu")


@pytest.fixture
def ckpt_and_image(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    model.save_checkpoint(model.Sam(model.SamConfig.from_name("tiny")), path)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 48), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    return path, tmp_path / "img.png"


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_follows_the_cpu_check_into_the_json(monkeypatch, ckpt_and_image, tmp_path, has_bf16):
    ckpt, img = ckpt_and_image
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    loaded, real_apply = [], precision.apply

    def apply(sam, prec):  # precision.apply, keeping the model it returns
        loaded.append(real_apply(sam, prec))
        return loaded[-1]

    monkeypatch.setattr(precision, "apply", apply)
    out = tmp_path / f"mask_{has_bf16}.png"
    argv = [img, "--checkpoint", ckpt, "--box", 2, 3, 30, 35, "--out", out, "--device", "cpu"]
    assert infer_cli.main(infer_cli.parse_args([str(a) for a in argv])) == 0
    want = precision.FAST if has_bf16 else "float32"
    assert json.loads(out.with_suffix(".json").read_text())["precision"] == want
    assert loaded[0].precision == want
    assert hasattr(loaded[0].image_encoder.forward, "fast_encoder") == has_bf16  # the wrapper


def test_explicit_float32_overrides_auto(monkeypatch, ckpt_and_image, tmp_path):
    ckpt, img = ckpt_and_image
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    out = tmp_path / "m.png"
    argv = [img, "--checkpoint", ckpt, "--box", 2, 3, 30, 35, "--out", out, "--dtype", "float32"]
    assert infer_cli.main(infer_cli.parse_args([str(a) for a in argv])) == 0
    assert json.loads(out.with_suffix(".json").read_text())["precision"] == "float32"


@pytest.mark.slow
@torch.inference_mode()
def test_lite_medsam_mask_agrees_on_the_mni152_slice():
    """Real weights, the README's example (MNI152 axial slice, brain box): the fast path's mask
    against fp32's. Dice >= 0.99 (measured 0.99x; docs/precision.md)."""
    from checkpoints import default_checkpoint

    try:
        path = default_checkpoint()
    except (FileNotFoundError, RuntimeError) as err:
        pytest.skip(f"LiteMedSAM weights unavailable: {err}")
    sam = model.load_checkpoint(path, verbose=False).eval()
    fast = precision.apply(copy.deepcopy(sam), precision.FAST)
    image = np.array(Image.open(ROOT / "examples" / "mni152_axial.png").convert("RGB"))
    box = [[28, 29, 168, 200]]
    a = infer.segment(sam, image, boxes=box).masks[0]
    b = infer.segment(fast, image, boxes=box).masks[0]
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice >= 0.99


@torch.inference_mode()
def test_weights_loaded_later_reach_the_fast_copy(tiny_lite, inputs):
    """load_state_dict after apply makes the fast copy again: it computes with the new weights."""
    x, _ = inputs
    other = copy.deepcopy(tiny_lite)
    for p in other.parameters():
        p.mul_(1.1)
    fast = precision.apply(copy.deepcopy(tiny_lite), precision.FAST)
    fast.load_state_dict(other.state_dict())
    assert rel(fast.encode(x), other.encode(x)) < EMB_RTOL
    assert rel(fast.encode(x), tiny_lite.encode(x)) > 5 * EMB_RTOL


def test_dice_diff_script(tmp_path):
    """examples/dice_diff.py on two hand-written per_mask.csv files: hand-computed figures."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dice_diff", ROOT / "examples" / "dice_diff.py")
    dd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dd)
    rows = {
        "a": [("m1", "box", 0.5), ("m2", "box", 0.7), ("m1", "1pt", 0.2), ("m2", "1pt", 0.0)],
        "b": [("m2", "box", 0.6), ("m1", "box", 0.5), ("m1", "1pt", 0.3), ("m2", "1pt", 0.0)],
    }
    for run, rs in rows.items():
        (tmp_path / run).mkdir()
        lines = ["mask,image,mode,dice"] + [f"{m},img.png,{mode},{d}" for m, mode, d in rs]
        (tmp_path / run / "per_mask.csv").write_text("\n".join(lines) + "\n")
    res = dd.compare(dd.read_dice(tmp_path / "a"), dd.read_dice(tmp_path / "b"))
    assert list(res) == ["box", "1pt"]
    box = res["box"]  # differences: m1 0, m2 -0.1
    assert box["n"] == 2 and box["mean_a"] == pytest.approx(0.6)
    assert box["diff_of_means"] == pytest.approx(-0.05) == box["mean_diff"]
    assert box["mean_abs_diff"] == pytest.approx(0.05) and box["max_abs_diff"] == pytest.approx(0.1)
    assert box["p99_abs_diff"] == pytest.approx(0.099)  # 0 + 0.99 * (0.1 - 0)
    assert res["1pt"]["mean_diff"] == pytest.approx(0.05)
    (tmp_path / "a" / "per_mask.csv").write_text("mask,image,mode,dice\nm9,i,box,0.1\n")
    with pytest.raises(ValueError, match="different masks"):
        dd.compare(dd.read_dice(tmp_path / "a"), dd.read_dice(tmp_path / "b"))


@torch.inference_mode()
def test_tinyvit_attention_takes_the_fused_sdpa_kernel(tiny_lite, inputs):
    """The fast path's window attention reaches SDPA's fused CPU kernel, not its unfused "math"
    fallback (10x slower on LiteMedSAM's stage 1; a 3-D or fp32 mask sends it there)."""
    from torch.profiler import profile

    x, _ = inputs
    fast = precision.apply(copy.deepcopy(tiny_lite), precision.FAST)
    with profile() as prof:
        fast.encode(x)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
