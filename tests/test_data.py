"""Tests for data.py: reading, preprocess (against a NumPy re-implementation of the official OpenCV
pipeline), connected components (against a flood fill), prompt sampling, manifests and datasets
(on a dataset that prepare.py builds; its own tests are in test_prepare.py)."""

import gzip
import json
from collections import deque
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from test_prepare import make_volumes, mni_paths, volume_cfg

import data
import files
import prepare
from files import read_json
from model import SamConfig


def cfg_like(**kw):
    """The model config data.py reads (image_size, pixel_mean/std, channel_order, resize_mode);
    SAM-Med2D's released weights expect BGR."""
    return SamConfig.from_name("tiny", **{"channel_order": "BGR", **kw})


# ----------------------------------------------------------------------------------------------
# Reading files


def test_read_image_formats(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (13, 17), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    Image.fromarray(rgb).save(tmp_path / "rgb.tif")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([rgb, grey])).save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgb.bmp", "rgb.tif", "rgba.png"):
        np.testing.assert_array_equal(data.read_image(tmp_path / name), rgb)
    out = data.read_image(tmp_path / "grey.png")
    assert out.shape == (13, 17, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.dstack([grey] * 3))
    smooth = np.dstack([*np.meshgrid(np.arange(32) * 8, np.arange(32) * 4), np.full((32, 32), 99)])
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "smooth.jpg", quality=95)
    assert np.abs(data.read_image(tmp_path / "smooth.jpg").astype(int) - smooth).mean() < 3


def test_read_image_16bit_scales_to_8bit(tmp_path):
    a = np.array([[0, 1000], [3000, 4000]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "a16.png")
    Image.fromarray(a).save(tmp_path / "a16.tif")
    want = np.round(a / 4000 * 255).astype(np.uint8)
    for name in ("a16.png", "a16.tif"):
        np.testing.assert_array_equal(data.read_image(tmp_path / name)[..., 0], want)
    small = np.array([[0, 7], [200, 255]], dtype=np.uint16)  # already 8-bit range: kept
    Image.fromarray(small).save(tmp_path / "s16.png")
    np.testing.assert_array_equal(data.read_image(tmp_path / "s16.png")[..., 0], small)


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(data.DataError, match="broken.png"):
        data.read_image(bad)
    with pytest.raises(data.DataError, match="missing.png: no such file"):
        data.read_image(tmp_path / "missing.png")
    Image.fromarray(np.array([[0, 1], [2, 0]], np.uint8)).save(tmp_path / "three.png")
    with pytest.raises(data.DataError, match="three.png: mask values"):
        data.read_mask(tmp_path / "three.png")
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(data.DataError, match="colour.png: colour mask"):
        data.read_mask(tmp_path / "colour.png")
    Image.fromarray(np.array([[0, 0.5]], np.float32)).save(tmp_path / "frac.tif")
    with pytest.raises(data.DataError, match="frac.tif: non-integer"):
        data.read_label_map(tmp_path / "frac.tif")


def test_read_mask_binary_conventions(tmp_path):
    m = np.zeros((5, 6), bool)
    m[1:3, 2:5] = True
    for scale, name in ((1, "m01.png"), (255, "m255.png")):
        Image.fromarray(m.astype(np.uint8) * scale).save(tmp_path / name)
        out = data.read_mask(tmp_path / name)
        assert out.dtype == bool
        np.testing.assert_array_equal(out, m)
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "empty.png")
    assert not data.read_mask(tmp_path / "empty.png").any()


def test_stem_strips_one_format_suffix():
    want = {"scan.nii.gz": "scan", "SCAN.NII.GZ": "SCAN", "ct.nii": "ct", "p01_a.png": "p01_a",
            "a.b.tif": "a.b", "dir/x_mask.png": "x_mask", "noext": "noext"}  # fmt: skip
    assert {name: files.stem(Path(name)) for name in want} == want
    assert files.stem("dir.v2/case.nii.gz") == "case"  # a str works too


def test_read_mask_checks_its_image_size(tmp_path):
    m = np.zeros((5, 6), np.uint8)
    m[1:3, 2:4] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    np.testing.assert_array_equal(data.read_mask(tmp_path / "m.png", (5, 6), "img.png"), m > 0)
    with pytest.raises(data.DataError, match=r"m.png: mask is 6x5 but its image img.png is 7x5"):
        data.read_mask(tmp_path / "m.png", (5, 7), "img.png")
    with pytest.raises(data.DataError, match=r"m.png: mask is 6x5 but its image is 6x4"):
        data.read_label_map(tmp_path / "m.png", (4, 6))


def _save_nifti(path, arr, affine):
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def test_read_volume_canonical_orientation(tmp_path):
    # Stored L-P-S (DICOM-like): voxel axis 0 runs right->left, axis 1 anterior->posterior.
    arr = np.zeros((6, 7, 5), np.float32)
    arr[1, 2, 3] = 9.0
    lps = np.diag([-2.0, -3.0, 4.0, 1.0])
    _save_nifti(tmp_path / "v.nii.gz", arr, lps)
    vol = data.read_volume(tmp_path / "v.nii.gz")
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert vol.data.dtype == np.float32 and vol.data.shape == (6, 7, 5)
    # axes 0 and 1 are flipped: index i -> 5 - i, j -> 6 - j
    assert vol.data[6 - 1 - 1, 7 - 1 - 2, 3] == 9.0 and vol.data.sum() == 9.0
    # the world position of the marker is unchanged by reorientation
    world_old = lps @ np.array([1, 2, 3, 1])
    world_new = vol.affine @ np.array([4, 4, 3, 1])
    np.testing.assert_allclose(world_old, world_new)


def test_read_volume_errors(tmp_path):
    arr = np.ones((4, 4, 4), np.float32)
    arr[1, 1, 1] = np.nan
    _save_nifti(tmp_path / "nan.nii.gz", arr, np.eye(4))
    with pytest.raises(data.DataError, match="nan.nii.gz: 1 NaN/inf voxels"):
        data.read_volume(tmp_path / "nan.nii.gz")
    _save_nifti(tmp_path / "ok.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    raw = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match="trunc.nii.gz: cannot read"):
        data.read_volume(tmp_path / "trunc.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"junk" * 100))
    with pytest.raises(data.DataError, match="junk.nii.gz: cannot read"):
        data.read_volume(tmp_path / "junk.nii.gz")


def test_normalize_intensity():
    v = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], np.float32)
    # soft tissue 40/400 -> [-160, 240]
    out = data.normalize_intensity(v, "soft_tissue")
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255])
    np.testing.assert_array_equal(data.normalize_intensity(v, (40, 400)), out)
    rng = np.random.default_rng(1)
    mr = rng.gamma(2.0, 100.0, (20, 20, 20)).astype(np.float32)
    mr[:5] = 0
    lo, hi = np.percentile(mr[mr != 0], [0.5, 99.5])
    want = np.round((np.clip(mr, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)
    np.testing.assert_array_equal(data.normalize_intensity(mr), want)
    assert data.normalize_intensity(np.zeros((3, 3))).max() == 0


# ----------------------------------------------------------------------------------------------
# preprocess and Geometry


def official_preprocess(rgb, S=256):
    """SAM-Med2D's test transform with OpenCV itself: cv2.imread (BGR), normalise with SAM's RGB
    statistics as they are (float64), then cv2.resize INTER_NEAREST or a centred zero pad
    (albumentations PadIfNeeded) when both sides are < S."""
    bgr = rgb[..., ::-1].astype(np.float64)
    x = (bgr - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    H, W = rgb.shape[:2]
    if H < S and W < S:
        out = np.zeros((S, S, 3))
        top, left = (S - H) // 2, (S - W) // 2
        out[top : top + H, left : left + W] = x
    else:
        out = cv2.resize(x, (S, S), interpolation=cv2.INTER_NEAREST)
    return out.transpose(2, 0, 1)[None]  # (1, 3, S, S)


@pytest.mark.parametrize("shape", [(300, 517), (256, 256), (100, 73), (256, 40), (255, 255),
                                   (186, 744), (936, 300)])  # fmt: skip
def test_preprocess_matches_official_stretch(shape):
    rgb = np.random.default_rng(2).integers(0, 256, (*shape, 3), dtype=np.uint8)
    x, geom = data.preprocess(rgb, cfg_like())
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), official_preprocess(rgb), atol=1e-5)
    assert geom.original == shape


def cv2_nearest_indices(src, dst, axis):
    """The source index OpenCV's INTER_NEAREST picks for each output pixel: resize a ramp."""
    ramp = np.arange(src, dtype=np.float32)  # exact integers
    ramp = ramp[None] if axis == 1 else ramp[:, None]
    size = (dst, 1) if axis == 1 else (1, dst)  # cv2 takes (width, height)
    return cv2.resize(ramp, size, interpolation=cv2.INTER_NEAREST).ravel().astype(np.int64)


def test_nearest_indices_are_opencv_for_every_size():
    """Every source size 16..1100 onto 256 (and onto 1024 and 64 for a subset), rows and
    columns: the index vectors equal OpenCV's; torch's mode="nearest" differs for some sizes."""
    torch_differs = []
    for src in range(16, 1101):
        for dst in (256,) if src % 7 else (256, 1024, 64):
            want = data.nearest_indices(src, dst)
            for axis in (0, 1):
                np.testing.assert_array_equal(cv2_nearest_indices(src, dst, axis), want)
        ramp = torch.arange(src, dtype=torch.float32)[None, None, None]
        t = torch.nn.functional.interpolate(ramp, (1, 256), mode="nearest").long().ravel()
        if not np.array_equal(t.numpy(), data.nearest_indices(src, 256)):
            torch_differs.append(src)
    assert {186, 372, 744, 936} <= set(torch_differs) and len(torch_differs) == 33


def test_geometry_nearest_rule_image_and_mask():
    """One real image (186 x 394, from the MNI152 template's axial slice 90, -> 256): image and mask
    take the same pixels as OpenCV; nearest="torch" keeps torch's rule."""
    vol = data.read_volume(mni_paths()[0])  # 197 x 233 x 189 voxels, 1 mm
    img = data.volume_slice(data.normalize_intensity(vol.data), "z", 90)  # (233, 197)
    img = np.concatenate([img[:186], img[:186, ::-1]], 1)  # (186, 394): stretched, not padded;
    rgb = np.repeat(img[..., None], 3, 2)  # 186 rows: a size where torch's rule differs
    cfg = cfg_like(channel_order="RGB", pixel_mean=(0,) * 3, pixel_std=(1,) * 3)
    x, geom = data.preprocess(rgb, cfg)
    want = cv2.resize(img, (256, 256), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(x[0, 0].numpy(), want)
    mask = img > 100
    want_mask = cv2.resize(mask.astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(geom.mask_to_model(mask), want_mask > 0)
    xt, gt = data.preprocess(rgb, cfg, nearest="torch")
    ref = torch.nn.functional.interpolate(torch.from_numpy(img)[None, None].float(), (256, 256))
    torch.testing.assert_close(xt[0, :1], ref[0])
    assert not torch.equal(xt, x) and gt.nearest == "torch"


def test_stretch_is_not_pillow_nearest():
    """The convention matters: Pillow's NEAREST and torch's nearest-exact sample pixel centres
    and pick other pixels."""
    rgb = np.random.default_rng(3).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    x, _ = data.preprocess(
        rgb, cfg_like(channel_order="RGB", pixel_mean=(0,) * 3, pixel_std=(1,) * 3)
    )
    pil = np.asarray(Image.fromarray(rgb).resize((256, 256), Image.NEAREST)).transpose(2, 0, 1)
    assert (x[0].numpy() != pil).any(axis=0).mean() > 0.1
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    exact = torch.nn.functional.interpolate(t, (256, 256), mode="nearest-exact")[0]
    assert (x[0] != exact).any(0).float().mean() > 0.1  # torch's other nearest: also different


def test_preprocess_rgb_order_and_longest():
    rgb = np.random.default_rng(4).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    cfg = cfg_like(channel_order="RGB", resize_mode="longest", image_size=64)
    x, geom = data.preprocess(rgb, cfg)
    assert geom.content == (32, 64) and geom.pad == (0, 0)
    assert (x[0, :, 32:] == 0).all()  # padding bottom, zero after normalising
    # SAM resizes the 8-bit image with Pillow's bilinear filter; torch's antialias matches it to
    # within rounding
    pil = np.asarray(Image.fromarray(rgb).resize((64, 32), Image.BILINEAR)).astype(np.float64)
    want = (pil - np.array(cfg.pixel_mean)) / np.array(cfg.pixel_std)
    diff = np.abs(x[0, :, :32].numpy().transpose(1, 2, 0) - want) * np.array(cfg.pixel_std)
    assert diff.max() <= 1.0 + 1e-4 and diff.mean() < 0.3


def test_geometry_maps_points_boxes_masks_consistently():
    for shape, mode in [((300, 517), "stretch"), ((90, 60), "stretch"), ((300, 517), "longest")]:
        H, W = shape
        geom = data.geometry(H, W, 256, mode)
        mask = np.zeros(shape, bool)
        mask[H // 3 : H // 2, W // 4 : W // 2] = True
        m = geom.mask_to_model(mask)
        assert m.shape == (256, 256) and m.dtype == bool
        ys, xs = np.nonzero(m)
        box = geom.boxes_to_model(np.array([W // 4, H // 3, W // 2, H // 2], float))
        # the mask resized nearest fills the scaled box to within one model pixel
        assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1
        assert abs(ys.min() - box[1]) <= 1 and abs(ys.max() + 1 - box[3]) <= 1
        pt = geom.points_to_model(torch.tensor([[W // 4, H // 3]], dtype=torch.float32))
        torch.testing.assert_close(pt, torch.tensor(box[None, :2], dtype=torch.float32))
        # logits in model space -> original size recovers the mask
        logits = torch.from_numpy(np.where(m, 10.0, -10.0))[None, None].float()
        back = geom.logits_to_original(logits)[0, 0] > 0
        assert back.shape == shape
        iou = (back.numpy() & mask).sum() / (back.numpy() | mask).sum()
        assert iou > (0.999 if shape == (90, 60) else 0.95)


def test_geometry_maps_integer_coordinates():
    """Pixel coordinates often come as integers: they map like floats, in torch as in numpy."""
    geom = data.geometry(512, 384, 256, "stretch")  # scale (2/3, 1/2)
    xy, box = [[96, 200]], [[30, 40, 333, 511]]
    want_xy = np.array(xy) * np.array([256 / 384, 256 / 512])
    want_box = np.array(box) * np.array([256 / 384, 256 / 512] * 2)
    for make in (np.array, torch.tensor):
        got_xy = geom.points_to_model(make(xy))
        got_box = geom.boxes_to_model(make(box))
        np.testing.assert_allclose(np.asarray(got_xy, np.float64), want_xy, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got_box, np.float64), want_box, rtol=1e-6)


def test_geometry_pad_is_centred_and_exact():
    geom = data.geometry(90, 61, 256, "stretch")
    assert geom.pad == ((256 - 61) // 2, (256 - 90) // 2) and geom.scale == (1.0, 1.0)
    mask = np.random.default_rng(5).random((90, 61)) > 0.5
    m = geom.mask_to_model(torch.from_numpy(mask))
    assert torch.is_tensor(m) and int(m.sum()) == mask.sum()
    logits = torch.where(m, 1.0, -1.0)[None, None]  # (1, 1, 256, 256)
    back = geom.logits_to_original(logits)
    assert back.shape == (1, 1, 90, 61)
    np.testing.assert_array_equal((back[0, 0] > 0).numpy(), mask)


# ----------------------------------------------------------------------------------------------
# Connected components and prompts


def flood_fill_components(mask):
    """Reference: 8-connected components by breadth-first search, numbered in scan order."""
    H, W = mask.shape
    lab = np.zeros((H, W), int)
    k = 0
    for y in range(H):
        for x in range(W):
            if mask[y, x] and not lab[y, x]:
                k += 1
                lab[y, x] = k
                todo = deque([(y, x)])
                while todo:
                    cy, cx = todo.popleft()
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not lab[ny, nx]:
                                lab[ny, nx] = k
                                todo.append((ny, nx))
    return lab


def test_label_components_matches_flood_fill():
    rng = np.random.default_rng(6)
    masks = rng.random((4, 37, 53)) > np.array([0.3, 0.5, 0.6, 0.8])[:, None, None]
    masks[3] = False
    lab = data.label_components(torch.from_numpy(masks)).numpy()
    offset = 0
    for p in range(4):
        ref = flood_fill_components(masks[p])
        got = np.where(lab[p] > 0, lab[p] - offset, 0)
        np.testing.assert_array_equal(got, ref)
        offset += ref.max()
    spiral = np.zeros((41, 41), bool)  # one long snake: many hops for naive propagation
    spiral[::4, 1:-1] = True
    spiral[1::8, -2] = spiral[2::8, -2] = spiral[3::8, -2] = True
    spiral[5::8, 1] = spiral[6::8, 1] = spiral[7::8, 1] = True
    assert data.label_components(torch.from_numpy(spiral)).max() == 1


def test_largest_component():
    m = np.zeros((2, 20, 20), bool)
    m[0, 0:3, 0:3] = True  # 9 px
    m[0, 10:14, 10:14] = True  # 16 px
    m[0, 18, 18] = True
    out = data.largest_component(m)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out[0], np.pad(np.ones((4, 4), bool), ((10, 6), (10, 6))))
    assert not out[1].any()
    tie = torch.zeros(1, 10, 10, dtype=torch.bool)
    tie[0, 6:8, 6:8] = tie[0, 0:2, 0:2] = True
    assert (
        data.largest_component(tie)[0, :2, :2].all()
        and not data.largest_component(tie)[0, 6:].any()
    )


def test_boxes_from_masks():
    m = torch.zeros(4, 30, 40, dtype=torch.bool)
    m[0, 5:9, 10:30] = True
    m[0, 20, 2] = True  # a stray pixel: the whole-mask box includes it
    m[1, 29, 39] = True  # one pixel touching the border
    m[3, :, :] = True
    box = data.boxes_from_masks(m)
    want = [[2, 5, 30, 21], [39, 29, 40, 30], [0, 0, 40, 30], [0, 0, 40, 30]]  # [2]: empty
    torch.testing.assert_close(box, torch.tensor(want, dtype=torch.float32))
    big = data.boxes_from_masks(m, largest_component=True)
    torch.testing.assert_close(big[0], torch.tensor([10.0, 5, 30, 9]))


def test_box_jitter_ours_bounds_and_seed():
    g = torch.Generator().manual_seed(0)
    m = torch.zeros(500, 64, 64, dtype=torch.bool)
    m[:250, 10:50, 0:64] = True  # w 64, h 40 -> m = 4
    m[250:, 0:3, 60:64] = True  # tiny at the corner -> m = 0
    ref = data.boxes_from_masks(m)
    a = data.boxes_from_masks(m, jitter=True, generator=g, jitter_rule="ours")
    b = data.boxes_from_masks(m, True, torch.Generator().manual_seed(0), jitter_rule="ours")
    torch.testing.assert_close(a, b)
    assert (a[:, 0] >= 0).all() and (a[:, 1] >= 0).all() and (a[:, 2] <= 64).all()
    assert (a[:, 3] <= 64).all() and (a[:, 2] > a[:, 0]).all() and (a[:, 3] > a[:, 1]).all()
    d = (a - ref)[:250]
    assert d.abs().max() == 4 and len(d.unique()) == 9  # every offset in [-4, 4] occurs
    torch.testing.assert_close(a[250:], ref[250:])


def official_jitter(boxes, generator):
    """utils.py:50-65 read literally, box after box: M = min(5, int(min(w, h) * 0.1 * 5));
    noise_x = randint(-M, M) then noise_y (high exclusive); randint(0, 0) raises inside the
    try: no shift and no draw. The draws come from `generator` one by one (floor(u * 2M) - M
    is randint's rule on a uniform u)."""
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        M = min(5, int(min(x1 - x0, y1 - y0) * 0.1 * 5))
        nx = ny = 0
        if M:
            u = [torch.rand((), generator=generator, dtype=torch.float64).item() for _ in "xy"]
            nx, ny = (int(np.floor(v * 2 * M)) - M for v in u)
        out.append([x0 + nx, y0 + ny, x1 + nx, y1 + ny])
    return torch.tensor(out, dtype=torch.float32)


def test_box_jitter_official_rule():
    # M = min(5, int(side * 0.5)) for the smaller side, by hand: sides 1..12
    want_M = {1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 5, 12: 5}
    m = torch.zeros(12 * 60, 40, 40, dtype=torch.bool)
    for side in range(1, 13):
        m[(side - 1) * 60 : side * 60, 0:side, 30 - side : 30] = True  # at the top border
    m[65, 39, 0] = True  # a second, smaller component: the box is the largest one's
    tight = data.boxes_from_masks(m, largest_component=True)
    assert tight[65].tolist() == [28, 0, 30, 2] and data.boxes_from_masks(m)[65, 3] == 40
    got = data.boxes_from_masks(m, True, torch.Generator().manual_seed(4), largest_component=True)
    torch.testing.assert_close(got, official_jitter(tight, torch.Generator().manual_seed(4)))
    d = (got - tight).view(12, 60, 4)
    assert torch.equal(d[..., 0], d[..., 2]) and torch.equal(d[..., 1], d[..., 3])  # whole box
    for side, M in want_M.items():
        offsets = set(d[side - 1, :, :2].flatten().tolist())
        assert offsets == set(range(-M, M)) if M else offsets == {0.0}, side
    assert (got[:, 1] < 0).any()  # no clamping: a box at the border may leave the image
    # nothing is drawn for M == 0: the generator is where it started
    g = torch.Generator().manual_seed(5)
    data.boxes_from_masks(m[:60], True, g)  # 1-px masks only
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(5).get_state())
    with pytest.raises(ValueError, match="jitter_rule"):
        data.boxes_from_masks(m, True, jitter_rule="paper")


def test_sample_points_regions_and_labels():
    g = torch.Generator().manual_seed(1)
    m = torch.zeros(3, 40, 50, dtype=torch.bool)
    m[0, 10:20, 10:30] = True
    m[2] = True  # no background
    coords, labels = data.sample_points(m, 5, g)
    assert coords.shape == (3, 5, 2) and labels.shape == (3, 5) and labels.dtype == torch.long
    x, y = coords[..., 0].long(), coords[..., 1].long()
    inside = m[torch.arange(3)[:, None], y, x]
    assert (inside == labels.bool()).all()  # every label tells the truth
    assert labels[0].sum() == 2  # the official mix: 5 // 2 foreground
    assert labels[1].sum() == 0 and labels[2].sum() == 5  # empty / full masks
    one, lab1 = data.sample_points(m, 1, g)
    assert lab1.tolist() == [[1], [0], [1]] and m[0, one[0, 0, 1].long(), one[0, 0, 0].long()]


def test_sample_points_one_shot_is_the_official_mix():
    """init_point_sampling(mask, n > 1): n // 2 foreground + n - n // 2 background, permuted."""
    m = torch.zeros(3000, 30, 30, dtype=torch.bool)
    m[:, 5:20, 5:20] = True
    for n, n_fg in [(2, 1), (3, 1), (5, 2), (9, 4)]:
        coords, labels = data.sample_points(m, n, torch.Generator().manual_seed(n))
        assert (labels.sum(1) == n_fg).all()
        frac = labels.float().mean(0)  # every slot holds a foreground point n_fg / n of the time
        assert (frac - n_fg / n).abs().max() < 0.05, (n, frac)


def test_sample_points_uniform_and_seeded():
    m = torch.zeros(1, 20, 20, dtype=torch.bool)
    m[0, 0:5, 0:4] = True  # 20 px
    m[0, 10:20, 10:16] = True  # 60 px: should get 3/4 of the points
    mm = m.expand(4000, 20, 20)
    c1, _ = data.sample_points(mm, 1, torch.Generator().manual_seed(7))
    c2, _ = data.sample_points(mm, 1, torch.Generator().manual_seed(7))
    torch.testing.assert_close(c1, c2)
    frac = (c1[:, 0, 1] >= 10).float().mean().item()
    assert abs(frac - 0.75) < 0.03
    # every foreground pixel is reachable
    assert len({(int(a), int(b)) for a, b in c1[:, 0].tolist()}) == 80


def test_error_clicks():
    g = torch.Generator().manual_seed(2)
    gt = torch.zeros(4, 30, 30, dtype=torch.bool)
    gt[:, 5:15, 5:15] = True
    pred = gt.clone()
    pred[0, 5:15, 10:15] = False  # false negatives only
    pred[1, 20:25, 20:25] = True  # false positives only
    gt[3] = False  # [2] and [3]: perfect predictions (non-empty and empty targets)
    pred[3] = False
    coords, labels = data.error_clicks(pred, gt, 6, g, no_error="confirm")
    x, y = coords[..., 0].long(), coords[..., 1].long()
    rows = torch.arange(4)[:, None]
    assert (labels[0] == 1).all() and (~pred[rows, y, x][0]).all() and gt[rows, y, x][0].all()
    assert (labels[1] == 0).all() and pred[rows, y, x][1].all() and (~gt[rows, y, x][1]).all()
    assert (labels[2] == 1).all() and gt[rows, y, x][2].all()
    assert (labels[3] == 0).all()
    again = data.error_clicks(pred, gt, 6, torch.Generator().manual_seed(2), no_error="confirm")
    torch.testing.assert_close(again[0], coords)
    # the official default: masks without error pixels get n not-a-point entries (-1 at 0, 0)
    pad_xy, pad = data.error_clicks(pred, gt, 6, torch.Generator().manual_seed(2))
    assert pad[2:].eq(-1).all() and pad_xy[2:].eq(0).all()
    torch.testing.assert_close(pad_xy[:2], coords[:2])
    torch.testing.assert_close(pad[:2], labels[:2])
    with pytest.raises(ValueError, match="no_error"):
        data.error_clicks(pred, gt, 1, no_error="skip")


# ----------------------------------------------------------------------------------------------
# Manifests and datasets


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    make_volumes(root)
    prepare.run(volume_cfg(root, root / "out", axes=("x", "z"), instances=True, min_area=0.0))
    return root / "out"


def test_read_manifest_official_layouts(built, tmp_path, monkeypatch):
    ours = data.read_manifest(built, "train")
    # the official data_demo layout: paths include the dataset folder, relative to its parent
    demo = tmp_path / "data_demo"
    demo.mkdir()
    official = {f"data_demo/{k}": [f"data_demo/{m}" for m in ms]
                for k, ms in read_json(built / "image2label_train.json").items()}  # fmt: skip
    for rel in [*official, *(m for ms in official.values() for m in ms)]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((built / rel.split("/", 1)[1]).read_bytes())
    (demo / "image2label_train.json").write_text(json.dumps(official))
    inverse = {m: k for k, ms in official.items() for m in ms}
    (demo / "label2image_test.json").write_text(json.dumps(inverse))
    monkeypatch.chdir(tmp_path / "data_demo" / "images")  # not the working directory's job
    train = data.read_manifest(demo, "train")
    test = data.read_manifest(demo, "test")
    assert train == test  # both directions read to the same image -> masks mapping
    assert [Path(k).name for k in train] == [Path(k).name for k in ours]
    assert all(Path(m).is_file() for ms in train.values() for m in ms)
    with pytest.raises(data.DataError, match="no image2label_val.json or label2image_val.json"):
        data.read_manifest(demo, "val")
    (demo / "label2image_test.json").write_text(json.dumps({"data_demo/masks/x.png": "nope.png"}))
    with pytest.raises(data.DataError, match="nope.png"):
        data.read_manifest(demo, "test")
    (demo / "label2image_test.json").write_text("{not json")
    with pytest.raises(ValueError, match="label2image_test.json: not valid JSON"):
        data.read_manifest(demo, "test")


def test_train_dataset(built):
    cfg = SamConfig.from_name("tiny", channel_order="BGR")
    ds = data.TrainDataset(built, cfg, 3, 3, seed=1, mask_sampling="without", box_rule="ours")
    manifest = data.read_manifest(built, "train")
    assert len(ds) == len(manifest)
    many = next(i for i, (_, ms) in enumerate(ds.items) if len(ms) >= 3)
    few = next(i for i, (_, ms) in enumerate(ds.items) if len(ms) == 1)
    threads = torch.get_num_threads()
    item = ds[many]
    assert torch.get_num_threads() == threads  # one thread inside __getitem__, then restored
    assert set(item) == {"image", "masks", "boxes", "point_coords", "point_labels", "index"}
    assert item["image"].shape == (3, 256, 256) and item["masks"].shape == (3, 256, 256)
    assert item["boxes"].shape == (3, 4) and item["point_coords"].shape == (3, 3, 2)
    assert item["point_labels"].dtype == torch.long
    # without replacement: three different masks; the image's own preprocess
    assert len({tuple(m.flatten().tolist()) for m in item["masks"]}) == 3
    x, _ = data.preprocess(data.read_image(ds.items[many][0]), cfg)
    torch.testing.assert_close(item["image"], x[0])
    # prompts sit where they should, boxes around the masks (jitter <= 5 px)
    m = item["masks"].bool()
    xy = item["point_coords"].long()
    inside = m[torch.arange(3)[:, None], xy[..., 1], xy[..., 0]]
    assert (inside == item["point_labels"].bool()).all()
    assert (item["boxes"] - data.boxes_from_masks(m)).abs().max() <= 5
    # seeded: the same item twice, another epoch differs
    again = ds[many]
    for k in item:
        torch.testing.assert_close(item[k], again[k])
    ds.set_epoch(1)
    fresh = data.TrainDataset(built, cfg, 3, 3, seed=1, mask_sampling="without", box_rule="ours")
    assert not torch.equal(ds[many]["point_coords"], fresh[many]["point_coords"])
    one = ds[few]
    assert (one["masks"] == one["masks"][0]).all()  # one mask, repeated to M


def test_test_dataset(built):
    cfg = SamConfig.from_name("tiny")
    ds = data.TestDataset(built, cfg, split="train")
    manifest = data.read_manifest(built, "train")
    assert len(ds) == sum(len(ms) for ms in manifest.values())
    item = ds[0]
    mask_path = next(iter(manifest.values()))[0]
    assert item["mask_path"] == mask_path
    orig = data.read_mask(mask_path)
    np.testing.assert_array_equal(item["original_mask"].numpy(), orig)
    assert tuple(item["original_size"].tolist()) == orig.shape
    torch.testing.assert_close(item["mask"], item["geometry"].mask_to_model(torch.from_numpy(orig)))
    assert item["image"].shape == (3, 256, 256)


def test_train_dataset_official_defaults(tmp_path):
    """Defaults = DataLoader.py:153-163: masks drawn with replacement; the box is the largest
    component's, shifted whole by the official jitter."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((256, 256), 90, np.uint8)).save(tmp_path / "images/a.png")
    shapes = [(40, 60, 100, 130), (10, 20, 30, 40), (150, 200, 150, 180)]  # y0, y1, x0, x1
    for k, (y0, y1, x0, x1) in enumerate(shapes):
        m = np.zeros((256, 256), np.uint8)
        m[y0:y1, x0:x1] = 255
        m[250:253, 0:3] = 255  # a small second component far away
        Image.fromarray(m).save(tmp_path / f"masks/m{k}.png")
    manifest = {"images/a.png": [f"masks/m{k}.png" for k in range(3)]}
    (tmp_path / "image2label_train.json").write_text(json.dumps(manifest))
    cfg = SamConfig.from_name("tiny", channel_order="BGR")
    ds = data.TrainDataset(tmp_path, cfg, masks_per_image=2)
    without = data.TrainDataset(tmp_path, cfg, masks_per_image=2, mask_sampling="without")
    dups = 0
    for epoch in range(15):
        ds.set_epoch(epoch)
        without.set_epoch(epoch)
        item = ds[0]
        masks = item["masks"].bool()
        dups += torch.equal(masks[0], masks[1])
        assert not torch.equal(without[0]["masks"][0], without[0]["masks"][1])
        for mask, box in zip(masks, item["boxes"], strict=True):
            k = next(k for k, (y0, y1, x0, x1) in enumerate(shapes) if mask[y0, x0])
            y0, y1, x0, x1 = shapes[k]
            M = min(5, min(y1 - y0, x1 - x0) // 2)
            dx, dy = box[0].item() - x0, box[1].item() - y0
            assert box.tolist() == [x0 + dx, y0 + dy, x1 + dx, y1 + dy]  # largest, whole shift
            assert -M <= dx <= M - 1 and -M <= dy <= M - 1
    assert 1 <= dups <= 12  # 5 of 15 expected with replacement, none without
    with pytest.raises(ValueError, match="mask_sampling"):
        data.TrainDataset(tmp_path, cfg, mask_sampling="maybe")
