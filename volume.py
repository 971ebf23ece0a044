"""Volumes: the 2D model through a 3D volume. One box on one slice -> the structure on every slice
where it continues, each next slice prompted from the result on the slice before.

    key slice K, box B     --encode K, decode B-->              mask M_K (the reference)
    slice K+1              --box of M_K grown by `margin`-->    mask M_K+1   (and so on upward,
                             (+ a click at M_K's deepest           until the stop rule fires)
                             pixel with `click`; + sigmoid of
                             M_K's low-res logits if `mask_prompt`)
    then the same from K downward. An extra box on another slice (an anchor) replaces the
    propagated prompt there and restarts a stopped direction from it.

The defaults prompt with boxes only, as LiteMedSAM (and MedSAM) were trained and are run: on 13
structures of real CT and MR volumes (examples/real_volumes.py: organs at 3 mm, a heart at 3 mm,
tumours on 5 and 6.5 mm slices) that raised mean 3D Dice from 0.625 to 0.762 over this module's
earlier defaults. Those stay as TISSUE, for structures the model under-segments from their box
and whose grown boxes it fills with the tissue around them (MNI152's tissue classes, where they
give 0.460 / 0.614 / 0.823 and the boxes 0.315 / 0.417 / 0.527; docs/volume.md):

- two prompt streams per structure (`mask_stream`): the stream above finds where the structure
  ends (the stop rule watches its masks), a second stream gives the output masks. It decodes the
  seed box again with a click at its mask's deepest pixel, measures how far inside the seed box
  that mask ends on each side (side_gaps: how much the model under-segments this structure, on
  each side), prompts each next slice with its previous mask's box grown by those gaps and a
  click, and keeps of the three outputs the one most like its previous mask (decode_slice's
  `like`), not the highest predicted IoU;
- a click with each box (`click`), boxes capped at the seed's box grown by 5% (`box_cap`).

Options measured against those (slice_prompts): a box and click per piece of M_K where its pieces
lie apart (`per_component`), a click per piece (`clicks`), clicks spread over it
(`click_spread`), background clicks (`negative`); prompts carried over every `stride`-th slice;
each box moved on by a fraction of its last step (`extrapolate`: it follows an organ that widens,
but its gain on the 13 structures did not hold from other key slices or margins).

The stop rule ends a direction at the first slice whose mask has vanished (< `min_pixels`), or
holds other tissue than the seed's: the prompt stream's mask averaged over the image embedding
(mask_feature: what the encoder sees inside it) has a cosine below `stop_similarity` to the seed
mask's. When a structure ends, the model still finds a blob of about the same size in the box
(so its area says little), but that blob is other tissue, which the encoder tells apart.
Options: whose area fell below `stop_area` x the area on the last seed slice, or whose predicted
IoU fell below `stop_iou`, or whose area grew over `stop_growth` or fell below `stop_shrink` x
the previous slice's. That slice's mask is dropped. docs/volume.md has the measurements behind
the defaults.

The encoder runs at most once per slice: the structures of one call advance together, slice by
slice, upward then downward, and decode against the same embedding (SliceEncoder counts the
passes). Embeddings are kept only between the lowest and the highest key slice, which both sweeps
visit.

    seg = segment_volume(sam, u8, [Structure(box=[60, 50, 140, 170], key=90)], axis="z")
    seg.labels  # (X, Y, Z) uint8, structure i -> i + 1, in the volume's (canonical) voxel order
    seg.records[0]["first"], seg.records[0]["last"], seg.records[0]["stops"]

Coordinates are those of infer.py: (x, y) pixels of the slice as data.volume_slice shows it.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import infer
from components import label_components


@dataclass
class PropagateConfig:
    margin: float = 0.075  # the previous mask's box grows by this fraction of its size per side
    min_margin: float = 1.0  # ... and by at least this many pixels per side
    extrapolate: float = 0.0  # then each side moves on by this x its last step (slice to slice)
    mask_prompt: bool = False  # also prompt with sigmoid(previous slice's low-res logits)
    stop_area: float = 0.0  # stop below this fraction of the mask area on the last anchor slice
    stop_iou: float = 0.0  # stop where the predicted IoU falls below this
    min_pixels: int = 1  # a mask with fewer pixels has vanished: stop
    stop_growth: float | None = None  # stop where the area exceeds this x the previous slice's
    stop_shrink: float | None = None  # stop where the area falls below this x the previous slice's
    stop_similarity: float | None = 0.65  # stop below this cosine to the seed mask's features
    box_cap: float | None = None  # prompt boxes stay inside the seed's box grown by this fraction
    click: bool = False  # also a positive click at the previous mask's most interior pixel
    track: bool = False  # the box never grows: the previous box, cut to the mask's grown box
    clicks: int = 1  # with click: one at the deepest pixel of each of this many largest components
    click_min: float = 0.1  # ... of at least this fraction of the mask's area
    negative: int = 0  # negative clicks: the deepest pixels of the box outside the grown mask
    negative_gap: float = 0.1  # ... grown by this fraction of the box's size
    click_spread: bool = False  # the `clicks` spread over the deep pixels of the whole mask
    per_component: bool = False  # a box + click per component of the mask, decoded apart, united
    parts: int = 3  # ... for at most this many, the largest (>= click_min of the mask's area)
    split_fill: float | None = 0.9  # ... where their boxes cover < this x their hull (else one box)
    mask_stream: bool = False  # masks from a 2nd prompt stream: seed gaps, a click, most alike
    stream_margin: float = 0.0  # the mask stream's box: each side at least this x the mask's size
    edge_margin: float | None = None  # ... by this fraction instead on sides where it met its box
    stride: int = 1  # prompts carry over every stride-th slice; the slices between reuse them


# The defaults before boxes only, for structures a model under-segments from their box and whose
# grown boxes it fills with the tissue around them (MNI152's tissue classes with LiteMedSAM):
# PropagateConfig(**TISSUE), on the command line --mask-stream --click --margin 0.05 --box-cap 0.05
TISSUE = {"mask_stream": True, "click": True, "margin": 0.05, "box_cap": 0.05}


@dataclass
class Structure:
    """One structure to follow through the volume: a box on its key slice, optional anchors."""

    box: list  # [x0, y0, x1, y1] on slice `key`, in the slice image's pixels
    key: int  # the slice index along the axis
    anchors: dict = field(default_factory=dict)  # {slice: [x0, y0, x1, y1]}: boxes that re-anchor
    limits: tuple | None = None  # (first, last) slices it may reach (inclusive); None: the volume

    def __post_init__(self):  # numpy's integers (np.int64 from np.nonzero...) -> int
        whole = lambda k: int(k) if isinstance(k, np.integer) else k  # noqa: E731
        self.key, self.anchors = whole(self.key), {whole(k): b for k, b in self.anchors.items()}
        if self.limits is not None:
            self.limits = tuple(whole(k) for k in self.limits)


@dataclass
class VolumeSegmentation:
    labels: np.ndarray  # (X, Y, Z) ids, structure i -> i + 1, 0 background; overlaps: highest logit
    masks: np.ndarray  # (P, X, Y, Z) bool, each structure's own mask (overlaps kept)
    records: list  # per structure: slices reached, why each direction stopped, predicted IoU
    timings: dict  # encode_s, decode_s (all structures): {slice: seconds}; encoder_calls; total_s


class SliceEncoder:
    """Embeddings of the slices of one uint8 volume, each encoded at most once while kept.
    `calls` counts encoder passes per slice; `encode_s` is the time of each pass."""

    def __init__(self, sam, volume: np.ndarray, axis: str = "z", keep: bool = False):
        self.sam, self.volume, self.axis = sam, volume, axis
        self.keep = keep  # keep every embedding (one per slice in memory), to reuse across calls
        self.cache, self.calls, self.encode_s = {}, {}, {}

    def __call__(self, k: int) -> tuple:
        """-> embedding (1, D, h, w) and data.Geometry of slice k."""
        if k not in self.cache:
            gray = data.volume_slice(self.volume, self.axis, k)  # (H, W)
            t0 = time.perf_counter()
            self.cache[k] = infer.encode_image(self.sam, np.repeat(gray[..., None], 3, axis=2))
            self.encode_s[k] = self.encode_s.get(k, 0.0) + time.perf_counter() - t0
            self.calls[k] = self.calls.get(k, 0) + 1
        return self.cache[k]

    def drop(self, k: int) -> None:
        """Forget slice k's embedding: segment_volume calls this once no sweep needs it again."""
        if not self.keep:
            self.cache.pop(k, None)


# ------------------------------------------------------------------------------------------------
# Checks: everything is validated before the first encoder pass
# ------------------------------------------------------------------------------------------------


def check_structures(structures: list, shape: tuple, axis: str) -> None:
    """Key and anchor slices inside the volume, boxes inside the slice, limits around the key."""
    if axis not in data.AXES:
        raise ValueError(f"axis must be x, y or z, not {axis!r}")
    if len(shape) != 3:
        raise ValueError(f"expected a 3D volume, got shape {shape}")
    if not structures:
        raise ValueError("no structures to segment")
    n = shape[data.AXES[axis]]
    hw = data.volume_slice(np.zeros(shape, np.uint8), axis, 0).shape  # (H, W) of a slice
    for i, s in enumerate(structures):
        lo, hi = s.limits if s.limits is not None else (0, n - 1)
        if not 0 <= lo <= hi < n:
            raise ValueError(f"structure {i}: limits {s.limits} are outside 0..{n - 1}")
        for k, box in {s.key: s.box, **s.anchors}.items():
            if not isinstance(k, int) or isinstance(k, bool):
                raise ValueError(f"structure {i}: slice {k!r} is not a whole number")
            if not lo <= k <= hi:
                raise ValueError(
                    f"structure {i}: slice {k} is outside the volume's 0..{n - 1} along {axis}"
                    + (f" or the limits {lo}..{hi}" if s.limits is not None else "")
                )
            try:
                infer.check_prompts([infer.Prompt(box=list(box))], hw)
            except ValueError as err:
                raise ValueError(f"structure {i}, slice {k}: {err}") from None


# ------------------------------------------------------------------------------------------------
# Propagation
# ------------------------------------------------------------------------------------------------


def grow_box(mask: np.ndarray, cfg: PropagateConfig, seed_box=None, prev_box=None,
             trend=None) -> list:  # fmt: skip
    """The tight box of an (H, W) mask (x1, y1 one past the last pixel, as data.boxes_from_masks),
    each side moved out by max(min_margin, margin x the box's size) (with edge_margin, by that
    fraction instead on each side where the mask reached `prev_box`, the box that prompted it:
    the structure may go on past it there), then by extrapolate x `trend` (how each side of the
    tight box moved on the last step, [dx0, dy0, dx1, dy1]; not where that would turn the box
    inside out), clipped to the image and,
    with cfg.box_cap, to `seed_box` grown by box_cap x its size (a mask that fills its box would
    otherwise grow by the margin on every slice). With cfg.track, also clipped to `prev_box`,
    the box that prompted the mask, with the margin taken from that box's size: an edge moves in
    only where the mask has left it by more than the margin, and never out."""
    tight = _tight(mask)
    if cfg.track and prev_box is not None:
        fx, fy = (max(cfg.min_margin, cfg.margin * s) for s in _size(prev_box))
        box = [tight[0] - fx, tight[1] - fy, tight[2] + fx, tight[3] + fy]
    else:
        box = _grown(tight, cfg.margin, cfg.min_margin)
        if cfg.edge_margin is not None and prev_box is not None:
            met = [tight[0] <= prev_box[0] + 1, tight[1] <= prev_box[1] + 1,
                   tight[2] >= prev_box[2] - 1, tight[3] >= prev_box[3] - 1]  # fmt: skip
            edge = _grown(tight, cfg.edge_margin, cfg.min_margin)
            box = [e if side else b for b, e, side in zip(box, edge, met, strict=True)]
    if trend is not None and cfg.extrapolate:
        moved = [b + cfg.extrapolate * d for b, d in zip(box, trend, strict=True)]
        box = moved if moved[0] < moved[2] and moved[1] < moved[3] else box
    return _clip(box, mask.shape, [_cap(seed_box, cfg), prev_box if cfg.track else None])


def _cap(seed_box, cfg: PropagateConfig):
    """The box that prompts stay inside (the seed's, grown by box_cap), or None."""
    return _grown(seed_box, cfg.box_cap, 0.0) if cfg.box_cap is not None and seed_box else None


def _clip(box, shape: tuple, limits: list) -> list:
    """`box` cut to the (H, W) slice and to each box of `limits` (None: no limit); where nothing
    of it is left, the limit itself."""
    H, W = shape
    limit = [0.0, 0.0, float(W), float(H)]
    for other in limits:
        if other is not None:
            limit = [max(limit[0], other[0]), max(limit[1], other[1]),
                     min(limit[2], other[2]), min(limit[3], other[3])]  # fmt: skip
    x0, y0 = max(box[0], limit[0]), max(box[1], limit[1])
    x1, y1 = min(box[2], limit[2]), min(box[3], limit[3])
    return [x0, y0, x1, y1] if x0 < x1 and y0 < y1 else limit


def _tight(mask: np.ndarray) -> list:
    """The tight box of a non-empty (H, W) mask, x1 and y1 one past its last pixel."""
    return data.boxes_from_masks(torch.from_numpy(mask)[None])[0].tolist()


def box_step(before: np.ndarray, after: np.ndarray) -> list:
    """How each side of the tight box moved from mask `before` to mask `after` (both (H, W),
    non-empty) -> [dx0, dy0, dx1, dy1] px: grow_box's `trend`."""
    return [b - a for a, b in zip(_tight(before), _tight(after), strict=True)]


def side_gaps(box, mask: np.ndarray, at_least: float) -> list:
    """How far inside `box` the mask it gave ends on each side, [left, top, right, bottom] px,
    each at least `at_least`: on the seed slice, where the user's box is the structure's, how
    much this model under-segments this structure on each side."""
    tight = _tight(mask)
    gaps = [tight[0] - box[0], tight[1] - box[1], box[2] - tight[2], box[3] - tight[3]]
    return [max(at_least, float(g)) for g in gaps]


def mask_stream_prompt(mask: np.ndarray, gaps: list, cfg: PropagateConfig, seed_box) -> tuple:
    """The mask stream's prompt for the next slice from its previous mask: the mask's tight box
    moved out by the seed's `gaps` on each side (side_gaps; at least stream_margin x the box's
    width/height), clipped to the slice and to the seed's box grown by box_cap, and a click at
    the mask's deepest pixel -> (box, [[x, y, 1]])."""
    t = _tight(mask)
    mx, my = (cfg.stream_margin * s for s in _size(t))
    gaps = [max(g, m) for g, m in zip(gaps, (mx, my, mx, my), strict=True)]
    box = [t[0] - gaps[0], t[1] - gaps[1], t[2] + gaps[2], t[3] + gaps[3]]
    return _clip(box, mask.shape, [_cap(seed_box, cfg)]), [[*interior_point(mask), 1]]


def _hull(boxes: list) -> list:
    """The smallest box around `boxes`."""
    return [min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes)]  # fmt: skip


def _size(box) -> tuple:
    return float(box[2]) - float(box[0]), float(box[3]) - float(box[1])


def _grown(box, fraction: float, at_least: float) -> list:
    x0, y0, x1, y1 = (float(v) for v in box)
    mx, my = max(at_least, fraction * (x1 - x0)), max(at_least, fraction * (y1 - y0))
    return [x0 - mx, y0 - my, x1 + mx, y1 + my]


def interior_point(mask: np.ndarray) -> list:
    """[x, y] of the pixel deepest inside an (H, W) mask: erode (3 x 3) until one more erosion
    would leave nothing, then the remaining pixel nearest their centroid. Unlike the centroid,
    it lies inside a ring, a C or two blobs; deepest, so it is still inside the structure on the
    next slice when the edges have moved."""
    return _deepest(_depth(mask))


def _depth(mask: np.ndarray) -> np.ndarray:
    """(H, W) number of 3 x 3 erosions (8-neighbourhood min) each pixel of `mask` survives, + 1."""
    m = torch.from_numpy(mask)[None, None].float()  # (1, 1, H, W)
    depth = torch.zeros_like(m)
    while m.any():
        depth += m
        m = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return depth[0, 0].numpy()


def _deepest(depth: np.ndarray) -> list:
    """[x, y] of the deepest pixel nearest the centroid of the deepest pixels."""
    if not depth.any():
        raise ValueError("interior_point: an empty mask has no interior")
    ys, xs = np.nonzero(depth == depth.max())
    i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return [float(xs[i]), float(ys[i])]


def spread_points(mask: np.ndarray, count: int) -> list:
    """Up to `count` [x, y] clicks spread over an (H, W) mask: the deepest pixel
    (interior_point), then, one at a time, the pixel of depth >= half the deepest's farthest from
    the clicks so far, while it lies at least that depth away from them (depth: the number of
    3 x 3 erosions a pixel survives)."""
    depth = _depth(mask)  # (H, W)
    ys, xs = np.nonzero(depth >= max(1.0, depth.max() / 2))
    points = [_deepest(depth)]
    gap = np.full(len(xs), np.inf)
    while len(points) < count:
        x, y = points[-1]
        gap = np.minimum(gap, np.hypot(xs - x, ys - y))
        i = int(np.argmax(gap))
        if gap[i] < depth.max():
            break
        points.append([float(xs[i]), float(ys[i])])
    return points


def largest_components(mask: np.ndarray, count: int, min_fraction: float) -> list:
    """The (H, W) masks of the `count` largest 8-connected components of `mask`, largest first:
    the largest always, the others only with at least `min_fraction` of the mask's area."""
    ids = label_components(torch.from_numpy(mask)).numpy()  # (H, W) 0 = background
    sizes = np.bincount(ids.ravel())[1:]  # (C,)
    order = np.argsort(-sizes, kind="stable")[:count]
    keep = [i for j, i in enumerate(order) if j == 0 or sizes[i] >= min_fraction * mask.sum()]
    return [ids == i + 1 for i in keep]


def negative_points(mask: np.ndarray, box, cfg: PropagateConfig) -> list:
    """Up to cfg.negative [x, y] background clicks for a prompt `box`: the deepest pixel of each
    of the largest pieces of the box that lie outside `mask` grown by negative_gap x the box's
    size. They mark where the box is empty on the previous slice, so that LiteMedSAM, which
    fills the box it is given, does not fill it there as the structure narrows."""
    H, W = mask.shape
    rx, ry = (max(1, round(cfg.negative_gap * s)) for s in _size(box))
    m = torch.from_numpy(mask)[None, None].float()  # (1, 1, H, W)
    grown = F.max_pool2d(m, (2 * ry + 1, 2 * rx + 1), stride=1, padding=(ry, rx))[0, 0] > 0
    inside = np.zeros((H, W), bool)
    x0, y0 = max(0, int(np.ceil(box[0]))), max(0, int(np.ceil(box[1])))
    inside[y0 : int(box[3]), x0 : int(box[2])] = True  # pixels whose corner lies in the box
    free = inside & ~grown.numpy()
    if not free.any():
        return []
    return [interior_point(c) for c in largest_components(free, cfg.negative, 0.0)]


def slice_prompts(mask: np.ndarray, cfg: PropagateConfig, seed_box, prev_box, trend=None) -> list:
    """The prompts for the next slice from the previous slice's mask -> [(box, [[x, y, label],
    ...]), ...]: one box (its grown box, moved on by its `trend`) with a click at its deepest
    pixel (`click`), or at the deepest pixel of each of its `clicks` largest components (or
    `click_spread` over it). With `per_component`, one grown box and click for each of its
    `parts` largest components instead, where their boxes leave most of their hull empty
    (`split_fill`): pieces far apart, as at a structure's scattered lower end, where one box
    around them all is filled by LiteMedSAM. With `negative`, background clicks in each box
    (negative_points)."""
    boxes = None
    if cfg.per_component:
        parts = largest_components(mask, cfg.parts, cfg.click_min)
        boxes = [grow_box(c, cfg, seed_box, prev_box) for c in parts]
        points = [[[*interior_point(c), 1]] if cfg.click else [] for c in parts]
        area = lambda b: _size(b)[0] * _size(b)[1]  # noqa: E731
        if cfg.split_fill is not None and sum(map(area, boxes)) >= cfg.split_fill * area(
            _hull(boxes)
        ):
            boxes = None  # the parts' boxes fill their hull: one box after all
    if boxes is None:
        boxes = [grow_box(mask, cfg, seed_box, prev_box, trend)]
        if not cfg.click:
            points = [[]]
        elif cfg.clicks == 1:
            points = [[[*interior_point(mask), 1]]]
        elif cfg.click_spread:
            points = [[[*q, 1] for q in spread_points(mask, cfg.clicks)]]
        else:
            parts = largest_components(mask, cfg.clicks, cfg.click_min)
            points = [[[*interior_point(c), 1] for c in parts]]
    if cfg.negative:
        for p, b in zip(points, boxes, strict=True):
            p += [[*q, 0] for q in negative_points(mask, b, cfg)]
    return list(zip(boxes, points, strict=True))


def decode_slice(sam, emb, geom, prompts: list, mask_prob=None, multimask=None, like=None) -> tuple:
    """Prompts [(box, [[x, y, label], ...]), ...] on one slice (label 1 foreground, 0
    background; optionally with the previous slice's probabilities (1, 1, S/4, S/4)), decoded
    in one batch and united (the highest logit per pixel) -> logits (H, W) at the slice's
    size, low-res logits (1, 1, S/4, S/4), predicted IoU (the prompts' mean). Of the three
    outputs each prompt's is the one with the highest predicted IoU, or with `like` (an (H, W)
    mask, the previous slice's) the one most like it (Dice)."""
    P, N = len(prompts), max(len(pts) for _, pts in prompts)
    boxes = geom.boxes_to_model(torch.tensor([b for b, _ in prompts], dtype=torch.float32))
    points = None
    if N:  # pad to N points per prompt with SAM's padding label -1
        xy = torch.zeros(P, N, 2)  # (P, N, 2)
        labels = torch.full((P, N), -1, dtype=torch.long)  # (P, N)
        for i, (_, pts) in enumerate(prompts):
            if pts:
                xy[i, : len(pts)] = torch.tensor([p[:2] for p in pts], dtype=torch.float32)
                labels[i, : len(pts)] = torch.tensor([int(p[2]) for p in pts])
        points = (geom.points_to_model(xy), labels)
    if mask_prob is not None:
        mask_prob = mask_prob.expand(P, -1, -1, -1)  # (P, 1, S/4, S/4)
    multimask = not sam.cfg.single_mask if multimask is None else multimask
    keep_all = like is not None and multimask
    low, iou = infer._decode_best(sam, emb, points, boxes, mask_prob, multimask, keep_all)
    low, iou = low.float().cpu(), iou.float().cpu()
    if keep_all:  # (P, K, h, w), (P, K): each prompt's output most like the previous mask
        masks = geom.logits_to_original(low) > sam.cfg.mask_threshold  # (P, K, H, W)
        ref = torch.from_numpy(like)  # (H, W)
        dice = 2 * (masks & ref).flatten(2).sum(2) / (masks.flatten(2).sum(2) + ref.sum())
        rows, pick = torch.arange(len(iou)), dice.argmax(1)  # (P,): the most like it
        low, iou = low[rows, pick][:, None], iou[rows, pick]
    low = low.amax(0, keepdim=True)  # (1, 1, h, w): the union
    return geom.logits_to_original(low)[0, 0].numpy(), low, float(iou.mean())  # (H, W)


def mask_feature(emb: torch.Tensor, geom, mask: np.ndarray) -> torch.Tensor:
    """The mean image-embedding vector over an (H, W) mask -> (C,) float32: the mask placed in the
    S x S model input as the image was (geom), its fraction in each embedding cell (average pool
    S/g x S/g), the cells' (1, C, g, g) vectors averaged with those weights. What the encoder
    sees inside the mask: a structure's own tissue keeps its direction from slice to slice."""
    m = geom.mask_to_model(torch.from_numpy(mask)).to(emb.device, torch.float32)  # (S, S)
    w = F.adaptive_avg_pool2d(m[None, None], emb.shape[-2:])[0, 0]  # (g, g) its share of a cell
    f = (emb[0].float() * w).sum((1, 2)) / w.sum().clamp(min=1e-12)  # (C,)
    return f.cpu()


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two mask_feature vectors."""
    return float(F.cosine_similarity(a, b, dim=0))


def _stop_reason(area: int, iou: float, ref_area: int, prev_area: int, cfg: PropagateConfig,
                 cosine: float | None = None):  # fmt: skip
    """Why propagation ends on this slice, or None. A structure that ends shows as a mask of
    other tissue (`stop_similarity`: its mask_feature's `cosine` to the seed mask's), or
    one that vanishes, shrinks (`stop_shrink`) or, when the model latches onto the tissue around
    it, grows (`stop_growth`)."""
    if area < cfg.min_pixels:
        return "vanished"
    if cfg.stop_similarity is not None and cosine is not None and cosine < cfg.stop_similarity:
        return f"features unlike the seed's (cosine {cosine:.2f} < {cfg.stop_similarity:g})"
    if area < cfg.stop_area * ref_area:
        return f"area below {cfg.stop_area:g} of the seed slice's"
    if iou < cfg.stop_iou:
        return f"predicted IoU below {cfg.stop_iou:g}"
    if cfg.stop_growth is not None and area > cfg.stop_growth * prev_area:
        return f"area grew over {cfg.stop_growth:g} x the previous slice's"
    if cfg.stop_shrink is not None and area < cfg.stop_shrink * prev_area:
        return f"area fell below {cfg.stop_shrink:g} x the previous slice's"
    return None


class _Track:
    """One structure in one sweep: its seeds (key and anchor boxes), the last kept mask and its
    logits, the reference area (the mask's on the last seed), whether it has stopped; with
    mask_stream also the mask stream's last mask (the output) and the seed's gaps."""

    def __init__(self, s: Structure, n: int, step: int):
        lo, hi = s.limits if s.limits is not None else (0, n - 1)
        self.seeds, self.step, self.end = {s.key: s.box, **s.anchors}, step, hi if step > 0 else lo
        self.mask = self.low = self.seed_box = self.box = None  # None until it passes a seed
        self.out = self.gaps = None  # the mask stream's last mask, the seed's side_gaps
        self.ref_area, self.ref_feature, self.stopped = 0, None, False  # on the last seed
        self.seed_k = None  # the last seed slice passed
        self.trend = None  # with extrapolate: box_step of the last two masks carried on

    def wants(self, k: int) -> bool:
        """Does this track decode slice k: a seed, or the next slice of a live propagation?"""
        live = self.mask is not None and not self.stopped and (self.end - k) * self.step >= 0
        return k in self.seeds or live

    def finished(self, k: int) -> bool:
        """Will this track decode no slice from k on (stopped or past its end, no seed ahead)?"""
        if any((a - k) * self.step >= 0 for a in self.seeds):
            return False
        return self.mask is None or self.stopped or (self.end - k) * self.step < 0


@torch.inference_mode()
def segment_volume(sam, volume: np.ndarray, structures: list, axis: str = "z",
                   cfg: PropagateConfig | None = None, multimask: bool | None = None,
                   progress: bool = False, encoder: SliceEncoder | None = None
                   ) -> VolumeSegmentation:  # fmt: skip
    """Follow each `Structure` from its key slice through the (X, Y, Z) uint8 `volume` (canonical
    voxel order, as data.normalize_intensity(data.read_volume(...).data) gives it) along `axis`.

    Two sweeps, upward then downward, each starting at the outermost seed (key or anchor slice):
    on a seed slice a structure is prompted with that box alone (restarting it if it had stopped),
    elsewhere with the grown box of its last mask; the downward sweep reuses the seeds' masks and
    ends a structure where it meets a slice the upward sweep already gave it. With
    cfg.mask_stream the output masks (and predicted IoU) are the mask stream's (the module's
    docstring); where its mask is empty, the slice's output is the prompt stream's mask.
    Raises ValueError before any work for a slice outside the volume or a box outside the slice,
    and for a seed box whose mask is empty (before any output exists). `encoder`: a SliceEncoder
    to share, e.g. to run several settings on the same volume with one encoding."""
    cfg = cfg or PropagateConfig()
    if not (isinstance(cfg.stride, int) and cfg.stride >= 1):
        raise ValueError(f"stride must be a whole number >= 1, not {cfg.stride!r}")
    check_structures(structures, volume.shape, axis)
    t_start = time.perf_counter()
    n, P = volume.shape[data.AXES[axis]], len(structures)
    enc = encoder or SliceEncoder(sam, volume, axis)
    masks = np.zeros((P, *volume.shape), bool)  # (P, X, Y, Z)
    best = np.full(volume.shape, -np.inf, np.float32)  # (X, Y, Z): the winning logit so far
    labels = np.zeros(volume.shape, np.uint8 if P < 256 else np.uint16)  # (X, Y, Z)
    records = [{"key": s.key, "anchors": sorted(s.anchors), "first": s.key, "last": s.key,
                "stops": [], "predicted_iou": {}, "similarity": {}}
               for s in structures]  # fmt: skip
    seeded, decode_s = {}, {}  # (structure, seed slice) -> the upward sweep's masks etc.

    def put(i: int, k: int, logits: np.ndarray, iou: float) -> None:
        """Structure i's mask on slice k into masks/labels (the slice view back to voxels)."""
        idx, view = data.slice_index(axis, k), data.slice_to_voxels(logits)  # slice -> voxels
        m = view > sam.cfg.mask_threshold
        masks[(i, *idx)] = m
        win = m & (view > best[idx])
        best[idx] = np.where(win, view, best[idx])
        labels[idx] = np.where(win, i + 1, labels[idx])
        r = records[i]
        r["predicted_iou"][k] = round(iou, 4)
        r["first"], r["last"] = min(r["first"], k), max(r["last"], k)

    def advance(i: int, t: _Track, k: int, emb, geom) -> None:
        """Track t (structure i) onto slice k; the stop rule decides whether its mask is kept."""
        if k in t.seeds and (i, k) in seeded:  # the downward sweep: the seed's upward result
            (t.mask, t.low, t.out, t.gaps, t.ref_feature), t.seed_box = seeded[i, k], t.seeds[k]
            t.box, t.seed_k, t.trend = t.seed_box, k, None
            t.ref_area, t.stopped = int(t.mask.sum()), False
            return
        if k not in t.seeds and k in records[i]["predicted_iou"]:
            t.stopped = True  # met the upward sweep, which covered the slices from here on
            return
        if k in t.seeds:
            prompts, prob = [(t.seeds[k], [])], None
        else:
            prompts = slice_prompts(t.mask, cfg, t.seed_box, t.box, t.trend)
            prob = torch.sigmoid(t.low) if cfg.mask_prompt else None
        box = _hull([b for b, _ in prompts])
        logits, low, iou = decode_slice(sam, emb, geom, prompts, prob, multimask)
        m = logits > sam.cfg.mask_threshold  # (H, W)
        area = int(m.sum())
        feature = cosine = None  # the mask's mean embedding vector, its cosine to the seed's
        if cfg.stop_similarity is not None and area >= max(1, cfg.min_pixels):
            feature = mask_feature(emb, geom, m)
            if k not in t.seeds and t.ref_feature is not None:
                cosine = similarity(feature, t.ref_feature)
        if k in t.seeds:
            if area < max(1, cfg.min_pixels):
                raise ValueError(
                    f"structure {i}: the box {box} on slice {k} gives an empty mask "
                    "(nothing to propagate from it)"
                )
            t.seed_box, t.seed_k = box, k
            if t.stopped:  # an anchor restarts a stopped propagation
                records[i]["stops"][-1]["restarted_at"] = k
            t.ref_area, t.ref_feature, t.stopped = area, feature, False
        elif reason := _stop_reason(area, iou, t.ref_area, int(t.mask.sum()), cfg, cosine):
            direction = "up" if t.step > 0 else "down"
            records[i]["stops"].append({"direction": direction, "slice": k, "reason": reason})
            t.stopped = True
            return
        out, out_logits, out_iou = m, logits, iou  # the output: this mask, or the mask stream's
        if cfg.mask_stream:
            if k in t.seeds:  # the seed box again, with a click at its mask's deepest pixel
                prompt, like = (box, [[*interior_point(m), 1]]), m
            else:
                prompt, like = mask_stream_prompt(t.out, t.gaps, cfg, t.seed_box), t.out
            logits2, _, iou2 = decode_slice(sam, emb, geom, [prompt], None, multimask, like)
            m2 = logits2 > sam.cfg.mask_threshold
            if m2.any():  # else this slice's output: the prompt stream's mask
                out, out_logits, out_iou = m2, logits2, iou2
            if k in t.seeds:
                t.gaps = side_gaps(box, out, cfg.min_margin)
        if k in t.seeds:
            seeded[i, k] = (m, low, out, t.gaps, feature)
        if (k - t.seed_k) % cfg.stride == 0:  # else the next slice reuses the last carried ones
            t.trend = box_step(t.mask, m) if cfg.extrapolate and k not in t.seeds else None
            t.mask, t.low, t.box, t.out = m, low, box, out
        put(i, k, out_logits, out_iou)
        if cosine is not None:
            records[i]["similarity"][k] = round(cosine, 4)

    lo_seed = min(min([s.key, *s.anchors]) for s in structures)
    hi_seed = max(max([s.key, *s.anchors]) for s in structures)
    bar = tqdm(desc="slices", unit="slice", disable=not progress)
    for step in (1, -1):
        tracks = [_Track(s, n, step) for s in structures]
        ks = range(lo_seed, n) if step > 0 else range(hi_seed, -1, -1)
        for k in ks:
            if all(t.finished(k) for t in tracks):
                break
            active = [i for i, t in enumerate(tracks) if t.wants(k)]
            if not active:
                continue  # a structure whose first seed lies further on has not started yet
            emb, geom = enc(k)
            t0 = time.perf_counter()
            for i in active:
                advance(i, tracks[i], k, emb, geom)
            decode_s[k] = decode_s.get(k, 0.0) + time.perf_counter() - t0
            if step < 0 or k > hi_seed:  # no later sweep comes back to this slice
                enc.drop(k)
            bar.update(1)
        for i, t in enumerate(tracks):
            if not t.stopped:
                edge = "the volume" if structures[i].limits is None else "the limits"
                direction = "up" if step > 0 else "down"
                records[i]["stops"].append(
                    {"direction": direction, "slice": None, "reason": f"reached the end of {edge}"}
                )
    bar.close()
    for k in range(lo_seed, hi_seed + 1):
        enc.drop(k)
    for r in records:
        r["slices"] = len(r["predicted_iou"])
        for field_ in ("predicted_iou", "similarity"):
            r[field_] = dict(sorted(r[field_].items()))
        r["ends"] = {d: [s for s in r["stops"] if s["direction"] == d][-1] for d in ("up", "down")}
    timings = {"encode_s": dict(sorted(enc.encode_s.items())),
               "encoder_calls": dict(sorted(enc.calls.items())),
               "decode_s": dict(sorted(decode_s.items())),
               "total_s": time.perf_counter() - t_start}  # fmt: skip
    return VolumeSegmentation(labels, masks, records, timings)


# ------------------------------------------------------------------------------------------------
# The command line's --propagate (outputs.py reads the volume and writes the files)
# ------------------------------------------------------------------------------------------------


def job_structures(job) -> list:
    """The structures of an outputs.Job: each --box on --slice K (the anchors, --anchor K X0 Y0
    X1 Y1, re-anchor the one structure), or --box3d's box from its middle slice, confined to its
    slices."""
    if job.box3d is not None:
        x0, y0, z0, x1, y1, z1 = job.box3d
        if not (float(z0).is_integer() and float(z1).is_integer() and z0 < z1):
            raise ValueError(f"box3d slices z0 {z0:g}, z1 {z1:g} are not whole indices, z0 < z1")
        z0, last = int(z0), int(z1) - 1  # z1 is exclusive, like x1 and y1
        return [Structure([x0, y0, x1, y1], (z0 + last) // 2, limits=(z0, last))]
    if job.slice is None:
        raise ValueError("--propagate starts from --slice K with --box (or from --box3d)")
    if any(p.box is None or p.points for p in job.prompts):
        raise ValueError("--propagate follows boxes: give each structure as a --box, no points")
    anchors = {}
    for k, *box in job.anchors or []:
        if not float(k).is_integer():
            raise ValueError(f"--anchor slice {k} is not a whole index")
        anchors[int(k)] = list(box)
    if anchors and len(job.prompts) != 1:
        raise ValueError("--anchor re-anchors one structure: give a single --box with it")
    return [Structure(list(p.box), job.slice, dict(anchors)) for p in job.prompts]


def propagate_job(sam, job, u8: np.ndarray, multimask: bool | None = None) -> tuple:
    """outputs.py's --propagate on the canonical uint8 volume `u8` -> (label volume (X, Y, Z),
    record, the key slice's image (H, W, 3) and label ids (H, W) for the overlay, its prompts)."""
    cfg = job.propagate
    try:
        structures = job_structures(job)
        seg = segment_volume(sam, u8, structures, job.axis, cfg, multimask, progress=True)
    except ValueError as err:
        raise ValueError(f"{job.path}: {err}") from None
    key = structures[0].key
    gray = data.volume_slice(u8, job.axis, key)  # (H, W)
    ids = data.volume_slice(seg.labels, job.axis, key)  # (H, W)
    enc, dec = seg.timings["encode_s"], seg.timings["decode_s"]
    record = {
        "axis": job.axis,
        "propagation": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "structures": seg.records,
        "overlay_slice": key,
        "label_ids": "voxel value i+1 = structure i",
        "timings_s": {"encode": sum(enc.values()), "decode": sum(dec.values()),
                      "encoder_passes": sum(seg.timings["encoder_calls"].values()),
                      "per_slice": (sum(enc.values()) + sum(dec.values())) / max(1, len(dec))},
    }  # fmt: skip
    prompts = [infer.Prompt(box=list(s.box)) for s in structures if s.key == key]
    return seg.labels, record, np.repeat(gray[..., None], 3, axis=2), ids, prompts
