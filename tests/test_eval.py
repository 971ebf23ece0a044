"""The evaluation protocol (infer.evaluate, issue 11/12): our default --eval against a line-by-line
port of the official test.py loop (official.py), with the same points injected into both sides;
the official -1 padding click; the sigmoid click threshold; one-shot multi-point modes; the
filled-box baseline. A tiny random model in SAM-Med2D's conventions (stretch/pad, BGR) keeps it
fast; its masks are arbitrary but deterministic, which is all these checks need."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import infer
import infer_cli
import model
import official
import outputs


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)  # arbitrary but fixed weights
    return model.Sam(model.SamConfig.from_name("tiny", channel_order="BGR")).eval()


def _shapes(h, w):
    """A disk, and a bar with a small second component (the official box leaves it out)."""
    yy, xx = np.mgrid[:h, :w]
    disk = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2) < (h / 4) ** 2
    bar = np.zeros((h, w), bool)
    bar[h // 8 : h // 4, w // 2 : w - 5] = True
    bar[h - 6 : h - 2, 2:6] = True
    return disk, bar


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two colour images on disk, one resized to 256 (300x280) and one padded (200x180), two
    masks each, in an SA-Med2D-20M style test manifest."""
    root = tmp_path_factory.mktemp("evalset")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    manifest = {}
    for i, (h, w) in enumerate([(300, 280), (200, 180)]):
        name = f"mr_t1--Synth--case{i:04d}--z_{i:04d}"
        disk, bar = _shapes(h, w)
        img = rng.integers(0, 60, (h, w, 3)) + 120 * disk[..., None] + [0, 40, 90] * bar[..., None]
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{name}.png")
        for lab, m in ((1, disk), (2, bar)):
            mname = f"{name}--label_{lab}_000.png"
            Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / mname)
            manifest[f"masks/{mname}"] = f"images/{name}.png"
    (root / "label2image_test.json").write_text(json.dumps(manifest))
    return root


# ------------------------------------------------------------------------------------------------
# Our default --eval == a port of test.py's loop, on the same points
# ------------------------------------------------------------------------------------------------


class ReplayDraws:
    """Injects the points our evaluation drew into the port (official.NumpyDraws' interface):
    each pick returns our next point after checking that the port offers it, i.e. that it lies
    in the region the official code would sample from (mask, background, or error region).
    A one-shot record is split the way init_point_sampling draws it: foreground first, then
    background, then the permutation that puts them in our order."""

    def __init__(self, points, labels, shot=False):
        self.points, self.labels = [tuple(map(int, p)) for p in points], list(labels)
        if shot:
            fg = [i for i, q in enumerate(self.labels) if q == 1]
            bg = [i for i, q in enumerate(self.labels) if q == 0]
            self.queue, rank = fg + bg, {i: r for r, i in enumerate(fg + bg)}
            self.perm = np.array([rank[i] for i in range(len(self.points))])
        else:
            self.queue = list(range(len(self.points)))
        self.next = 0

    def pick(self, candidates, n, columns):
        out = []
        for _ in range(n):
            x, y = self.points[self.queue[self.next]]
            self.next += 1
            row = (x, y) if columns == "xy" else (y, x)
            assert (candidates == row).all(1).any(), f"({x}, {y}) is not where the port samples"
            out.append(row)
        return np.array(out)

    def integers(self, high, size):
        return np.zeros(size, dtype=np.int64)  # our padding point sits at (0, 0)

    def permutation(self, n):
        return self.perm


def _numpy_draws():  # the dataset draws the first points even for box prompts (DataLoader.py:79)
    return official.NumpyDraws(np.random.default_rng(0))


@pytest.mark.parametrize("mode", ["box", 5, "3shot"])
def test_default_eval_matches_the_official_test_loop(sam, dataset, mode):
    """Same prompts (box exactly; every click's position and label, computed independently by
    the port from its own prediction) and the same Dice/IoU per mask within 5e-5 (the official
    rounds each to 4 decimals), for a resized and a padded image."""
    res = infer.evaluate(sam, dataset, (mode,), seed=0)
    key = infer.mode_key(mode)
    manifest = json.loads((dataset / "label2image_test.json").read_text())
    assert len(res["per_mask"]) == 4
    for row in res["per_mask"]:
        ours = res["prompts"]["masks"][row["mask"]][key]
        paths = dataset / manifest[row["mask"]], dataset / row["mask"]
        if mode == "box":
            port = official.official_test_mask(sam, *paths, _numpy_draws())
            assert port["boxes"].tolist() == [ours["box"]]
        else:
            shot = isinstance(mode, str)
            draws = ReplayDraws(ours["points"], ours["labels"], shot=shot)
            kw = dict(point_num=3) if shot else dict(iter_point=5)
            port = official.official_test_mask(sam, *paths, draws, boxes_prompt=False, **kw)
            assert port["point_labels"].tolist() == ours["labels"]
            assert port["point_coords"].tolist() == ours["points"]
        assert abs(port["dice"] - row["dice"]) <= 5e-5 + 1e-12, row["mask"]
        assert abs(port["iou"] - row["iou"]) <= 5e-5 + 1e-12, row["mask"]


def test_the_equivalence_check_can_fail(sam, dataset):
    """The whole-mask box (--protocol tight) is not the official box of the two-part mask, and
    a point outside the port's region is refused by the injected draws."""
    res = infer.evaluate(sam, dataset, ("box",), protocol="tight", limit=1)
    key = [k for k in res["prompts"]["masks"] if "label_2" in k][0]
    img = json.loads((dataset / "label2image_test.json").read_text())[key]
    port = official.official_test_mask(sam, dataset / img, dataset / key, _numpy_draws())
    assert port["boxes"].tolist() != [res["prompts"]["masks"][key]["box"]["box"]]
    with pytest.raises(AssertionError, match="not where the port samples"):
        draws = ReplayDraws([[0, 0]], [1])  # a corner pixel: background of every mask here
        official.official_test_mask(sam, dataset / img, dataset / key, draws, boxes_prompt=False)


def test_port_box_is_the_largest_component_regionprops_box():
    """official.get_boxes_from_mask against hand-worked boxes: largest 8-connected component
    (diagonal pixels join), ties to the first in raster order, x1/y1 exclusive."""
    m = np.zeros((10, 12), np.int64)
    m[1, 1] = m[2, 2] = m[3, 3] = 1  # 3 pixels, diagonal: one 8-connected component
    m[6:8, 8:10] = 1  # 4 pixels
    assert official.get_boxes_from_mask(torch.from_numpy(m)).tolist() == [[8, 6, 10, 8]]
    m[6:8, 8:10] = 0
    m[6, 8] = m[6, 10] = m[6, 9] = 1  # 3 pixels too: the tie goes to the first component
    assert official.get_boxes_from_mask(m).tolist() == [[1, 1, 4, 4]]
    ours = data.boxes_from_masks(torch.from_numpy(m)[None].bool(), largest_component=True)
    assert ours.tolist() == [[1, 1, 4, 4]]


# ------------------------------------------------------------------------------------------------
# The protocol's pieces
# ------------------------------------------------------------------------------------------------


def test_no_error_click_pads_with_a_not_a_point_like_the_official():
    """A mask predicted perfectly gets a -1 point (utils.py:93-108) by default; one with errors
    a click labelled by the ground truth; "confirm" keeps the old confirming click."""
    gt = torch.zeros(2, 256, 256, dtype=torch.bool)  # 256: the official no-error draw's range
    gt[:, 40:100, 30:120] = True
    pred = gt.clone()
    pred[1, 40:100, 30:60] = False  # mask 1: a false-negative strip
    g = torch.Generator().manual_seed(0)
    xy, lab = data.error_clicks(pred, gt, 1, g, no_error="pad")
    port_xy, port_lab = official.select_random_points(
        pred[:, None].float(), gt[:, None].float(), 1, official.NumpyDraws(np.random.default_rng(0))
    )
    assert lab[0].tolist() == [-1] == port_lab[0].tolist()
    assert lab[1].tolist() == [1] == port_lab[1].tolist()
    x, y = xy[1, 0].long().tolist()
    assert gt[1, y, x] and not pred[1, y, x]
    _, lab_c = data.error_clicks(pred, gt, 1, torch.Generator().manual_seed(0), no_error="confirm")
    assert lab_c[0].tolist() == [1]


def test_clicks_use_sigmoid_above_one_half(sam):
    """Logits in (0, ~6e-8) are background for the official sigmoid(x) > 0.5 in float32 (not
    for logits > 0): a whole-mask target then has errors everywhere and gets a positive click,
    where logits > 0 would see a perfect prediction and pad."""
    S = sam.cfg.image_size
    gt = torch.ones(1, S, S, dtype=torch.bool)
    low = torch.full((1, 1, S // 4, S // 4), 1e-8)
    _, lab = infer._next_clicks(sam, gt, low, torch.Generator().manual_seed(0), "pad")
    assert lab.tolist() == [[1]]
    _, lab = infer._next_clicks(sam, gt, low * 1e3, torch.Generator().manual_seed(0), "pad")
    assert lab.tolist() == [[-1]]


def test_defaults_are_the_official_protocol(sam, dataset):
    """evaluate() without arguments (what train.py's validation calls) uses the official box and
    padding; the record says so; the tight box is the option."""
    res = infer.evaluate(sam, dataset, ("box",))
    assert res["prompts"]["protocol"] == "official" and res["prompts"]["no_error_click"] == "pad"
    assert infer.InferConfig().protocol == "official"
    args = infer_cli.parse_args(["--eval", "x", "--protocol", "tight", "--no-error-click",
                                 "confirm", "--modes", "box", "3", "5shot"])  # fmt: skip
    cfg = infer_cli.config_from_args(args)
    assert (cfg.protocol, cfg.no_error_click) == ("tight", "confirm")
    assert cfg.prompt_modes == ("box", 3, "5shot")
    for bad in (["--modes", "shot"], ["--modes", "0shot"], ["--no-error-click", "skip"]):
        with pytest.raises(SystemExit):
            infer_cli.parse_args(["--eval", "x", *bad])
    with pytest.raises(ValueError, match="prompt modes"):
        infer.evaluate(sam, dataset, ("3shots",))


def test_one_shot_draws_half_foreground_and_decodes_once(sam, dataset):
    """Mode 5shot: 5 points at once, 5 // 2 = 2 in the mask and 3 outside (init_point_sampling),
    one decode without a mask fed back: replaying the points by hand gives the same Dice."""
    res = infer.evaluate(sam, dataset, ("5shot",), seed=1, limit=1)
    for row in res["per_mask"]:
        rec = res["prompts"]["masks"][row["mask"]]["5shot"]
        gt = data.read_mask(dataset / row["mask"])
        geom = data.geometry(*gt.shape, sam.cfg.image_size, sam.cfg.resize_mode)
        gm = geom.mask_to_model(gt)
        assert sorted(rec["labels"]) == [0, 0, 0, 1, 1]
        assert rec["labels"] == [int(gm[int(y), int(x)]) for x, y in rec["points"]]
        image = data.read_image(dataset / row["image"].split(str(dataset) + "/")[-1])
        emb, _ = infer.encode_image(sam, image)
        low, _ = infer._decode_best(sam, emb, (torch.tensor([rec["points"]]),
                                               torch.tensor([rec["labels"]])))  # fmt: skip
        pred = geom.logits_to_original(low)[:, 0] > 0
        dice, _ = infer.dice_iou(pred, torch.from_numpy(gt)[None])
        assert dice.item() == pytest.approx(row["dice"], abs=1e-12)


def test_filled_box_baseline(sam, dataset):
    """The Dice of filling the prompt box, per mask and averaged, beside (not inside) the model's
    scores: on the padded image it is exactly a numpy rectangle's Dice at the original size."""
    res = infer.evaluate(sam, dataset, ("box", 1))
    assert set(res["dice"]) == {"box", "1pt"}  # train.py's validation averages res["dice"]
    box_rows = [r for r in res["per_mask"] if r["mode"] == "box"]
    assert res["filled_box"]["dice"] == pytest.approx(np.mean([r["filled_dice"] for r in box_rows]))
    checked = 0
    for r in box_rows:
        gt = data.read_mask(dataset / r["mask"])
        if gt.shape != (200, 180):
            continue
        top, left = (256 - 200) // 2, (256 - 180) // 2
        x0, y0, x1, y1 = (int(v) for v in res["prompts"]["masks"][r["mask"]]["box"]["box"])
        fill = np.zeros_like(gt)
        fill[y0 - top : y1 - top, x0 - left : x1 - left] = True
        inter = (fill & gt).sum()
        assert r["filled_dice"] == pytest.approx(2 * inter / (fill.sum() + gt.sum()), abs=1e-12)
        assert r["filled_iou"] == pytest.approx(inter / (fill | gt).sum(), abs=1e-12)
        checked += 1
    assert checked == 2
    table = outputs.format_table(res, ("box", 1))
    assert "box fill" in table.splitlines()[0]
    assert f"{res['filled_box']['dice']:10.4f}" in table.splitlines()[1]
    assert "filled_box" in res["by"]["label"]["Synth/label_1"]
