"""infer.py: the segmenter end to end on files made here (PNG, 16-bit TIFF, NIfTI, a folder),
the evaluation protocol against independent numpy computations, and exact replay of its prompts.
A tiny random model keeps it fast; its masks are arbitrary but deterministic, which is all these
checks need. outputs.py's pure helpers have their own tests in test_outputs.py; the download
tests live in test_checkpoints.py, the latency benchmark's in test_bench.py."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import data
import files
import infer
import infer_cli
import model
import outputs

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Fixtures: a tiny checkpoint, images on disk
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)  # the tiny model's weights: arbitrary but fixed
    sam = model.Sam(model.SamConfig.from_name("tiny"))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    model.save_checkpoint(sam, path)
    return path


@pytest.fixture(scope="module")
def sam(ckpt):
    return model.load_checkpoint(ckpt, verbose=False)


def blob_image(h, w, seed=0):
    """A grey image with a bright disk and a darker square on noise: (H, W) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = rng.integers(0, 40, (h, w)) + 150 * (
        ((yy - h / 2) ** 2 + (xx - w / 3) ** 2) < (h / 4) ** 2
    )
    img[h // 8 : h // 4, w // 2 : w - 5] = 90
    return img.astype(np.uint8)


def run(argv):
    return infer_cli.main(infer_cli.parse_args([str(a) for a in argv]))


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def test_dice_iou_against_numpy():
    rng = np.random.default_rng(0)
    pred = rng.random((6, 20, 30)) > 0.5
    gt = rng.random((6, 20, 30)) > 0.6
    pred[4], gt[4] = False, False  # both empty: perfect
    pred[5] = False  # nothing predicted: 0
    dice, iou = infer.dice_iou(torch.from_numpy(pred), torch.from_numpy(gt))
    for p, g, d, i in zip(pred, gt, dice.numpy(), iou.numpy(), strict=True):
        inter, union = np.logical_and(p, g).sum(), np.logical_or(p, g).sum()
        want_d = 1.0 if p.sum() + g.sum() == 0 else 2 * inter / (p.sum() + g.sum())
        want_i = 1.0 if union == 0 else inter / union
        assert d == pytest.approx(want_d, abs=1e-12) and i == pytest.approx(want_i, abs=1e-12)
    assert dice[4] == 1 and dice[5] == 0


# ------------------------------------------------------------------------------------------------
# The segmenter, end to end
# ------------------------------------------------------------------------------------------------


def test_png_one_box_mask_overlay_json(ckpt, sam, tmp_path):
    rgb = np.stack([blob_image(90, 130, s) for s in range(3)], -1)  # (H, W, 3)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    out, ov = tmp_path / "o" / "mask.png", tmp_path / "o" / "overlay.png"
    box = [20, 10, 70, 60]
    assert run([tmp_path / "img.png", "--box", *box, "--checkpoint", ckpt, "--out", out,
                "--overlay", ov]) == 0  # fmt: skip
    mask = np.asarray(Image.open(out))
    assert mask.shape == (90, 130) and set(np.unique(mask)) <= {0, 255}
    seg = infer.segment(sam, rgb, [infer.Prompt(box=box)])
    np.testing.assert_array_equal(mask == 255, seg.masks[0])
    np.testing.assert_array_equal(infer.segment(sam, rgb, boxes=[box]).masks, seg.masks)
    rec = json.loads((tmp_path / "o" / "mask.json").read_text())
    assert rec["prompts"][0]["box"] == box and (rec["height"], rec["width"]) == (90, 130)
    assert rec["predicted_iou"] == pytest.approx(seg.iou.tolist(), abs=1e-6)
    assert {"encode", "decode", "total"} <= set(rec["timings_s"])
    assert (
        rec["area_px"] == [int(seg.masks[0].sum())] and "uncalibrated" in rec["predicted_iou_note"]
    )
    # the overlay is the image tinted with colour 0 where the mask is (away from the box outline),
    # enlarged 4x (whole pixels) for display: 130 px wide is small
    k = outputs.display_scale((90, 130))
    img = np.asarray(Image.open(ov)).astype(float)
    assert k == 4 and img.shape == (360, 520, 3) and rec["overlay_scale"] == 4
    img = img[::k, ::k]
    inner = np.zeros((90, 130), bool)
    inner[13:57, 23:67] = True
    m = seg.masks[0] & inner
    want = 0.55 * rgb[m] + 0.45 * np.array(outputs.PALETTE[0])
    assert m.sum() > 0 and np.abs(img[m] - want).max() <= 1.0
    np.testing.assert_array_equal(img[~seg.masks[0] & inner], rgb[~seg.masks[0] & inner])
    with pytest.raises(FileExistsError, match="--force"):
        run([tmp_path / "img.png", "--box", *box, "--checkpoint", ckpt, "--out", out])


@pytest.mark.slow  # a whole command over several files
def test_tiff16_label_map_ids_match_prompts(ckpt, sam, tmp_path):
    grey16 = blob_image(120, 100, 1).astype(np.uint16) * 257 + 3
    Image.fromarray(grey16).save(tmp_path / "img.tif")
    prompts = [{"box": [5, 5, 60, 50]}, {"box": [30, 40, 95, 110]},
               {"points": [[50, 60], [10, 100]], "labels": [1, 0]}]  # fmt: skip
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    out = tmp_path / "labels.png"
    run(
        [tmp_path / "img.tif", "--prompts", tmp_path / "p.json", "--checkpoint", ckpt, "--out", out]
    )
    ids = np.asarray(Image.open(out))
    assert ids.shape == (120, 100) and set(np.unique(ids)) <= {0, 1, 2, 3}
    image = data.read_image(tmp_path / "img.tif")
    # each prompt decoded alone must give the mask its id marks (up to overlaps, resolved by logit)
    alone = [infer.segment(sam, image, [outputs.parse_prompt(p)]) for p in prompts]
    logits = np.stack([a.logits[0] for a in alone])  # (3, H, W)
    masks = logits > 0
    want = np.where(masks.any(0), np.where(masks, logits, -np.inf).argmax(0) + 1, 0)
    assert (ids == want).mean() > 0.999
    assert len(np.unique(want)) > 2  # the check is not vacuous


@pytest.mark.slow  # a whole command over several files
def test_nifti_slice_and_box3d_keep_affine(ckpt, sam, tmp_path):
    vol = np.stack([blob_image(40, 44, k) for k in range(36)], -1).astype(np.float32) * 7 - 100
    affine = np.array([[-1.5, 0, 0, 30], [0, 0, 2.0, -20], [0, -1.2, 0, 15], [0, 0, 0, 1]])
    src = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), src)
    out = tmp_path / "m.nii.gz"
    run([src, "--slice", 4, "--axis", "z", "--box", 5, 5, 30, 30, "--checkpoint", ckpt,
         "--out", out, "--overlay", tmp_path / "ov.png"])  # fmt: skip
    res = nib.load(out)
    np.testing.assert_allclose(res.affine, affine)
    assert res.shape == vol.shape and res.header.get_zooms() == nib.load(src).header.get_zooms()
    canon = nib.as_closest_canonical(res).get_fdata()  # back on the grid data.py slices
    v = data.read_volume(src)
    u8 = data.normalize_intensity(v.data)
    gray = data.volume_slice(u8, "z", 4)
    seg = infer.segment(sam, np.repeat(gray[..., None], 3, 2), [infer.Prompt(box=[5, 5, 30, 30])])
    np.testing.assert_array_equal(data.volume_slice(canon, "z", 4) == 1, seg.masks[0])
    assert canon.sum() == seg.masks[0].sum()  # nothing outside that slice
    k = outputs.display_scale(gray.shape)
    assert Image.open(tmp_path / "ov.png").size == (gray.shape[1] * k, gray.shape[0] * k)
    out3 = tmp_path / "m3.nii.gz"
    run([src, "--box3d", 5, 5, 2, 30, 30, 7, "--checkpoint", ckpt, "--out", out3])
    canon3 = nib.as_closest_canonical(nib.load(out3)).get_fdata()
    zs = np.nonzero(canon3.any((0, 1)))[0]
    assert set(zs) <= set(range(2, 7)) and len(zs) >= 1  # z1 = 7 is exclusive, like x1 and y1
    rec3 = json.loads((tmp_path / "m3.json").read_text())
    assert [s["slice"] for s in rec3["slices"]] == [2, 3, 4, 5, 6]
    np.testing.assert_allclose(nib.load(out3).affine, affine)


def test_bad_inputs_give_clear_errors(ckpt, tmp_path):
    Image.fromarray(blob_image(50, 60)).save(tmp_path / "img.png")
    base = [tmp_path / "img.png", "--checkpoint", ckpt, "--out", tmp_path / "m.png"]
    with pytest.raises(ValueError, match=r"img.png: box 0 \[10.0, 10.0, 5.0, 40.0\]"):
        run([*base, "--box", 10, 10, 5, 40])
    with pytest.raises(ValueError, match=r"50x60 \(HxW\) image"):
        run([*base, "--box", 10, 10, 61, 40])
    with pytest.raises(ValueError, match="outside"):
        run([*base, "--point", 60, 10])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        run([tmp_path / "nope.png", "--box", 1, 1, 5, 5, "--checkpoint", ckpt])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="bad.png"):
        run([tmp_path / "bad.png", "--box", 1, 1, 5, 5, "--checkpoint", ckpt, "--out",
             tmp_path / "b.png"])  # fmt: skip
    with pytest.raises(ValueError, match="no prompts"):
        run(base)
    (tmp_path / "p.json").write_text(json.dumps([{"box": [1, 1, 5, 5]}]))
    with pytest.raises(ValueError, match="either in --prompts"):
        run([*base, "--prompts", tmp_path / "p.json", "--box", 1, 1, 5, 5])
    with pytest.raises(ValueError, match="--window: window is one of"):
        run([*base, "--box", 1, 1, 5, 5, "--window", "no_such_window"])
    assert not (tmp_path / "m.png").exists()


def test_segment_errors_name_the_problem_not_the_command(sam):
    """The library says what is wrong with a prompt; naming the file or flag is the CLI's job."""
    image = np.zeros((50, 60, 3), np.uint8)
    with pytest.raises(
        ValueError, match=r"^box 0 \[10.0, 10.0, 5.0, 40.0\] is not inside the 50x60 \(HxW\)"
    ):
        infer.segment(sam, image, boxes=[[10, 10, 5, 40]])
    with pytest.raises(ValueError, match=r"^point \(60.0, 10.0\) of prompt 0 is outside"):
        infer.segment(sam, image, points=([[60, 10]], [1]))
    with pytest.raises(ValueError, match="^no prompts$"):
        infer.segment(sam, image)
    with pytest.raises(ValueError, match="^prompt 0 has neither"):
        infer.segment(sam, image, [infer.Prompt()])


@pytest.mark.slow
def test_cli_error_is_one_line_and_writes_nothing(ckpt, tmp_path):
    Image.fromarray(blob_image(50, 60)).save(tmp_path / "img.png")
    base = [tmp_path / "img.png", "--checkpoint", ckpt, "--out", tmp_path / "m.png"]
    cmd = [sys.executable, str(ROOT / "infer.py"), *map(str, base), "--box", "0", "0", "0", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr  # one line, no traceback (after the load report)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"infer.py: error: {tmp_path / 'img.png'}: box 0 [0.0, 0.0, 0.0, 5.0] is not inside the "
        "50x60 (HxW) image with x0 < x1 and y0 < y1"
    )
    assert not (tmp_path / "m.png").exists()


@pytest.mark.slow  # a whole command over several files
def test_folder_mode_skips_and_lists_bad_files(ckpt, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(blob_image(64, 64, 1)).save(src / "a.png")
    Image.fromarray(blob_image(50, 70, 2)).save(src / "b.png")
    (src / "c.png").write_bytes(b"not an image")
    Image.fromarray(blob_image(30, 30, 3)).save(src / "a_bad_box.png")
    vol = np.stack([blob_image(40, 36, k) for k in range(6)], -1).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), src / "v.nii.gz")
    spec = {
        "a.png": [{"box": [5, 5, 40, 40]}],
        "b.png": [{"box": [1, 1, 30, 30]}, {"box": [30, 10, 69, 49]}],
        "c.png": [{"box": [1, 1, 5, 5]}],
        "gone.png": [{"box": [1, 1, 5, 5]}],
        "a_bad_box.png": [{"box": [5, 5, 1, 1]}],
        "v.nii.gz": {"prompts": [{"box": [2, 2, 30, 30]}]},  # --slice 3 from the command line
        "w.nii.gz": {"slice": 1, "window": "no_such_window", "prompts": [{"box": [1, 1, 5, 5]}]},
    }
    (tmp_path / "p.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    code = run([src, "--prompts", tmp_path / "p.json", "--out-dir", out, "--checkpoint", ckpt,
                "--slice", 3])  # fmt: skip
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["segmented"] == 3
    skipped = {b["file"]: b["error"] for b in summary["skipped"]}
    assert list(skipped) == ["c.png", "gone.png", "a_bad_box.png", "w.nii.gz"]
    assert "c.png" in skipped["c.png"] and "no such file" in skipped["gone.png"]
    assert "box 0" in skipped["a_bad_box.png"] and "window" in skipped["w.nii.gz"]
    assert np.asarray(Image.open(out / "b.png.mask.png")).shape == (50, 70)
    assert (out / "a.png.overlay.png").exists() and (out / "a.png.json").exists()
    assert not (out / "c.png.mask.png").exists()
    assert json.loads((out / "v.nii.gz.json").read_text())["slices"][0]["slice"] == 3
    assert nib.load(out / "v.nii.gz.mask.nii.gz").shape == vol.shape


def test_no_adapter_dtype_and_single_mask(ckpt, tmp_path):
    args = infer_cli.parse_args(["x.png", "--checkpoint", str(ckpt), "--no-adapter",
                                 "--single-mask", "--dtype", "bfloat16"])  # fmt: skip
    cfg = infer_cli.config_from_args(args)
    assert cfg.adapter is False and cfg.multimask is False
    sam = infer.load_model(cfg)
    assert not any(".Adapter." in n for n, _ in sam.named_parameters())
    assert next(sam.parameters()).dtype == torch.bfloat16
    seg = infer.segment(sam, np.zeros((40, 50, 3), np.uint8), [infer.Prompt(box=[2, 2, 30, 30])],
                        multimask=False)  # fmt: skip
    assert seg.masks.shape == (1, 40, 50) and seg.iou.shape == (1,)


# ------------------------------------------------------------------------------------------------
# Reliability (issue 13): checks before the model loads, one consistent output set, bounded
# memory, no untrained or non-finite weights used silently; outputs a person reads (issue 12)
# ------------------------------------------------------------------------------------------------

NO_CKPT = "/nonexistent/no_such_checkpoint.safetensors"  # an error about it = the model was loaded


def _png(tmp_path, h=50, w=60, name="img.png"):
    Image.fromarray(blob_image(h, w)).save(tmp_path / name)
    return tmp_path / name


def _volume(tmp_path, shape=(40, 36, 12), name="vol.nii.gz"):
    vol = np.stack([blob_image(*shape[:2], k) for k in range(shape[2])], -1).astype(np.float32)
    nib.save(nib.Nifti1Image(vol.reshape(shape), np.diag([1.5, 1.5, 3.0, 1])), tmp_path / name)
    return tmp_path / name


def test_colliding_outputs_are_refused_before_any_work(tmp_path):
    """Issue 13.1: --out/--overlay/--json naming one file is refused before the model loads."""
    img, m = _png(tmp_path), tmp_path / "o" / "m.png"
    for flags in (["--overlay", m], ["--json", m], ["--overlay", tmp_path / "o" / "m.json"]):
        with pytest.raises(ValueError, match="two outputs are the same file"):
            run([img, "--box", 1, 1, 20, 20, "--checkpoint", NO_CKPT, "--out", m, *flags])
    assert not (tmp_path / "o").exists()


def test_checks_run_before_the_model_loads(tmp_path):
    """Issues 13.10 and 12.7: bad prompts, slices, windows, prompt files and outputs are reported
    before the (here missing) checkpoint is touched, and nothing is written."""
    img, vol = _png(tmp_path), _volume(tmp_path)
    (tmp_path / "latin1.json").write_bytes('[{"box": [1, 1, 5, 5]}] # caf\xe9'.encode("latin-1"))
    (tmp_path / "strings.json").write_text('[{"box": [1, "10", 20, 20]}]')
    (tmp_path / "bools.json").write_text('[{"points": [[true, 10]]}]')
    m = ["--checkpoint", NO_CKPT, "--out", tmp_path / "m.png"]
    mv = ["--checkpoint", NO_CKPT, "--out", tmp_path / "m.nii.gz"]
    cases = [
        ([img, "--box", 1, 1, 61, 20, *m], ValueError, r"img.png: box 0 .* 50x60 \(HxW\) image"),
        ([img, "--prompts", tmp_path / "latin1.json", *m], ValueError, r"latin1.json: not UTF-8"),
        ([img, "--prompts", tmp_path / "strings.json", *m], ValueError, "coordinates must be"),
        ([img, "--prompts", tmp_path / "bools.json", *m], ValueError, "coordinates must be"),
        ([img, "--box", 1, 1, 5, 5, "--window", 40, 400, *m], ValueError, "for NIfTI volumes"),
        ([img, "--box", 1, 1, 5, 5, "--slice", 2, *m], ValueError, "for NIfTI volumes"),
        ([vol, "--slice", 12, "--box", 1, 1, 5, 5, *mv], ValueError, r"slice 12 is outside 0..11"),
        ([vol, "--slice", 3, "--box3d", 1, 1, 0, 5, 5, 4, *mv], ValueError, "leave out --slice"),
        ([vol, "--box3d", 1, 1, 3, 5, 5, 13, *mv], ValueError, r"0 <= z0 < z1 <= 12 along z"),
        ([vol, "--box3d", 1, 1, 3, 5, 5, 3, *mv], ValueError, "z1 exclusive"),
        ([vol, "--slice", 1, "--box", 1, 1, 5, 40, *mv], ValueError, r"is not inside the 36x40"),
        ([img, "--box", 1, 1, 5, 5, "--checkpoint", NO_CKPT, "--out", img, "--force"],
         ValueError, "is the input .*img.png: refusing to write over an input"),
        ([img, "--box", 1, 1, 5, 5, "--checkpoint", NO_CKPT, "--out", "/proc/x/m.png"],
         PermissionError, "cannot write in /proc"),
        ([img, "--box", 1, 1, 5, 5, "--checkpoint", NO_CKPT, "--out", img / "m.png"],
         NotADirectoryError, "is a file, not a folder"),
    ]  # fmt: skip
    for argv, err, msg in cases:
        with pytest.raises(err, match=msg):
            run(argv)
    run_ok = [img, "--box", 1, 1, 5, 5, *m]  # valid: now the checkpoint is what fails
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        run(run_ok)
    assert not (tmp_path / "m.png").exists() and not (tmp_path / "m.nii.gz").exists()


@pytest.mark.parametrize("window", [["nan", "100"], ["40", "0"], ["40", "-400"], ["inf", "9"]])
def test_bad_windows_are_refused(tmp_path, window):
    """Issue 13.9: a NaN level or a width <= 0 made blank images; now a clear error."""
    argv = [_volume(tmp_path), "--slice", 2, "--box", 1, 1, 5, 5, "--window", *window,
            "--checkpoint", NO_CKPT, "--out", tmp_path / "m.nii.gz"]  # fmt: skip
    with pytest.raises(ValueError, match="--window: window LEVEL WIDTH must be finite with WIDTH"):
        run(argv)


def test_adapter_on_a_checkpoint_without_adapters_is_refused(tmp_path):
    """Issue 13.8: --adapter would have used randomly initialised adapters; inference refuses."""
    torch.manual_seed(0)
    plain = tmp_path / "plain.safetensors"
    model.save_checkpoint(model.Sam(model.SamConfig.from_name("tiny", adapter=False)), plain)
    with pytest.raises(ValueError, match="plain.safetensors: --adapter .* untrained"):
        infer.load_model(infer.InferConfig(checkpoint=str(plain), adapter=True))
    sam = infer.load_model(infer.InferConfig(checkpoint=str(plain)))  # as the file is: fine
    assert not sam.cfg.adapter and not any(".Adapter." in n for n, _ in sam.named_parameters())


def test_adapter_flag_on_a_checkpoint_with_adapters_loads_them(ckpt, sam):
    loaded = infer.load_model(infer.InferConfig(checkpoint=str(ckpt), adapter=True))
    a = dict(loaded.named_parameters())
    adapters = [n for n in a if ".Adapter." in n]
    assert adapters and all(torch.equal(a[n], dict(sam.named_parameters())[n]) for n in adapters)


def test_decoders_with_other_low_res_sizes_segment():
    """LiteMedSAM's decoder returns 256x256 low-res logits (SAM's: S/4); the Segmentation keeps
    whatever size the decoder gives."""
    torch.manual_seed(0)
    lite = model.Sam(model.SamConfig.from_name("lite_medsam")).eval()
    image = np.stack([blob_image(64, 80)] * 3, -1)
    seg = infer.segment(lite, image, boxes=[[2, 2, 40, 40], [20, 10, 70, 60]])
    assert seg.low.shape == (2, 1, 256, 256) and seg.masks.shape == (2, 64, 80)
    assert seg.label_map()[1].tolist() == seg.masks.sum((1, 2)).tolist()


def test_non_finite_logits_are_an_error_not_a_blank_mask(ckpt):
    """Issue 13.9: NaN anywhere in the decoder's path gives NaN logits; segment refuses them."""
    broken = model.load_checkpoint(ckpt, verbose=False)
    with torch.no_grad():
        broken.mask_decoder.iou_token.weight[0, 0] = float("nan")
    image = np.stack([blob_image(50, 60)] * 3, -1)
    with pytest.raises(ValueError, match=r"NaN/inf logits for 2 of 2 prompts"):
        infer.segment(broken, image, boxes=[[1, 1, 20, 20], [5, 5, 40, 40]])


def test_empty_mask_is_warned_and_predicted_iou_not_headlined(tmp_path, capsys):
    """Issue 12.6: an empty mask gets a warning; the console shows mask areas, not the
    uncalibrated predicted IoU (which the JSON keeps, with a note saying what it is)."""
    torch.manual_seed(0)
    cfg = model.SamConfig.from_name("tiny", mask_threshold=1e6)  # no logit is that high
    model.save_checkpoint(model.Sam(cfg), tmp_path / "never.safetensors")
    img = _png(tmp_path)
    run([img, "--box", 1, 1, 30, 30, "--checkpoint", tmp_path / "never.safetensors",
         "--out", tmp_path / "m.png"])  # fmt: skip
    out, err = capsys.readouterr()
    assert f"warning: {img}: prompt 0 gave an empty mask" in err
    assert "mask area 0 px" in out and "IoU" not in out
    rec = json.loads((tmp_path / "m.json").read_text())
    assert rec["warnings"] == [f"{img}: prompt 0 gave an empty mask"]
    assert "uncalibrated" in rec["predicted_iou_note"] and len(rec["predicted_iou"]) == 1


@pytest.mark.slow  # a whole command over several files
def test_folder_mode_inputs_with_one_stem_keep_their_own_outputs(ckpt, tmp_path):
    """Issue 13.2: a.png, a.tif and a.nii.gz all get their outputs (named after the whole file
    name); and every output name of the job is checked before the model loads."""
    src = tmp_path / "in"
    src.mkdir()
    _png(src, 40, 44, "a.png")
    _png(src, 30, 50, "a.tif")
    _volume(src, (40, 36, 6), "a.nii.gz")
    spec = {"a.png": [{"box": [2, 2, 30, 30]}], "a.tif": [{"box": [1, 1, 20, 20]}],
            "a.nii.gz": {"slice": 2, "prompts": [{"box": [2, 2, 30, 30]}]}}  # fmt: skip
    (tmp_path / "p.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    assert run([src, "--prompts", tmp_path / "p.json", "--out-dir", out, "--checkpoint", ckpt]) == 0
    for name in spec:
        assert json.loads((out / f"{name}.json").read_text())["input"] == str(src / name)
        assert (out / f"{name}.overlay.png").exists()
    assert np.asarray(Image.open(out / "a.tif.mask.png")).shape == (30, 50)
    assert nib.load(out / "a.nii.gz.mask.nii.gz").shape == (40, 36, 6)
    # an input named like another input's output, written into the input folder: refused up front
    _png(src, 40, 44, "a.png.mask.png")
    spec["a.png.mask.png"] = [{"box": [2, 2, 30, 30]}]
    (tmp_path / "p2.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="output .*a.png.mask.png is the input"):
        run([src, "--prompts", tmp_path / "p2.json", "--out-dir", src, "--checkpoint", NO_CKPT])


def test_four_d_nifti_keeps_its_shape(ckpt, tmp_path):
    """Issue 13.10: an (X, Y, Z, 1) input gives an (X, Y, Z, 1) label volume."""
    vol = _volume(tmp_path, (40, 36, 5, 1))
    out = tmp_path / "m.nii.gz"
    run([vol, "--slice", 2, "--box", 2, 2, 30, 30, "--checkpoint", ckpt, "--out", out,
         "--threads", 1])  # fmt: skip
    assert json.loads((tmp_path / "m.json").read_text())["threads"] == 1
    res = nib.load(out)
    assert res.shape == (40, 36, 5, 1) and res.get_fdata()[:, :, 2, 0].any()
    assert not res.get_fdata()[:, :, [0, 1, 3, 4], 0].any()


def test_prompt_memory_is_bounded_by_a_chunk(monkeypatch):
    """Issue 13.4: with one prompt's full-size logits per chunk, 20 boxes on a 1500x1500 image
    peak far below the 215 MiB that stacking their masks takes; with all 20 in one chunk (the
    old flow's shape) the same measurement is above 60% of it, so it can tell them apart."""
    import bench

    monkeypatch.setattr(infer, "CHUNK_BYTES", 4 * 1500 * 1500)
    res = bench.prompt_memory(counts=(20,), size=1500)["counts"][20]
    monkeypatch.setattr(infer, "CHUNK_BYTES", 20 * 4 * 1500 * 1500)
    whole = bench.prompt_memory(counts=(20,), size=1500)["counts"][20]
    # Measured alone: +80 vs +215 MiB. In a long test session the process's other allocations
    # shift both peaks alike, so the test bounds the difference: 19 chunks of 8.6 MiB saved.
    assert res["whole_stack_mib"] == 215 and whole["peak_mib"] > 0.6 * 215, whole
    assert whole["peak_mib"] - res["peak_mib"] > 80, (res, whole)


def test_threads_default_leaves_busy_cores_alone(monkeypatch):
    """Issue 12.8: --threads N is N; the default 0 is the cores the load average leaves idle."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert infer_cli.cpu_threads(0) == 8 and infer_cli.cpu_threads(3) == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (5.6, 0.0, 0.0))
    assert infer_cli.cpu_threads(0) == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert infer_cli.cpu_threads(0) == 1
    with pytest.raises(ValueError, match="--threads must be 0"):
        infer_cli.cpu_threads(-1)


def _wait(cond, seconds, what):
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {seconds} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow  # subprocesses
def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """Issue 13.10: SIGINT while the command runs (here: reading --prompts from a FIFO, so it is
    surely inside main) prints one line, exits 130 and leaves no file behind."""
    img, fifo = _png(tmp_path), tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    cmd = [sys.executable, str(ROOT / "infer.py"), str(img), "--prompts", str(fifo),
           "--checkpoint", NO_CKPT, "--out", str(tmp_path / "m.png")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fd = None

        def reader_waits():  # opening the write end succeeds once infer.py opened the read end
            nonlocal fd
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return proc.poll() is not None
            return True

        _wait(reader_waits, 120, "infer.py to open the prompt file")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        if fd is not None:
            os.close(fd)
    assert proc.returncode == 130
    assert err.strip() == "infer.py: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "prompts.fifo"]


@pytest.mark.slow  # four subprocesses
def test_concurrent_runs_leave_one_consistent_set(ckpt, sam, tmp_path):
    """Issue 13.3: two runs onto the same outputs, made to reach their commit together (this
    test holds the output folder's lock until both have written all their temp files). With
    --force both succeed and the files are one run's set; without it the second fails and the
    files are the first's. Consistent = the mask is the one the JSON's box gives and the overlay
    is the one drawn from that mask and box."""
    rgb = np.stack([blob_image(90, 130, s) for s in range(3)], -1)  # (H, W, 3)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    boxes = {"A": [10, 10, 60, 50], "B": [40, 30, 120, 85]}
    want = {tuple(b): infer.segment(sam, rgb, boxes=[b]).masks[0] for b in boxes.values()}
    assert (want[tuple(boxes["A"])] != want[tuple(boxes["B"])]).mean() > 0.01  # tells them apart
    procs = {}
    dirs = {"force": tmp_path / "force", "noforce": tmp_path / "noforce"}
    for d in dirs.values():
        d.mkdir()
    with files.folder_locks(dirs.values()):
        for mode, d in dirs.items():
            for name, b in boxes.items():
                force = ["--force"] if mode == "force" else []
                cmd = [sys.executable, str(ROOT / "infer.py"), str(tmp_path / "img.png"),
                       "--box", *map(str, b), "--checkpoint", str(ckpt), "--out", str(d / "m.png"),
                       "--overlay", str(d / "ov.png"), "--dtype", "float32", *force]  # fmt: skip
                procs[mode, name] = subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )

        def all_temps_written():
            temps = [len(list(d.glob(".*.tmp*"))) for d in dirs.values()]
            if any(p.poll() is not None for p in procs.values()):
                raise AssertionError({k: p.communicate() for k, p in procs.items()})
            return temps == [6, 6]  # mask, overlay, JSON of two runs in each folder

        try:
            _wait(all_temps_written, 240, "both runs to write their temp files")
        except BaseException:
            for p in procs.values():
                p.kill()
            raise
    results = {k: (p.wait(timeout=120), p.stderr.read()) for k, p in procs.items()}
    assert [results["force", n][0] for n in boxes] == [0, 0], results
    codes = sorted(results["noforce", n][0] for n in boxes)
    assert codes == [0, 2], results
    assert any("another run" in results["noforce", n][1] for n in boxes)
    for d in dirs.values():
        rec = json.loads((d / "m.json").read_text())
        mask = np.asarray(Image.open(d / "m.png")) == 255
        box = rec["prompts"][0]["box"]
        assert (mask == want[tuple(box)]).mean() > 0.999
        ids = mask.astype(np.uint8)
        drawn = outputs.overlay(rgb, ids, [infer.Prompt(box=box)], 0.45)
        np.testing.assert_array_equal(np.asarray(Image.open(d / "ov.png")), drawn)
        assert not list(d.glob(".*.tmp*"))


# ------------------------------------------------------------------------------------------------
# Evaluation: the protocol, its scores against numpy, and exact replay
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three images (both sides < 256: centred pad; one side > 256: stretch), two masks each,
    SA-Med2D-20M names over two datasets; one mask has two components."""
    root = tmp_path_factory.mktemp("ds")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    manifest = {}
    for i, (mod, ds, h, w) in enumerate([("mr_t1", "Synth", 200, 180), ("ct", "Other", 300, 280),
                                         ("mr_t1", "Synth", 64, 300)]):  # fmt: skip
        name = f"{mod}--{ds}--case{i:04d}--z_{i:04d}"
        img = blob_image(h, w, i)
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        yy, xx = np.mgrid[:h, :w]
        disk = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2) < (h / 4) ** 2
        two = np.zeros((h, w), bool)
        two[h // 8 : h // 4, w // 2 : w - 5] = True
        two[h - 6 : h - 2, 2:6] = True  # a small second component
        for lab, m in ((1, disk), (2, two)):
            mname = f"{name}--label_{lab}_000.png"
            Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / mname)
            manifest[f"masks/{mname}"] = f"images/{name}.png"
    (root / "label2image_test.json").write_text(json.dumps(manifest))
    return root


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # a whole command over several files
def test_eval_scores_match_numpy_on_saved_predictions(ckpt, dataset, tmp_path):
    out = tmp_path / "ev"
    run(["--eval", dataset, "--checkpoint", ckpt, "--out-dir", out, "--save-masks",
         "--protocol", "official"])  # fmt: skip
    rows = _csv(out / "per_mask.csv")
    assert len(rows) == 6 * 4 and {r["mode"] for r in rows} == {"box", "1pt", "3pt", "5pt"}
    for r in rows:
        pred = np.asarray(Image.open(out / "masks" / r["mode"] / Path(r["mask"]).name)) > 0
        gt = np.asarray(Image.open(dataset / r["mask"])) > 0
        assert pred.shape == gt.shape  # scored at the original resolution
        inter, union = np.logical_and(pred, gt).sum(), np.logical_or(pred, gt).sum()
        assert float(r["dice"]) == pytest.approx(2 * inter / (pred.sum() + gt.sum()), abs=1e-12)
        assert float(r["iou"]) == pytest.approx(inter / union, abs=1e-12)
    res = json.loads((out / "results.json").read_text())
    for mode in ("box", "1pt", "3pt", "5pt"):  # per-mask average, not pooled
        assert res["dice"][mode] == pytest.approx(
            np.mean([float(r["dice"]) for r in rows if r["mode"] == mode]), abs=1e-12
        )
    assert set(res["by"]["dataset"]) == {"Synth", "Other"}
    assert res["by"]["modality"]["mr_t1"]["n_masks"] == 4
    assert set(res["by"]["label"]) == {"Synth/label_1", "Synth/label_2", "Other/label_1",
                                       "Other/label_2"}  # fmt: skip
    (tmp_path / "ev2" / "masks").mkdir(parents=True)  # saved predictions are outputs too
    with pytest.raises(FileExistsError, match="masks"):
        run(["--eval", dataset, "--checkpoint", ckpt, "--out-dir", tmp_path / "ev2",
             "--save-masks"])  # fmt: skip


def test_eval_prompts_follow_the_protocol(sam, dataset):
    """Boxes: the largest component's tight box (official) or the whole mask's; clicks: the first
    inside the mask, each later one labelled by the ground truth at its pixel (error region)."""
    res = {"official": infer.evaluate(sam, dataset, ("box", 5), protocol="official"),
           "tight": infer.evaluate(sam, dataset, ("box",), protocol="tight")}  # fmt: skip
    for key, per_mode in res["official"]["prompts"]["masks"].items():
        gt = data.read_mask(dataset / key)
        geom = data.geometry(*gt.shape, sam.cfg.image_size, sam.cfg.resize_mode)
        gm = geom.mask_to_model(gt)  # (S, S) bool
        ys, xs = np.nonzero(gm)
        tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert res["tight"]["prompts"]["masks"][key]["box"]["box"] == tight
        if "label_2" in key:  # the official box leaves out the small second component
            assert per_mode["box"]["box"][1] == tight[1] and per_mode["box"]["box"][3] < tight[3]
        pts, labels = per_mode["5pt"]["points"], per_mode["5pt"]["labels"]
        assert len(pts) == 5 and labels[0] == 1 and gm[int(pts[0][1]), int(pts[0][0])]
        assert labels == [int(gm[int(y), int(x)]) for x, y in pts]


def test_eval_clicks_feed_back_probabilities(sam, dataset, tmp_path):
    """Replaying the recorded 3 clicks by hand, mask by mask with the previous low-res logits
    fed back through a sigmoid, reproduces the evaluation's predictions."""
    res = infer.evaluate(sam, dataset, (3,), save_dir=tmp_path)
    key = next(iter(res["prompts"]["masks"]))
    img_key = json.loads((dataset / "label2image_test.json").read_text())[key]
    image = data.read_image(dataset / img_key)
    x, geom = data.preprocess(image, sam.cfg)
    emb = sam.encode(x)
    rec = res["prompts"]["masks"][key]["3pt"]
    xy, lab = torch.tensor([rec["points"]]), torch.tensor([rec["labels"]])
    low = None
    with torch.inference_mode():
        for n in (1, 2, 3):
            prob = None if low is None else torch.sigmoid(low)
            lows, ious = sam.decode(emb, (xy[:, :n], lab[:, :n]), mask_input=prob)
            low = lows[:, ious[0].argmax()][:, None]  # (1, 1, h, w)
    mine = geom.logits_to_original(low)[0, 0].numpy() > 0
    saved = np.asarray(Image.open(tmp_path / "3pt" / Path(key).name)) > 0
    assert (mine == saved).mean() > 0.999


def test_prompt_file_replays_exactly(ckpt, dataset, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["--eval", dataset, "--checkpoint", ckpt, "--modes", "box", "3", "--limit", 1]
    run([*common, "--out-dir", a])
    run([*common, "--out-dir", b, "--seed", 7, "--prompt-file", a / "prompts.json"])
    run([*common, "--out-dir", c, "--seed", 7])
    assert (a / "per_mask.csv").read_text() == (b / "per_mask.csv").read_text()
    pa, pb = (json.loads((d / "prompts.json").read_text()) for d in (a, b))
    assert pa["masks"] == pb["masks"]
    pc = json.loads((c / "prompts.json").read_text())
    assert pc["masks"] != pa["masks"]  # another seed draws other clicks: the replay did matter


def test_evaluate_api_is_seeded_and_returns_means(sam, dataset):
    r1 = infer.evaluate(sam, dataset, ("box", 1), seed=3, limit=2)
    r2 = infer.evaluate(sam, str(dataset), ("box", 1), seed=3, limit=2)
    assert set(r1["dice"]) == {"box", "1pt"} and r1["n_masks"] == 4
    assert r1["dice"] == r2["dice"] and r1["prompts"] == r2["prompts"]
    assert len({r["image"] for r in r1["per_mask"]}) == 2  # limit counts images, not masks
    for mode in ("box", "1pt"):  # the means are per mask, over the rows they summarise
        rows = [r for r in r1["per_mask"] if r["mode"] == mode]
        assert len(rows) == 4
        assert r1["dice"][mode] == pytest.approx(np.mean([r["dice"] for r in rows]), abs=1e-12)
        assert r1["iou"][mode] == pytest.approx(np.mean([r["iou"] for r in rows]), abs=1e-12)
    r3 = infer.evaluate(sam, dataset, (1,), seed=4, limit=1)
    first = lambda r: {k: v["1pt"] for k, v in list(r["prompts"]["masks"].items())[:2]}
    assert first(r3) != first(r1)  # the seed drives the clicks


def test_evaluate_takes_a_test_dataset_and_a_split(sam, dataset, tmp_path):
    by_dir = infer.evaluate(sam, dataset, ("box",))
    by_ds = infer.evaluate(sam, data.TestDataset(dataset, sam.cfg), ("box",))
    assert [r["dice"] for r in by_ds["per_mask"]] == [r["dice"] for r in by_dir["per_mask"]]
    (tmp_path / "label2image_val.json").write_text("{}")
    with pytest.raises(ValueError, match="val manifest lists no masks"):
        infer.evaluate(sam, tmp_path, ("box",), split="val")


def test_malformed_prompt_entry_is_skipped_in_folder_mode(ckpt, tmp_path):
    """A malformed entry is a ValueError naming the prompt file and the entry (so folder mode
    skips that file and segments the rest), never a TypeError from deep inside."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(blob_image(40, 40)).save(src / "a.png")
    Image.fromarray(blob_image(40, 40)).save(src / "b.png")
    spec = {"a.png": [{"points": 5}], "b.png": [{"box": [2, 2, 30, 30]}]}
    (tmp_path / "p.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    assert run([src, "--prompts", tmp_path / "p.json", "--out-dir", out, "--checkpoint", ckpt]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["segmented"] == 1 and summary["skipped"][0]["file"] == "a.png"
    assert summary["skipped"][0]["error"].startswith(f"{tmp_path / 'p.json'}: a.png: prompt 0: ")


def test_prompt_file_without_a_mode_is_a_clear_error(ckpt, dataset, tmp_path):
    a = tmp_path / "a"
    run(["--eval", dataset, "--checkpoint", ckpt, "--out-dir", a, "--modes", "box", "--limit", 1])
    with pytest.raises(ValueError, match="no 3pt prompts for mask"):
        run(["--eval", dataset, "--checkpoint", ckpt, "--out-dir", tmp_path / "b", "--modes",
             "box", "3", "--limit", 1, "--prompt-file", a / "prompts.json"])  # fmt: skip
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="not a prompts.json"):
        run(["--eval", dataset, "--checkpoint", ckpt, "--out-dir", tmp_path / "c",
             "--prompt-file", tmp_path / "list.json"])  # fmt: skip
