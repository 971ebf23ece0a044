"""Data for SAM-Med2D: from a medical image file to the network input, and the prompts and
datasets that training and evaluation draw from it.

    image file (PNG/JPEG/BMP/TIFF, 8/16-bit, grey/colour) --read_image--> (H, W, 3) uint8 RGB
    NIfTI file --read_volume--> (X, Y, Z) float32, RAS+ --normalize_intensity--> uint8 volume
               --volume_slice--> (H, W), the radiological view of the dataset slices
    (H, W, 3) uint8 --preprocess--> x (1, 3, S, S) normalised, and its Geometry, which maps
        points, boxes and masks into the S x S model space and low-res logits back to (H, W)
    mask file --read_mask--> (H, W) bool --Geometry.mask_to_model--> (S, S) bool
    masks (P, S, S) bool --label_components, largest_component--> 8-connected components
        --boxes_from_masks, sample_points, error_clicks--> prompts (P, 4); (P, n, 2) + (P, n)
    image2label_{split}.json --read_manifest--> {image: [masks]}
        --TrainDataset--> image + M masks + prompts; --TestDataset--> image + one mask

prepare.py builds SA-Med2D-20M style datasets; `python data.py volumes|images ...` runs it.

Conventions (DESIGN.md): coordinates are (x, y) pixels, boxes x0, y0, x1, y1; point labels 1
foreground, 0 background, -1 padding; masks on disk are 0/255 PNGs, in memory bool tensors.
The channel order, pixel statistics, image size and resize mode come from the model config
(`model.SamConfig`); this file reads them with `cfg.<field>` and never repeats them.
"""

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from components import label_components
from files import DataError, is_binary, open_image, read_json, read_label_map

# CT window presets: name -> (level, width) in Hounsfield units
WINDOWS = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


# ----------------------------------------------------------------------------------------------
# Reading images and volumes, intensity normalisation


def read_image(path) -> np.ndarray:
    """PNG/JPEG/BMP/TIFF, 8/16 bit or float, grey or colour -> (H, W, 3) uint8 RGB. 16-bit and
    float pixels already within 0..255 integers are kept, others are scaled min-max."""
    im = open_image(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16-bit or float
        a = np.asarray(im)  # (H, W)
        if not np.isfinite(a).all():
            raise DataError(f"{path}: image contains NaN or inf pixels")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 255 or not np.issubdtype(a.dtype, np.integer):  # else kept as it is
            a = scale_to_uint8(a.astype(np.float64), lo, hi)  # min-max
        a = a.astype(np.uint8)
    elif im.mode == "L":
        a = np.asarray(im)  # (H, W)
    else:  # RGB, RGBA, P, LA, CMYK, 1, ...: Pillow converts; alpha is dropped
        a = np.asarray(im.convert("RGB"))  # (H, W, 3)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)  # (H, W, 3)
    return np.ascontiguousarray(a)


@dataclass
class Volume:
    data: np.ndarray  # (X, Y, Z) float32 in canonical RAS+ voxel order
    affine: np.ndarray  # (4, 4) voxel -> world (mm) of the canonical data
    header: object  # the file's nibabel header
    path: Path


def read_volume(path) -> Volume:
    """A NIfTI file -> Volume, reoriented to the closest canonical (RAS+) axes so that slices are
    never flipped or transposed, whatever the scanner stored. NaN/inf voxels are an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = img.get_fdata(dtype=np.float32)  # (X, Y, Z) or (X, Y, Z, 1)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        raise DataError(f"{path}: cannot read NIfTI volume ({type(e).__name__}: {e})") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]  # (X, Y, Z)
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    bad = int((~np.isfinite(data)).sum())
    if bad:
        raise DataError(f"{path}: {bad} NaN/inf voxels")
    return Volume(data, img.affine, img.header, path)


def intensity_range(data: np.ndarray, window=None) -> tuple[float, float]:
    """The (lo, hi) that normalize_intensity maps to 0 and 255: a CT window (a WINDOWS name or
    (level, width)), or, for None, the 0.5-99.5 percentiles of the non-zero voxels."""
    if window is None:
        nz = data[data != 0]
        if nz.size == 0:
            return 0.0, 0.0
        lo, hi = np.percentile(nz, (0.5, 99.5))
        return float(lo), float(hi)
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"unknown CT window {window!r}; presets: {', '.join(WINDOWS)}")
        window = WINDOWS[window]
    level, width = (float(v) for v in window)
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        raise ValueError(f"CT window needs a finite LEVEL and a WIDTH > 0, got {level:g} {width:g}")
    return level - width / 2, level + width / 2


def normalize_intensity(data: np.ndarray, window=None) -> np.ndarray:
    """Voxels -> uint8: clip to intensity_range(data, window) and scale to 0..255. A CT window
    for CT; None (MR and everything else) uses the 0.5-99.5 percentiles of the non-zero voxels."""
    return scale_to_uint8(data, *intensity_range(data, window))


def scale_to_uint8(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to [lo, hi] and map it linearly onto 0..255 (hi <= lo: 255 above lo, else 0)."""
    if hi <= lo:
        return np.where(data > lo, 255, 0).astype(np.uint8)
    scaled = (np.clip(data, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.round(scaled).astype(np.uint8)


AXES = {"x": 0, "y": 1, "z": 2}  # slice axes of a canonical RAS+ volume: sagittal, coronal, axial


def slice_index(axis: str, k: int) -> tuple:
    """The index of slice k along `axis` in a canonical volume: volume[slice_index("z", 5)]."""
    return (slice(None),) * AXES[axis] + (k,)


def volume_slice(volume: np.ndarray, axis: str, k: int) -> np.ndarray:
    """Slice k along "x" (sagittal), "y" (coronal) or "z" (axial) of a canonical RAS+ volume (as
    read_volume gives it) -> (H, W) in the radiological view of the dataset slices: rows run
    anterior/superior -> posterior/inferior, columns patient right -> left (sagittal: anterior ->
    posterior)."""
    s = volume[slice_index(axis, k)]  # RAS order, a view of the volume
    return np.ascontiguousarray(s[::-1, ::-1].T)  # (H, W)


def slice_to_voxels(image: np.ndarray) -> np.ndarray:
    """The inverse of volume_slice's view: an (H, W) slice image -> that slice's voxel order."""
    return image.T[::-1, ::-1]


def put_slice(volume: np.ndarray, axis: str, k: int, image: np.ndarray) -> None:
    """The inverse of volume_slice: write an (H, W) slice image back as slice k."""
    volume[slice_index(axis, k)] = slice_to_voxels(image)


# ----------------------------------------------------------------------------------------------
# preprocess: the one mapping from an image to the network input, and back


@dataclass
class Geometry:
    """Where an (H, W) image sits inside the S x S model input: model = original * scale + pad."""

    original: tuple[int, int]  # (H, W) of the input image
    size: int  # S
    resize_mode: str  # "stretch" (SAM-Med2D) or "longest" (SAM / MedSAM)
    scale: tuple[float, float]  # (sx, sy)
    pad: tuple[int, int]  # (left, top) zero padding in model pixels
    content: tuple[int, int]  # (h, w) of the image region inside the S x S input
    nearest: str = "cv2"  # nearest-resize index rule: "cv2" (official) or "torch"

    def points_to_model(self, xy):
        """(..., 2) x, y in original pixels -> model pixels (same array type)."""
        return xy * _like(xy, self.scale) + _like(xy, self.pad)

    def boxes_to_model(self, boxes):
        """(..., 4) x0, y0, x1, y1 in original pixels -> model pixels (same array type)."""
        return boxes * _like(boxes, self.scale * 2) + _like(boxes, self.pad * 2)

    def mask_to_model(self, mask):
        """(H, W) bool/0-1 mask -> (S, S) bool, resized nearest like the image (same array type)."""
        m = self._place(torch.as_tensor(mask)[None, None].float())[0, 0] > 0.5  # (S, S)
        return m if torch.is_tensor(mask) else m.numpy()

    def logits_to_original(self, logits: torch.Tensor) -> torch.Tensor:
        """(P, K, h, w) low-res logits -> (P, K, H, W): upsample to S, crop the padding, resize
        to the original size (bilinear), as the official postprocessing does."""
        S, (h, w), (left, top) = self.size, self.content, self.pad
        x = F.interpolate(logits.float(), (S, S), mode="bilinear", align_corners=False)
        x = x[..., top : top + h, left : left + w]  # (P, K, h, w)
        if (h, w) != self.original:
            x = F.interpolate(x, self.original, mode="bilinear", align_corners=False)
        return x  # (P, K, H, W)

    def _place(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, S, S): nearest resize to the content size (a no-op when x has
        it already), zero-pad around it."""
        (h, w), (left, top), S = self.content, self.pad, self.size
        if (h, w) != tuple(x.shape[-2:]) and self.nearest == "torch":
            x = F.interpolate(x, (h, w), mode="nearest")
        elif (h, w) != tuple(x.shape[-2:]):  # a gather: the same pixels for image and mask
            rows = torch.from_numpy(nearest_indices(x.shape[-2], h)).to(x.device)  # (h,)
            cols = torch.from_numpy(nearest_indices(x.shape[-1], w)).to(x.device)  # (w,)
            x = x.index_select(-2, rows).index_select(-1, cols)  # (B, C, h, w)
        out = x.new_zeros(*x.shape[:2], S, S)  # (B, C, S, S)
        out[..., top : top + h, left : left + w] = x
        return out


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """OpenCV's INTER_NEAREST source index for each of `dst` output pixels along an axis of
    `src` pixels (resize.cpp, resizeNN), exactly: torch's mode="nearest" picks another pixel for
    some sizes (docs/data.md, "OpenCV's nearest rule, exactly")."""
    ifx = 1.0 / (dst / src)  # Python floats are doubles, as in OpenCV
    return np.minimum(np.floor(np.arange(dst, dtype=np.float64) * ifx), src - 1).astype(np.int64)


def _like(a, values):
    """`values` as a float array of a's kind (torch on a's device, or numpy) to broadcast against
    a; float, so that integer pixel coordinates are scaled, not truncated."""
    if torch.is_tensor(a):
        return torch.tensor(
            values, dtype=torch.promote_types(a.dtype, torch.float32), device=a.device
        )
    return np.asarray(values, dtype=np.result_type(a, np.float32))


def geometry(height: int, width: int, size: int, resize_mode: str, nearest="cv2") -> Geometry:
    """The placement of an (H, W) image in the S x S input. "stretch" (SAM-Med2D): nearest resize
    to S x S ignoring aspect, or a centred zero pad when both sides are < S (the official
    `ori_h < S and ori_w < S`). "longest" (SAM): longest side to S, pad bottom/right.
    `nearest`: the index rule of nearest resizing, "cv2" (the official code's OpenCV) or "torch"."""
    H, W, S = height, width, size
    if nearest not in ("cv2", "torch"):
        raise ValueError(f"nearest must be 'cv2' or 'torch', got {nearest!r}")
    if resize_mode == "stretch":
        if H < S and W < S:
            pad = ((S - W) // 2, (S - H) // 2)
            return Geometry((H, W), S, "stretch", (1.0, 1.0), pad, (H, W), nearest)
        return Geometry((H, W), S, "stretch", (S / W, S / H), (0, 0), (S, S), nearest)
    if resize_mode == "longest":
        k = S / max(H, W)
        h, w = int(H * k + 0.5), int(W * k + 0.5)  # SAM's ResizeLongestSide rounding
        return Geometry((H, W), S, "longest", (w / W, h / H), (0, 0), (h, w), nearest)
    raise ValueError(f"resize_mode must be 'stretch' or 'longest', got {resize_mode!r}")


def preprocess(image: np.ndarray, cfg, nearest="cv2") -> tuple[torch.Tensor, Geometry]:
    """(H, W, 3) uint8 RGB -> x (1, 3, S, S) float32 in the model's channel order, and Geometry.

    SAM-Med2D ("stretch"): the official code reads BGR with OpenCV, subtracts SAM's RGB mean from
    those channels as they are, then resizes with OpenCV's INTER_NEAREST (`nearest="torch"`: torch's
    rule) or pads centred with zeros. cfg.channel_order "BGR" reproduces that exactly.
    SAM ("longest"): bilinear resize of the 8-bit image, normalise, pad bottom/right.
    MedSAM / LiteMedSAM (cfg.intensity "min_max"): the same resize, then each image scaled to
    [0, 1] by its own min and max instead of mean/std, then the pad."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"preprocess expects (H, W, 3) uint8, got {image.dtype} {image.shape}")
    H, W = image.shape[:2]
    geom = geometry(H, W, cfg.image_size, cfg.resize_mode, nearest)
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]  # (1, 3, H, W), a copy
    if cfg.channel_order == "BGR":  # SamConfig checks that it is "RGB" or "BGR"
        x = x.flip(1)
    if geom.resize_mode == "longest" and geom.content != (H, W):
        x = F.interpolate(x, geom.content, mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)  # SAM resizes the 8-bit image
    if cfg.intensity == "min_max":  # MedSAM: per image, to [0, 1]
        x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)  # (1, 3, h, w)
    else:
        mean = torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg.pixel_std, dtype=torch.float32).view(1, 3, 1, 1)
        x = (x - mean) / std  # (1, 3, h, w)
    return geom._place(x), geom  # (1, 3, S, S)


# ----------------------------------------------------------------------------------------------
# Masks: files -> (H, W) bool, and the largest 8-connected component (components.py labels them)


def read_mask(path, shape=None, image=None) -> np.ndarray:
    """A binary mask file (0/1 or 0/255) -> (H, W) bool; anything else is an error, and so is a
    size other than `shape`, the (H, W) of its image (named by `image` in the message)."""
    a = read_label_map(path, shape, image)
    if not is_binary(a):
        vals = np.unique(a)[:8].tolist()
        raise DataError(f"{path}: mask values {vals} are not binary (0/1 or 0/255)")
    return a > 0


def largest_component(mask):
    """(..., H, W) bool -> the largest 8-connected component of each plane (ties: the first in
    scan order); empty planes stay empty. Accepts and returns numpy or torch."""
    t = torch.as_tensor(mask).bool()
    H, W = t.shape[-2:]
    lab = label_components(t).reshape(-1, H * W)  # (P, HW)
    sizes = torch.bincount(lab.reshape(-1))  # (K+1,)
    sizes[0] = 0
    size = sizes[lab]  # (P, HW) size of each pixel's component
    best = size.amax(dim=1, keepdim=True)  # (P, 1)
    big = lab.masked_fill(size != best, lab.numel() + 1)  # (P, HW)
    first = big.amin(dim=1, keepdim=True)  # (P, 1) the first largest label
    out = ((lab == first) & (lab > 0)).reshape(t.shape)
    return out if torch.is_tensor(mask) else out.numpy()


# ----------------------------------------------------------------------------------------------
# Prompt sampling (batched over P masks; the generator lives on the masks' device)


def boxes_from_masks(
    masks, jitter=False, generator=None, largest_component=False, jitter_rule="official"
):
    """(P, H, W) bool -> (P, 4) float32 boxes x0, y0, x1, y1 with x1, y1 exclusive (one past the
    last pixel, as skimage's regionprops bbox in the official code). An empty mask gets the whole
    image (the official code crashes). `largest_component`: box of the largest 8-connected
    component (the official rule, utils.py:28-38). `jitter` (training) by `jitter_rule`:
    "official" (utils.py:50-65), the whole box shifts by up to 5 px, unclamped; "ours", each
    coordinate, clamped to the image. The exact rules: docs/data.md, "Prompts"."""
    if jitter_rule not in ("official", "ours"):
        raise ValueError(f"jitter_rule must be 'official' or 'ours', got {jitter_rule!r}")
    if largest_component:
        masks = _largest(masks)
    P, H, W = masks.shape
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (P, W), (P, H)
    ar_w, ar_h = torch.arange(W, device=masks.device), torch.arange(H, device=masks.device)
    x0 = torch.where(cols, ar_w, W).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    y0 = torch.where(rows, ar_h, H).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    empty = ~cols.any(1)
    box = torch.stack([x0, y0, x1, y1], 1).float()  # (P, 4)
    box[empty] = torch.tensor([0.0, 0.0, W, H], device=masks.device)
    if not jitter:
        return box
    side = torch.minimum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]).double()  # (P,)
    if jitter_rule == "official":
        M = torch.clamp(torch.floor(side * 0.1 * 5), max=5.0)  # (P,) int(min(w,h)*0.1*5) capped
        move = M > 0  # official: randint(-0, 0) raises, caught -> no shift and no draw
        k, dev = int(move.sum()), masks.device
        u = torch.rand(k, 2, generator=generator, dtype=torch.float64, device=dev)  # (K, 2) dx, dy
        m = M[move, None]  # (K, 1)
        d = torch.minimum(torch.floor(u * 2 * m), 2 * m - 1) - m  # (K, 2) in [-M, M-1]
        shift = torch.zeros(P, 2, dtype=torch.float64, device=masks.device)
        shift[move] = d
        return box + shift.repeat(1, 2).float()  # (P, 4): x0, x1 by dx; y0, y1 by dy
    m = torch.clamp(torch.floor(0.1 * side), max=5.0).float()[:, None]  # (P, 1)
    u = torch.rand(P, 4, generator=generator, device=masks.device)  # (P, 4)
    box = box + torch.floor(u * (2 * m + 1)) - m
    lo = torch.minimum(box[:, :2].clamp(min=0), box.new_tensor([W - 1, H - 1]))  # (P, 2) x0, y0
    hi = torch.minimum(torch.maximum(box[:, 2:], lo + 1), box.new_tensor([W, H]))  # (P, 2) x1, y1
    return torch.cat([lo, hi], 1)  # (P, 4)


_largest = largest_component  # boxes_from_masks has an argument of the same name


def _sample_in(region: torch.Tensor, k: int, generator) -> torch.Tensor:
    """(P, HW) bool -> (P, k) flat indices drawn uniformly (with replacement) from each row's True
    pixels. Rows without any True pixel give a meaningless index; the caller avoids them."""
    cum = region.long().cumsum(1)  # (P, HW)
    count = cum[:, -1:]  # (P, 1)
    u = torch.rand(region.shape[0], k, generator=generator, device=region.device)  # (P, k)
    r = torch.floor(u * count).long().clamp(max=torch.clamp(count - 1, min=0))  # (P, k)
    idx = torch.searchsorted(cum, r + 1)  # (P, k): position of the (r+1)-th True
    return idx.clamp(max=region.shape[1] - 1)


def _xy(idx: torch.Tensor, W: int) -> torch.Tensor:
    return torch.stack([idx % W, idx // W], -1).float()  # (..., 2) x, y


def sample_points(masks, n: int, generator=None):
    """(P, H, W) bool -> coords (P, n, 2) float32 x, y; labels (P, n) int64.
    n == 1: one foreground point (a background point labelled 0 if the mask is empty).
    n > 1: the official one-shot rule (init_point_sampling, utils.py:147-158): n // 2 foreground
    and n - n // 2 background points, each uniform with replacement over its region, in random
    order. Where the official code crashes (a mask with no foreground or no background), those
    points come from the other region instead, labelled truthfully."""
    P, H, W = masks.shape
    fg = masks.reshape(P, H * W).bool()  # (P, HW)
    n_fg = 1 if n == 1 else n // 2
    want_fg = torch.zeros(P, n, dtype=torch.bool, device=masks.device)
    want_fg[:, :n_fg] = True
    if n > 1:  # random order of the fg/bg slots
        order = torch.rand(P, n, generator=generator, device=masks.device).argsort(1)
        want_fg = want_fg.gather(1, order)
    has_fg, has_bg = fg.any(1, keepdim=True), (~fg).any(1, keepdim=True)  # (P, 1)
    take_fg = (want_fg & has_fg) | ~has_bg  # (P, n)
    idx_fg = _sample_in(fg, n, generator)  # (P, n)
    idx_bg = _sample_in(~fg, n, generator)  # (P, n)
    idx = torch.where(take_fg, idx_fg, idx_bg)
    return _xy(idx, W), take_fg.long()


def error_clicks(pred, gt, n: int, generator=None, no_error="pad"):
    """Iterative clicks. pred, gt (P, H, W) bool -> coords (P, n, 2) float32, labels (P, n) int64.
    Points are uniform (with replacement) over the error region: a false negative gives a
    positive click (1), a false positive a negative click (0). A mask without error pixels gets,
    for no_error="pad" (official, utils.py:93-108), n not-a-point entries: label -1 at (0, 0);
    for "confirm", a point that confirms the prediction: a foreground point labelled 1, or a
    background point labelled 0 when the target is empty."""
    if no_error not in ("pad", "confirm"):
        raise ValueError(f"no_error must be 'pad' or 'confirm', got {no_error!r}")
    P, H, W = gt.shape
    g = gt.reshape(P, H * W).bool()  # (P, HW)
    err = pred.reshape(P, H * W).bool() ^ g  # (P, HW)
    perfect = ~err.any(1, keepdim=True)  # (P, 1)
    confirm = torch.where(g.any(1, keepdim=True), g, ~g)  # (P, HW)
    region = torch.where(perfect, confirm, err)  # (P, HW)
    idx = _sample_in(region, n, generator)  # (P, n)
    coords, labels = _xy(idx, W), g.gather(1, idx).long()  # (P, n, 2), (P, n)
    if no_error == "pad":
        coords = coords.masked_fill(perfect[..., None], 0.0)
        labels = labels.masked_fill(perfect, -1)
    return coords, labels


# ----------------------------------------------------------------------------------------------
# Manifests (ours and the official SA-Med2D-20M json files) and datasets


def _resolver(root: Path, sample: str, manifest: Path):
    """Manifest paths are relative to the dataset root (ours), or to the working directory or the
    root's parent (the official files, e.g. "data_demo/images/x.png"), or absolute. The first entry
    decides for all, so millions of entries cost no file-system calls."""
    for base in (root, Path.cwd(), root.parent):
        if (base / sample).exists():
            return lambda p: str(base / p)
    raise DataError(f"{manifest}: {sample!r} not found under {root}, {Path.cwd()} or {root.parent}")


def read_manifest(root, split: str = "train") -> dict[str, list[str]]:
    """image path -> its mask paths, from image2label_{split}.json, or else by inverting
    label2image_{split}.json (the official test file has only that direction)."""
    root = Path(root)
    i2l, l2i = root / f"image2label_{split}.json", root / f"label2image_{split}.json"
    if i2l.is_file():
        manifest, pairs = i2l, read_json(i2l)
        ok = isinstance(pairs, dict) and all(isinstance(v, list) for v in pairs.values())
    elif l2i.is_file():
        manifest, raw = l2i, read_json(l2i)
        ok = isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values())
        pairs = {}
        for mask, image in raw.items() if ok else ():
            pairs.setdefault(image, []).append(mask)
    else:
        raise DataError(f"{root}: no image2label_{split}.json or label2image_{split}.json")
    if not ok:
        raise DataError(f"{manifest}: not an image -> masks (or mask -> image) mapping")
    if not pairs:
        return {}
    resolve = _resolver(root, next(iter(pairs)), manifest)
    return {resolve(img): [resolve(m) for m in masks] for img, masks in pairs.items()}


@contextmanager
def _one_thread():
    """__getitem__ on one torch thread: a sample's tensors are small, and extra intra-op threads
    made it 10x slower on a busy machine (docs/data.md). DataLoader workers are single-threaded
    already; this gives the main process (num_workers=0) the same, for the call."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _item_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class TrainDataset(torch.utils.data.Dataset):
    """A training sample: one image and M of its masks, with prompts sampled in model space as the
    official code does (DataLoader.py:153-163). mask_sampling, box_rule: the official rules by
    default, ours as options (docs/data.md, "Prompts").
    Item keys: image (3, S, S) float32 normalised; masks (M, S, S) float32 0/1; boxes (M, 4)
    float32; point_coords (M, n, 2) float32 x, y; point_labels (M, n) int64; index () int64.
    Each item draws from its own generator seeded by (seed, epoch, index), so samples repeat
    exactly whatever the DataLoader workers; call set_epoch for fresh draws."""

    def __init__(self, root, cfg, masks_per_image=5, points=1, jitter=True, seed=0, split="train",
                 mask_sampling="with", box_rule="official"):  # fmt: skip
        if mask_sampling not in ("with", "without"):
            raise ValueError(f"mask_sampling must be 'with' or 'without', got {mask_sampling!r}")
        if box_rule not in ("official", "ours"):
            raise ValueError(f"box_rule must be 'official' or 'ours', got {box_rule!r}")
        self.cfg, self.M, self.points = cfg, masks_per_image, points
        self.jitter, self.seed = jitter, seed
        self.mask_sampling, self.box_rule = mask_sampling, box_rule
        self.items = [(img, ms) for img, ms in read_manifest(root, split).items() if ms]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    @_one_thread()
    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
        image_path, mask_paths = self.items[index]
        n = len(mask_paths)
        if self.mask_sampling == "with":
            pick = torch.randint(n, (self.M,), generator=g)  # (M,)
        else:
            pick = torch.randperm(n, generator=g)[: self.M]
            if n < self.M:  # every mask once, then repeats
                pick = torch.cat([pick, torch.randint(n, (self.M - n,), generator=g)])
        x, geom = preprocess(read_image(image_path), self.cfg)  # (1, 3, S, S)
        masks = [read_mask(mask_paths[i], geom.original, image_path) for i in pick]  # (H, W)
        masks = torch.stack([geom.mask_to_model(torch.from_numpy(m)) for m in masks])  # (M, S, S)
        largest = self.box_rule == "official"
        boxes = boxes_from_masks(masks, self.jitter, g, largest, self.box_rule)  # (M, 4)
        coords, labels = sample_points(masks, self.points, g)  # (M, n, 2), (M, n)
        return dict(
            image=x[0], masks=masks.float(), boxes=boxes, point_coords=coords,
            point_labels=labels, index=torch.tensor(index),
        )  # fmt: skip


class TestDataset(torch.utils.data.Dataset):
    """A test sample: one mask with its image (the official label2image_test.json protocol).

    Item keys: image (3, S, S) float32; mask (S, S) bool in model space (prompts are sampled from
    it, as the official test does); original_mask (H, W) bool for scoring at the original size;
    original_size (2,) int64; index () int64; geometry (Geometry), image_path and mask_path (str).
    Items differ in size: iterate the dataset itself, or a DataLoader with batch_size=None."""

    __test__ = False  # not a pytest class

    def __init__(self, root, cfg, split="test"):
        self.cfg = cfg
        self.pairs = [(m, img) for img, ms in read_manifest(root, split).items() for m in ms]
        self._last = (None, None, None)  # consecutive masks usually share their image

    def __len__(self) -> int:
        return len(self.pairs)

    @_one_thread()
    def __getitem__(self, index: int) -> dict:
        mask_path, image_path = self.pairs[index]
        if self._last[0] != image_path:
            image = read_image(image_path)
            self._last = (image_path, *preprocess(image, self.cfg))
        _, x, geom = self._last
        mask = torch.from_numpy(read_mask(mask_path, geom.original, image_path))  # (H, W)
        return dict(
            image=x[0], mask=geom.mask_to_model(mask), original_mask=mask,
            original_size=torch.tensor(geom.original), index=torch.tensor(index),
            geometry=geom, image_path=image_path, mask_path=mask_path,
        )  # fmt: skip


if __name__ == "__main__":  # the dataset-building command lives beside this file
    import prepare

    prepare.command()
