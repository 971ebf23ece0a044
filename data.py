"""Data for SAM-Med2D: reading medical images, one `preprocess` for every stage, prompt sampling,
SA-Med2D-20M manifests and datasets, and the preprocessing CLI that turns 3D NIfTI volumes and 2D
image folders into training data.

    python data.py volumes --images imagesTr --labels labelsTr --out out --modality mr_t1 \
        --dataset MNI152 --axes z --workers 2
    python data.py images --images img_dir --labels mask_dir --out out --modality xray --dataset X

Conventions (DESIGN.md): coordinates are (x, y) pixels, boxes x0, y0, x1, y1; point labels 1
foreground, 0 background, -1 padding; masks on disk are 0/255 PNGs, in memory bool tensors.
The channel order, pixel statistics, image size and resize mode come from the model config
(`model.SamConfig`); this file reads them with `cfg.<field>` and never repeats them.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Config of the preprocessing CLI (the model's config holds everything about the network input)


@dataclass
class DataConfig:
    kind: str = "volumes"  # "volumes" (3D NIfTI + label volumes) or "images" (2D files + masks)
    images: str = ""  # folder of input images / volumes
    labels: str = ""  # folder of label volumes / masks, matched to images by file name
    out: str = "sa_med2d_out"  # output root in the SA-Med2D-20M layout
    modality: str = "mr"  # first name field, e.g. ct, mr_t1, xray
    dataset: str = "dataset"  # second name field
    axes: tuple[str, ...] = ("x", "y", "z")  # volumes: slice axes (x sagittal, y coronal, z axial)
    window: str | tuple | None = None  # CT preset or (level, width); None: percentiles
    instances: bool = False  # split every label into connected components (instance masks)
    min_area: float = 0.00153  # the paper's filter: masks below 0.153% of the image are dropped
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test fractions, by case
    seed: int = 0  # seed of the case-level split
    case_pattern: str = ""  # 2D: regex on the file stem whose group 1 is the case (patient) id
    workers: int = 1  # processes; 1 runs in this process
    shard: tuple[int, int] = (0, 1)  # (i, n): this run handles cases i, i+n, i+2n, ... (0-based)
    skip_bad: bool = False  # continue past bad inputs and list them at the end


# CT window presets: name -> (level, width) in Hounsfield units
WINDOWS = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


class DataError(ValueError):
    """A bad input file; the message starts with the file's path and says what is wrong."""


# ----------------------------------------------------------------------------------------------
# Reading 2D images and masks


def _load_pil(path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        im = Image.open(path)
        im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    if getattr(im, "n_frames", 1) > 1:
        raise DataError(f"{path}: multi-frame image ({im.n_frames} frames); convert to NIfTI")
    return im


def _to_uint8(a: np.ndarray, path) -> np.ndarray:
    """16-bit or float pixels -> uint8: kept if already within 0..255, else min-max scaled."""
    if not np.isfinite(a).all():
        raise DataError(f"{path}: image contains NaN or inf pixels")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 255 and np.issubdtype(a.dtype, np.integer):
        return a.astype(np.uint8)
    return _scale_to_uint8(a.astype(np.float64), lo, hi)


def read_image(path) -> np.ndarray:
    """PNG/JPEG/BMP/TIFF, 8/16 bit or float, grey or colour -> (H, W, 3) uint8 RGB."""
    im = _load_pil(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = _to_uint8(np.asarray(im), path)  # (H, W)
    elif im.mode == "L":
        a = np.asarray(im)  # (H, W)
    else:  # RGB, RGBA, P, LA, CMYK, 1, ...: Pillow converts; alpha is dropped
        a = np.asarray(im.convert("RGB"))  # (H, W, 3)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)  # (H, W, 3)
    return np.ascontiguousarray(a)


def read_label_map(path) -> np.ndarray:
    """A mask or label map file -> (H, W) int64 of non-negative integer labels."""
    im = _load_pil(path)
    if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
        rgb = np.asarray(im.convert("RGB"))  # (H, W, 3)
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
            raise DataError(f"{path}: colour mask (channels differ); masks must be grey labels")
        a = rgb[..., 0]
    elif im.mode in ("LA", "PA"):
        a = np.asarray(im)[..., 0]  # P keeps its palette indices: they are the labels
    else:
        a = np.asarray(im)
    _check_labels(a, path)
    return a.astype(np.int64)


def _check_labels(a: np.ndarray, path) -> None:
    """Labels (a 2D mask file or a label volume) must be finite non-negative integers."""
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise DataError(f"{path}: labels contain NaN or inf")
        frac = a != np.round(a)
        if frac.any():
            raise DataError(f"{path}: non-integer labels (e.g. {a[frac][0]:g})")
    if a.size and a.min() < 0:
        raise DataError(f"{path}: negative label {a.min():g}")


def _is_binary(labels: np.ndarray) -> bool:
    """0/1 or 0/255 (an all-zero mask included): the two ways a binary mask is stored."""
    hi = int(labels.max()) if labels.size else 0
    return hi in (0, 1, 255) and bool(((labels == 0) | (labels == hi)).all())


def read_mask(path) -> np.ndarray:
    """A binary mask file (0/1 or 0/255) -> (H, W) bool; anything else is an error."""
    a = read_label_map(path)
    if not _is_binary(a):
        vals = np.unique(a)[:8].tolist()
        raise DataError(f"{path}: mask values {vals} are not binary (0/1 or 0/255)")
    return a > 0


# ----------------------------------------------------------------------------------------------
# Reading volumes and intensity normalisation


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
    level, width = window
    return level - width / 2, level + width / 2


def normalize_intensity(data: np.ndarray, window=None) -> np.ndarray:
    """Voxels -> uint8: clip to intensity_range(data, window) and scale to 0..255. A CT window
    for CT; None (MR and everything else) uses the 0.5-99.5 percentiles of the non-zero voxels."""
    return _scale_to_uint8(data, *intensity_range(data, window))


def _scale_to_uint8(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.where(data > lo, 255, 0).astype(np.uint8)
    scaled = (np.clip(data, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.round(scaled).astype(np.uint8)


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
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, (h, w), mode="nearest")
        out = x.new_zeros(*x.shape[:2], S, S)  # (B, C, S, S)
        out[..., top : top + h, left : left + w] = x
        return out


def _like(a, values):
    """`values` as a float array of a's kind (torch on a's device, or numpy) to broadcast against
    a; float, so that integer pixel coordinates are scaled, not truncated."""
    if torch.is_tensor(a):
        return torch.tensor(
            values, dtype=torch.promote_types(a.dtype, torch.float32), device=a.device
        )
    return np.asarray(values, dtype=np.result_type(a, np.float32))


def geometry(height: int, width: int, size: int, resize_mode: str) -> Geometry:
    """The placement of an (H, W) image in the S x S input. "stretch" (SAM-Med2D): nearest resize
    to S x S ignoring aspect, or a centred zero pad when both sides are < S (the official
    `ori_h < S and ori_w < S`). "longest" (SAM): longest side to S, pad bottom/right."""
    H, W, S = height, width, size
    if resize_mode == "stretch":
        if H < S and W < S:
            return Geometry((H, W), S, "stretch", (1.0, 1.0), ((S - W) // 2, (S - H) // 2), (H, W))
        return Geometry((H, W), S, "stretch", (S / W, S / H), (0, 0), (S, S))
    if resize_mode == "longest":
        k = S / max(H, W)
        h, w = int(H * k + 0.5), int(W * k + 0.5)  # SAM's ResizeLongestSide rounding
        return Geometry((H, W), S, "longest", (w / W, h / H), (0, 0), (h, w))
    raise ValueError(f"resize_mode must be 'stretch' or 'longest', got {resize_mode!r}")


def preprocess(image: np.ndarray, cfg) -> tuple[torch.Tensor, Geometry]:
    """(H, W, 3) uint8 RGB -> x (1, 3, S, S) float32 in the model's channel order, and Geometry.

    SAM-Med2D ("stretch"): the official code reads BGR with OpenCV and subtracts SAM's RGB mean
    from those channels as they are, then resizes nearest (source pixel floor(dst * H / S), which
    is OpenCV's INTER_NEAREST and torch's mode="nearest"; Pillow's NEAREST samples pixel centres
    and differs) or pads centred with zeros after normalising. With cfg.channel_order "BGR" we
    flip to BGR and then apply cfg.pixel_mean/std position by position, exactly like that.
    SAM ("longest"): bilinear resize of the 8-bit image, normalise, pad bottom/right.
    MedSAM / LiteMedSAM (cfg.intensity "min_max"): the same resize, then each image scaled to
    [0, 1] by its own min and max instead of mean/std, then the pad."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"preprocess expects (H, W, 3) uint8, got {image.dtype} {image.shape}")
    H, W = image.shape[:2]
    geom = geometry(H, W, cfg.image_size, cfg.resize_mode)
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
# Connected components (vectorised union-find; no scipy, no per-pixel Python loops)


def label_components(masks: torch.Tensor) -> torch.Tensor:
    """(..., H, W) bool -> (..., H, W) int64: 8-connected components within each (H, W) plane,
    numbered 1, 2, ... over the whole batch in scan order of their first pixel; 0 = background.

    Every foreground pixel starts as its own tree. Each round hooks the larger of two adjacent
    roots under the smaller (scatter-min), then pointer jumping flattens the trees. Roots are the
    smallest pixel index of their component; every root with a different neighbour merges in
    each round, so the rounds grow like log(N), not like the component's diameter."""
    shape, (H, W) = masks.shape, masks.shape[-2:]
    flat = masks.reshape(-1).bool()  # (B*H*W,)
    fg = flat.nonzero().squeeze(1)  # (N,)
    ids = torch.full(flat.shape, -1, dtype=torch.long, device=masks.device)
    ids[fg] = torch.arange(fg.numel(), device=masks.device)
    g = ids.view(-1, H, W)  # (B, H, W) compact pixel ids, -1 background
    pairs = [
        (g[:, :, :-1], g[:, :, 1:]),  # right neighbour
        (g[:, :-1, :], g[:, 1:, :]),  # down
        (g[:, :-1, :-1], g[:, 1:, 1:]),  # down-right
        (g[:, :-1, 1:], g[:, 1:, :-1]),  # down-left
    ]
    a = torch.cat([p.reshape(-1) for p, _ in pairs])  # (E,)
    b = torch.cat([q.reshape(-1) for _, q in pairs])  # (E,)
    keep = (a >= 0) & (b >= 0)
    a, b = a[keep], b[keep]
    parent = torch.arange(fg.numel(), device=masks.device)  # (N,)
    while True:
        pa, pb = parent[a], parent[b]
        diff = pa != pb
        if not bool(diff.any()):
            break
        lo, hi = torch.minimum(pa[diff], pb[diff]), torch.maximum(pa[diff], pb[diff])
        parent.scatter_reduce_(0, hi, lo, reduce="amin")  # hook roots
        while True:  # pointer jumping until every pixel points at its root
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parent = grand
    out = torch.zeros(flat.shape, dtype=torch.long, device=masks.device)
    if fg.numel():
        out[fg] = torch.unique(parent, return_inverse=True)[1] + 1
    return out.view(shape)


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


def boxes_from_masks(masks, jitter=False, generator=None, largest_component=False):
    """(P, H, W) bool -> (P, 4) float32 boxes x0, y0, x1, y1 with x1, y1 exclusive (one past the
    last pixel, as skimage's regionprops bbox in the official code). An empty mask gets the whole
    image. `largest_component`: box of the largest component (the official test protocol).
    `jitter`: each coordinate moves by an integer in [-m, m], m = min(0.1 * min(w, h), 5) px
    (the issue's rule), then the box is clamped to the image and kept at least 1 px wide. The
    official training code differs: it shifts the whole box (x0, x1 by one offset, y0, y1 by
    another) by up to min(5, int(0.5 * min(w, h))) px, and boxes the largest component."""
    if largest_component:
        masks = _largest(masks)
    P, H, W = masks.shape
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (P, W), (P, H)
    ar_w = torch.arange(W, device=masks.device)
    ar_h = torch.arange(H, device=masks.device)
    x0 = torch.where(cols, ar_w, W).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    y0 = torch.where(rows, ar_h, H).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    empty = ~cols.any(1)
    box = torch.stack([x0, y0, x1, y1], 1).float()  # (P, 4)
    box[empty] = torch.tensor([0.0, 0.0, W, H], device=masks.device)
    if jitter:
        side = torch.minimum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])  # (P,)
        m = torch.clamp(torch.floor(0.1 * side), max=5.0)[:, None]  # (P, 1)
        u = torch.rand(P, 4, generator=generator, device=masks.device)  # (P, 4)
        box = box + torch.floor(u * (2 * m + 1)) - m
        x0 = box[:, 0].clamp(0, W - 1)
        y0 = box[:, 1].clamp(0, H - 1)
        x1 = torch.maximum(box[:, 2], x0 + 1).clamp(max=W)
        y1 = torch.maximum(box[:, 3], y0 + 1).clamp(max=H)
        box = torch.stack([x0, y0, x1, y1], 1)  # (P, 4)
    return box


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
    n > 1: the official mix, n // 2 foreground and the rest background, in random order; when a
    mask has no foreground (or no background) those points come from the other region instead,
    labelled truthfully."""
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


def error_clicks(pred, gt, n: int, generator=None):
    """Iterative-training clicks. pred, gt (P, H, W) bool -> coords (P, n, 2), labels (P, n).
    Points are uniform over the error region: a false negative gives a positive click (1), a
    false positive a negative click (0). A perfect prediction gets a point that confirms it: a
    foreground point labelled 1, or a background point labelled 0 when the target is empty."""
    P, H, W = gt.shape
    g = gt.reshape(P, H * W).bool()  # (P, HW)
    err = pred.reshape(P, H * W).bool() ^ g  # (P, HW)
    perfect = ~err.any(1, keepdim=True)  # (P, 1)
    confirm = torch.where(g.any(1, keepdim=True), g, ~g)  # (P, HW)
    region = torch.where(perfect, confirm, err)  # (P, HW)
    idx = _sample_in(region, n, generator)  # (P, n)
    return _xy(idx, W), g.gather(1, idx).long()


# ----------------------------------------------------------------------------------------------
# Manifests (ours and the official SA-Med2D-20M json files) and datasets


def atomic_write(path, write) -> None:
    """write(tmp) into a hidden temp file beside `path`, then rename: readers never see half a file,
    and a killed run leaves the previous file (or none). The temp name ends with the target's
    suffixes, so writers that pick the format from the name (nibabel's .nii.gz) work. Every stage
    writes through this one function."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{''.join(path.suffixes)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj, indent=1) -> None:
    text = json.dumps(obj, indent=indent, default=float)  # default: numpy scalars
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def write_png(path, a: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(a).save(tmp, format="PNG"))


def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from e


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
        manifest, pairs = i2l, _load_json(i2l)
        ok = isinstance(pairs, dict) and all(isinstance(v, list) for v in pairs.values())
    elif l2i.is_file():
        manifest, raw = l2i, _load_json(l2i)
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
    """A sample's tensors are small: torch's intra-op threads only add synchronisation, and on a
    busy machine that made __getitem__ 10x slower (measured, README). DataLoader workers run on
    one thread already; this gives the main process (num_workers=0) the same, for the call.
    Used as a decorator on the datasets' __getitem__."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _item_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _read_mask_of(path, geom: Geometry) -> torch.Tensor:
    """A dataset mask -> (H, W) bool, checked against the size of its image."""
    m = torch.from_numpy(read_mask(path))  # (H, W)
    if tuple(m.shape) != geom.original:
        raise DataError(
            f"{path}: mask shape {tuple(m.shape)} differs from its image's {geom.original}"
        )
    return m


class TrainDataset(torch.utils.data.Dataset):
    """A training sample: one image and M of its masks (without replacement when it has M, else
    all of them plus repeats), with prompts sampled in model space as the official code does.

    Item keys: image (3, S, S) float32 normalised; masks (M, S, S) float32 0/1; boxes (M, 4)
    float32 (jittered if `jitter`); point_coords (M, n, 2) float32 x, y; point_labels (M, n)
    int64; index () int64. Each item draws from its own generator seeded by (seed, epoch, index),
    so samples repeat exactly whatever the DataLoader workers; call set_epoch for fresh draws."""

    def __init__(self, root, cfg, masks_per_image=5, points=1, jitter=True, seed=0, split="train"):
        self.cfg, self.M, self.points = cfg, masks_per_image, points
        self.jitter, self.seed = jitter, seed
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
        pick = torch.randperm(n, generator=g)[: self.M]
        if n < self.M:  # every mask once, then repeats
            pick = torch.cat([pick, torch.randint(n, (self.M - n,), generator=g)])
        x, geom = preprocess(read_image(image_path), self.cfg)  # (1, 3, S, S)
        masks = [geom.mask_to_model(_read_mask_of(mask_paths[i], geom)) for i in pick]
        masks = torch.stack(masks)  # (M, S, S)
        boxes = boxes_from_masks(masks, jitter=self.jitter, generator=g)  # (M, 4)
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
        mask = _read_mask_of(mask_path, geom)  # (H, W)
        return dict(
            image=x[0], mask=geom.mask_to_model(mask), original_mask=mask,
            original_size=torch.tensor(geom.original), index=torch.tensor(index),
            geometry=geom, image_path=image_path, mask_path=mask_path,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The preprocessing CLI: NIfTI volumes or 2D folders -> the SA-Med2D-20M layout
#
#   OUT/images/{modality}--{dataset}--{case}--{axis}_{slice:04d}.png     8-bit grey (or RGB 2D)
#   OUT/masks/{image name}--label_{label}_{instance:03d}.png             0/255
#   OUT/image2label_{split}.json, OUT/label2image_{split}.json           split: train, val, test
#   OUT/cases/{case}.json   what one case produced; written last, so it marks the case complete
#
# Work is split into units (a case's axis, in parts when several workers share one volume); a
# case's record is written once all its units are done. Every file goes through atomic_write.

VOLUME_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


@dataclass
class Case:
    name: str  # the case field of the output names
    pairs: list  # [(image path, label path)]: one volume pair, or the 2D images of a patient
    error: str = ""  # a problem found while pairing files


def _clean(s: str) -> str:
    """A name field: only [A-Za-z0-9_.-], never the '--' separator."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", s)
    while "--" in s:
        s = s.replace("--", "-")
    return s or "_"


def _stem(path: Path) -> str:
    low = path.name.lower()
    suffix = next((s for s in VOLUME_SUFFIXES + IMAGE_SUFFIXES if low.endswith(s)), "")
    return path.name[: len(path.name) - len(suffix)]


def _list_files(folder: Path, suffixes) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    ok = lambda p: p.is_file() and p.name.lower().endswith(suffixes) and p.name[0] != "."
    return sorted(p for p in folder.iterdir() if ok(p))


def find_cases(cfg: DataConfig) -> list[Case]:
    """Pair every image with its label file (the same name; for volumes nnU-Net's `_0000`
    channel suffix may be dropped) and group files into cases (a volume; for 2D the case_pattern
    group, or the image itself)."""
    suffixes = VOLUME_SUFFIXES if cfg.kind == "volumes" else IMAGE_SUFFIXES
    labels: dict[str, list[Path]] = {}
    for p in _list_files(Path(cfg.labels), suffixes):
        labels.setdefault(_stem(p), []).append(p)
    cases: dict[str, Case] = {}
    for f in _list_files(Path(cfg.images), suffixes):
        stem = _stem(f)
        key = stem[:-5] if stem not in labels and stem.endswith("_0000") else stem
        case_id, error = key if cfg.kind == "volumes" else stem, ""
        if cfg.kind == "images" and cfg.case_pattern:
            match = re.search(cfg.case_pattern, stem)
            case_id = match.group(1) if match else stem
            error = "" if match else f"{f}: case pattern {cfg.case_pattern!r} does not match"
        found = labels.get(key, [])
        if len(found) != 1:
            error = error or f"{f}: {len(found) or 'no'} label files named {key}.* in {cfg.labels}"
        case = cases.setdefault(_clean(case_id), Case(_clean(case_id), []))
        case.pairs.append((f, found[0] if found else None))
        if cfg.kind == "volumes" and len(case.pairs) > 1:
            error = f"{f}: case name {case.name} is also used by {case.pairs[0][0]}"
        case.error = case.error or error
    used = {lab for c in cases.values() for _, lab in c.pairs}
    unused = sorted(str(p) for ps in labels.values() for p in ps if p not in used)
    if unused:  # not an error, but never silent
        print(f"{len(unused)} label files have no image: {', '.join(unused)}")
    return [cases[k] for k in sorted(cases)]


def split_cases(names, fractions, seed: int) -> dict[str, str]:
    """Case -> train/val/test: a seeded shuffle of the sorted names, cut by the fractions. Split by
    case (volume or patient), never by slice, so no patient is on both sides."""
    names = sorted(names)
    f = np.asarray(fractions, float) / sum(fractions)
    n_train = int(round(f[0] * len(names)))
    n_val = min(int(round(f[1] * len(names))), len(names) - n_train)
    order = np.random.default_rng(seed).permutation(len(names))
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(names) - n_train - n_val)
    return {names[i]: s for i, s in zip(order, split, strict=True)}


def volume_slice(volume: np.ndarray, axis: str, k: int) -> np.ndarray:
    """Slice k along "x" (sagittal), "y" (coronal) or "z" (axial) of a canonical RAS+ volume (as
    read_volume gives it) -> (H, W) in the radiological view of the dataset slices: rows run
    anterior/superior -> posterior/inferior, columns patient right -> left (sagittal: anterior ->
    posterior)."""
    s = volume[(slice(None),) * "xyz".index(axis) + (k,)]  # RAS order, a view of the volume
    return np.ascontiguousarray(s[::-1, ::-1].T)  # (H, W)


def _slice_masks(lab: np.ndarray, cfg: DataConfig) -> list[tuple[int, int, np.ndarray]]:
    """(H, W) integer labels -> [(label, instance, mask)] that pass the area filter: a mask is
    dropped when its area is below cfg.min_area of the image (the paper's 0.153%)."""
    min_px = cfg.min_area * lab.size
    out = []
    for label in np.unique(lab[lab > 0]).tolist():
        m = lab == label
        parts = _instances(m) if cfg.instances else [m]
        keep = [p for p in parts if p.sum() >= min_px]
        out += [(label, k, p) for k, p in enumerate(keep)]
    return out


def _instances(m: np.ndarray) -> list[np.ndarray]:
    """A binary mask -> its connected components, largest first (ties in scan order)."""
    lab = label_components(torch.from_numpy(m)).numpy()
    sizes = np.bincount(lab.ravel())[1:]
    order = np.lexsort((np.arange(len(sizes)), -sizes))
    return [lab == k + 1 for k in order]


def _image_name(cfg: DataConfig, case: Case, slice_id: str) -> str:
    return f"{_clean(cfg.modality)}--{_clean(cfg.dataset)}--{case.name}--{slice_id}"


def _write_slice(out: Path, name: str, image: np.ndarray, masks) -> tuple[str, list[str]]:
    image_rel = f"images/{name}.png"
    write_png(out / image_rel, image)
    mask_rels = []
    for label, k, m in masks:
        mask_rels.append(f"masks/{name}--label_{label}_{k:03d}.png")
        write_png(out / mask_rels[-1], m.astype(np.uint8) * 255)
    return image_rel, mask_rels


@functools.lru_cache(maxsize=1)  # per process: the last case read, shared by that case's units
def _read_case_volume(image_path: Path, label_path: Path, window):
    """-> (uint8 image volume, int32 label volume, a note on the normalisation), checked."""
    vol, lab = read_volume(image_path), read_volume(label_path)
    if vol.data.shape != lab.data.shape:
        raise DataError(
            f"{label_path}: shape {lab.data.shape} does not match image {image_path} "
            f"{vol.data.shape}"
        )
    if not np.allclose(vol.affine, lab.affine, atol=1e-3):
        d = np.abs(vol.affine - lab.affine).max()
        raise DataError(f"{label_path}: affine differs from image {image_path}'s (by {d:.3g})")
    _check_labels(lab.data, label_path)
    lo, hi = intensity_range(vol.data, window)
    how = "percentiles 0.5-99.5 of non-zero voxels" if window is None else "CT window"
    name = f" {window}" if isinstance(window, str) else ""
    note = f"intensity {how}{name} -> [{lo:g}, {hi:g}] mapped to 0-255"
    return _scale_to_uint8(vol.data, lo, hi), lab.data.astype(np.int32), note


def _volume_unit(case: Case, cfg: DataConfig, axis: str, part: int, parts: int):
    image, labels, note = _read_case_volume(*case.pairs[0], cfg.window)
    ax = "xyz".index(axis)
    ks = np.array_split(np.arange(labels.shape[ax]), parts)[part]
    entries = []
    for k in ks:
        lab = volume_slice(labels, axis, k)  # (H, W)
        masks = _slice_masks(lab, cfg) if lab.any() else []
        if masks:
            name = _image_name(cfg, case, f"{axis}_{k:04d}")
            img = volume_slice(image, axis, k)
            entries.append(_write_slice(Path(cfg.out), name, img, masks))
    return entries, f"{case.name}: {note}"


def _images_unit(case: Case, cfg: DataConfig):
    """2D: every image of the case with its mask or label map (0/1 and 0/255 are one label, 1)."""
    entries, names = [], set()
    for image_path, mask_path in case.pairs:
        image, lab = read_image(image_path), read_label_map(mask_path)  # (H, W, 3), (H, W)
        if lab.shape != image.shape[:2]:
            raise DataError(
                f"{mask_path}: mask shape {lab.shape} does not match image {image_path} "
                f"{image.shape[:2]}"
            )
        if _is_binary(lab):
            lab = (lab > 0).astype(np.int64)
        name = _image_name(cfg, case, _clean(_stem(image_path)))
        if name in names:
            raise DataError(f"{image_path}: output name {name} is already used in case {case.name}")
        names.add(name)
        masks = _slice_masks(lab, cfg)
        grey = (image[..., :1] == image).all()
        if masks:
            entries.append(
                _write_slice(Path(cfg.out), name, image[..., 0] if grey else image, masks)
            )
    note = f"{case.name}: {len(case.pairs)} 2D images (8-bit kept; 16-bit/float scaled min-max)"
    return entries, note


def _run_unit(cfg: DataConfig, case: Case, axis: str, part: int, parts: int):
    """-> the unit's (entries, note), or the DataError it met: returned rather than raised, so
    that results come back from a pool worker and from this process alike."""
    try:
        if cfg.kind == "volumes":
            return _volume_unit(case, cfg, axis, part, parts)
        return _images_unit(case, cfg)
    except DataError as e:
        return e


def _units(cases: list[Case], cfg: DataConfig) -> list[tuple]:
    if cfg.kind == "images":
        return [(c, "2d", 0, 1) for c in cases]
    parts = 1 if cfg.workers == 1 else 2 * cfg.workers  # several workers can share one volume
    return [(c, axis, k, parts) for c in cases for axis in cfg.axes for k in range(parts)]


def _unit_results(units, cfg: DataConfig):
    """Yield (unit index, result or DataError) as units finish: in this process for one worker,
    else in a process pool (forked, like DataLoader workers; single-threaded CPU torch only)."""
    if cfg.workers == 1:
        for j, u in enumerate(units):
            yield j, _run_unit(cfg, *u)
        return
    fork = "fork" in multiprocessing.get_all_start_methods()
    if fork and cfg.kind == "volumes" and len({id(u[0]) for u in units}) == 1:
        try:  # one volume: read it once here; forked workers share it instead of each reading it
            _read_case_volume(*units[0][0].pairs[0], cfg.window)
        except DataError:
            pass  # every unit meets the same error and reports it
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    pool = ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=torch.set_num_threads,
                               initargs=(1,))  # fmt: skip
    try:
        futures = {pool.submit(_run_unit, cfg, *u): j for j, u in enumerate(units)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _fingerprint(cfg: DataConfig, case: Case) -> dict:
    """What a case's outputs depend on; a rerun with other options must not mix results."""
    return dict(
        kind=cfg.kind, modality=cfg.modality, dataset=cfg.dataset, axes=list(cfg.axes),
        window=cfg.window if not isinstance(cfg.window, tuple) else list(cfg.window),
        instances=cfg.instances, min_area=cfg.min_area,
        sources=[[str(a.name), str(b.name)] for a, b in case.pairs],
    )  # fmt: skip


def _is_complete(out: Path, case: Case, cfg: DataConfig) -> bool:
    path = out / "cases" / f"{case.name}.json"
    if not path.is_file():
        return False
    record = _load_json(path)
    if record.get("fingerprint") != _fingerprint(cfg, case):
        raise DataError(f"{path}: made with other options or inputs; use a new --out")
    return all((out / f).is_file() for img, ms in record["images"] for f in [img, *ms])


def _process(cases: list[Case], cfg: DataConfig, out: Path) -> tuple[int, dict[str, str]]:
    """Run every unit of `cases`; write each case's record when its last unit is done.
    -> (number of slices written, {case: error} for bad cases when skipping them)."""
    _read_case_volume.cache_clear()  # inputs may have changed since an earlier run
    try:
        return _process_units(_units(cases, cfg), cases, cfg, out)
    finally:
        _read_case_volume.cache_clear()  # a big CT should not stay in memory after the run


def _process_units(units, cases, cfg: DataConfig, out: Path) -> tuple[int, dict[str, str]]:
    done: dict[str, dict] = {c.name: {} for c in cases}  # case -> {unit index: (entries, note)}
    need = {c.name: sum(u[0].name == c.name for u in units) for c in cases}
    bad, n_slices = {}, 0
    bar = tqdm(total=len(units), unit="part", desc="preprocess", dynamic_ncols=True)
    for j, res in _unit_results(units, cfg):
        bar.update(1)
        case = units[j][0]
        if isinstance(res, DataError):
            if not cfg.skip_bad:
                bar.close()
                raise res
            bad.setdefault(case.name, str(res))
            continue
        done[case.name][j] = res
        if len(done[case.name]) == need[case.name] and case.name not in bad:
            parts = [res for _, res in sorted(done.pop(case.name).items())]
            images = [[img, ms] for entries, _ in parts for img, ms in entries]
            note = f"{parts[0][1]}; {len(images)} slices"
            record = dict(case=case.name, fingerprint=_fingerprint(cfg, case), note=note,
                          images=images)  # fmt: skip
            write_json(out / "cases" / f"{case.name}.json", record)
            n_slices += len(images)
            bar.write(note)
    bar.close()
    return n_slices, bad


def write_manifests(out: Path, cases: list[Case], splits: dict[str, str]) -> int:
    """Both manifest directions for every split, from the records of the completed cases.
    -> the number of cases without a record (bad, or left to other shards)."""
    i2l: dict[str, dict] = {s: {} for s in SPLITS}
    missing = 0
    for case in cases:
        path = out / "cases" / f"{case.name}.json"
        if not path.is_file():
            missing += 1
            continue
        for img, masks in _load_json(path)["images"]:
            i2l[splits[case.name]][img] = masks
    for s in SPLITS:
        write_json(out / f"image2label_{s}.json", i2l[s])
        write_json(out / f"label2image_{s}.json", {m: i for i, ms in i2l[s].items() for m in ms})
    return missing


def _check(cfg: DataConfig) -> None:
    if cfg.kind not in ("volumes", "images"):
        raise ValueError(f"kind must be 'volumes' or 'images', got {cfg.kind!r}")
    if not cfg.axes or not set(cfg.axes) <= {"x", "y", "z"}:
        raise ValueError(f"axes must be some of x, y, z; got {cfg.axes}")
    i, n = cfg.shard
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
    if len(cfg.split) != 3 or min(cfg.split) < 0 or sum(cfg.split) <= 0:
        raise ValueError(f"split must be three non-negative fractions, got {cfg.split}")
    intensity_range(np.zeros(1), cfg.window)  # an unknown preset fails here, before any work
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, got {cfg.workers}")


def run(cfg: DataConfig) -> dict:
    """Preprocess cfg.images/cfg.labels into cfg.out; returns a summary."""
    _check(cfg)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    cases = find_cases(cfg)
    if not cases:
        raise DataError(f"{cfg.images}: no {cfg.kind} found")
    splits = split_cases([c.name for c in cases], cfg.split, cfg.seed)
    i, n = cfg.shard
    mine = cases[i::n]
    for d in ("images", "masks", "cases"):
        (out / d).mkdir(parents=True, exist_ok=True)
    if n == 1:  # alone on this output: leftovers of a killed run can go
        for tmp in [*out.glob(".*.tmp*"), *out.glob("*/.*.tmp*")]:
            tmp.unlink(missing_ok=True)
    bad = {c.name: c.error for c in mine if c.error}
    if bad and not cfg.skip_bad:
        raise DataError(next(iter(bad.values())))
    todo = [c for c in mine if not c.error and not _is_complete(out, c, cfg)]
    print(f"{len(mine)} cases in shard {i}/{n}: {len(mine) - len(todo) - len(bad)} complete, "
          f"{len(todo)} to do, {len(bad)} bad")  # fmt: skip
    n_slices, more_bad = _process(todo, cfg, out)
    bad.update(more_bad)
    missing = write_manifests(out, cases, splits)
    seconds = time.perf_counter() - t0
    print(f"{n_slices} slices in {seconds:.1f} s; manifests cover {len(cases) - missing} of "
          f"{len(cases)} cases")  # fmt: skip
    if bad:
        print(f"skipped {len(bad)} bad cases:")
        for msg in bad.values():
            print(f"  {msg}")
    return dict(slices=n_slices, seconds=seconds, skipped=sorted(bad.values()), missing=missing)


def main(args) -> dict:
    """The CLI entry point: argparse namespace (field names of DataConfig) -> run."""
    values = {f.name: getattr(args, f.name) for f in fields(DataConfig) if hasattr(args, f.name)}
    window = values.get("window")
    if window is not None and len(window) not in (1, 2):
        raise ValueError("--window takes a preset name or LEVEL WIDTH")
    if window is not None:
        values["window"] = window[0] if len(window) == 1 else (float(window[0]), float(window[1]))
    if isinstance(values.get("shard"), str):
        match = re.fullmatch(r"(\d+)/(\d+)", values["shard"])
        if not match:
            raise ValueError(f"--shard takes i/n, e.g. 0/4, got {values['shard']!r}")
        values["shard"] = (int(match.group(1)), int(match.group(2)))
    for key in ("axes", "split"):
        if key in values:
            values[key] = tuple(values[key])
    return run(DataConfig(**values))


if __name__ == "__main__":
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Build SA-Med2D-20M style 2D data from 3D or 2D data")
    p.add_argument("kind", choices=["volumes", "images"], help="3D NIfTI volumes or 2D images")
    p.add_argument("--images", required=True, help="folder of images or volumes")
    p.add_argument("--labels", required=True, help="folder of masks/label volumes, same names")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument(
        "--modality", default=DataConfig.modality, help="name prefix, e.g. ct, mr_t1, xray"
    )
    p.add_argument("--dataset", default=DataConfig.dataset, help="dataset name in the file names")
    p.add_argument(
        "--axes",
        nargs="+",
        default=list(DataConfig.axes),
        choices=["x", "y", "z"],
        help="slice axes (x sagittal, y coronal, z axial); default all three",
    )
    p.add_argument(
        "--window",
        nargs="+",
        default=None,
        help=f"CT window: a preset ({', '.join(WINDOWS)}) or LEVEL WIDTH; "
        "default: 0.5-99.5 percentiles of non-zero voxels (MR and others)",
    )
    p.add_argument(
        "--instances",
        action=argparse.BooleanOptionalAction,
        default=DataConfig.instances,
        help="split each label into connected components",
    )
    p.add_argument(
        "--min-area",
        dest="min_area",
        type=float,
        default=DataConfig.min_area,
        help="drop masks below this fraction of the image (paper: 0.00153)",
    )
    p.add_argument(
        "--split",
        nargs=3,
        type=float,
        default=list(DataConfig.split),
        metavar=("TRAIN", "VAL", "TEST"),
        help="case fractions",
    )
    p.add_argument("--seed", type=int, default=DataConfig.seed, help="seed of the case split")
    p.add_argument(
        "--case-pattern",
        dest="case_pattern",
        default="",
        help="2D: regex on the file name whose group 1 is the patient id",
    )
    p.add_argument("--workers", type=int, default=DataConfig.workers, help="processes")
    p.add_argument("--shard", default="0/1", help="i/n: this job's share of the cases, 0-based")
    p.add_argument(
        "--skip-bad",
        dest="skip_bad",
        action=argparse.BooleanOptionalAction,
        default=DataConfig.skip_bad,
        help="skip bad inputs and list them at the end",
    )
    try:
        main(p.parse_args())
    except ValueError as e:  # DataError (a bad input file) included
        sys.exit(f"error: {e}")
