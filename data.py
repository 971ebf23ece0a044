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

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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
    window: str | tuple[float, float] | None = (
        None  # CT preset or (level, width); None: percentiles
    )
    instances: bool = False  # split every label into connected components (instance masks)
    min_area: float = 0.00153  # the paper's filter: drop masks below this fraction of the image
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test fractions, by case
    seed: int = 0  # seed of the case-level split
    case_pattern: str = ""  # 2D: regex on the file stem whose group 1 is the case (patient) id
    workers: int = 1  # processes; 1 runs in this process
    shard: tuple[int, int] = (0, 1)  # (i, n): this run handles cases i, i+n, i+2n, ... (0-based)
    skip_bad: bool = False  # continue past bad inputs and list them at the end


MIN_AREA_FRACTION = 0.00153  # SAM-Med2D paper: masks below 0.153% of the image are dropped

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
        if getattr(im, "n_frames", 1) > 1:
            raise DataError(f"{path}: multi-frame image ({im.n_frames} frames); convert to NIfTI")
        im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    return im


def _to_uint8(a: np.ndarray, path) -> np.ndarray:
    """16-bit or float pixels -> uint8: kept if already within 0..255, else min-max scaled."""
    if not np.isfinite(a).all():
        raise DataError(f"{path}: image contains NaN or inf pixels")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 255 and np.issubdtype(a.dtype, np.integer):
        return a.astype(np.uint8)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((a.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


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
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise DataError(f"{path}: mask contains NaN or inf")
        if not (a == np.round(a)).all():
            raise DataError(f"{path}: non-integer mask values (e.g. {a[a != np.round(a)][0]})")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise DataError(f"{path}: negative mask value {a.min()}")
    return a


def read_mask(path) -> np.ndarray:
    """A binary mask file (0/1 or 0/255) -> (H, W) bool; anything else is an error."""
    a = read_label_map(path)
    hi = int(a.max()) if a.size else 0
    if hi not in (0, 1, 255) or not ((a == 0) | (a == hi)).all():
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


def normalize_intensity(data: np.ndarray, window=None) -> np.ndarray:
    """Voxels -> uint8. `window`: a WINDOWS name or (level, width) for CT; None clips to the
    0.5-99.5 percentiles of the non-zero voxels (MR and everything else) and scales to 0..255."""
    if window is None:
        nz = data[data != 0]
        if nz.size == 0:
            return np.zeros(data.shape, np.uint8)
        lo, hi = (float(v) for v in np.percentile(nz, (0.5, 99.5)))
    else:
        level, width = WINDOWS[window] if isinstance(window, str) else window
        lo, hi = level - width / 2, level + width / 2
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
        m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
        m = self._place(m[None, None].float(), "nearest")[0, 0] > 0.5  # (S, S)
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

    def _place(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, S, S): resize to the content size, zero-pad around it."""
        (h, w), (left, top), S = self.content, self.pad, self.size
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, (h, w), mode=mode, antialias=mode == "bilinear")
        out = x.new_zeros(*x.shape[:2], S, S)  # (B, C, S, S)
        out[..., top : top + h, left : left + w] = x
        return out


def _like(a, values):
    return (
        torch.tensor(values, dtype=a.dtype, device=a.device)
        if torch.is_tensor(a)
        else (np.asarray(values, dtype=np.result_type(a, np.float32)))
    )


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
    SAM ("longest"): bilinear resize of the 8-bit image, normalise, pad bottom/right."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"preprocess expects (H, W, 3) uint8, got {image.dtype} {image.shape}")
    H, W = image.shape[:2]
    geom = geometry(H, W, cfg.image_size, cfg.resize_mode)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()  # (1,3,H,W)
    if cfg.channel_order == "BGR":
        x = x.flip(1)
    elif cfg.channel_order != "RGB":
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {cfg.channel_order!r}")
    if geom.resize_mode == "longest" and geom.content != (H, W):
        x = F.interpolate(x, geom.content, mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)  # SAM resizes the 8-bit image
    mean = torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.pixel_std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - mean) / std  # (1, 3, h, w)
    return geom._place(x, "nearest"), geom  # (1, 3, S, S)


# ----------------------------------------------------------------------------------------------
# Connected components (vectorised union-find; no scipy, no per-pixel Python loops)


def label_components(masks: torch.Tensor) -> torch.Tensor:
    """(..., H, W) bool -> (..., H, W) int64: 8-connected components within each (H, W) plane,
    numbered 1, 2, ... over the whole batch in scan order of their first pixel; 0 = background.

    Every foreground pixel starts as its own tree. Each round hooks the larger of two adjacent
    roots under the smaller (scatter-min), then pointer jumping flattens the trees. Roots are the
    smallest pixel index of their component, and the number of roots at least halves per round."""
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
    t = torch.as_tensor(mask).bool() if not torch.is_tensor(mask) else mask.bool()
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
    (SAM-Med2D training), then the box is clamped to the image and kept at least 1 px wide."""
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
    pixels. Rows without any True pixel give index 0; the caller handles them."""
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
