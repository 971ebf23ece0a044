"""train.py: losses against hand-computed values, the click loop's prompts, the trainable set, an
overfit run that must learn, DDP (2 gloo processes) == 1 process, exact resume, AMP, and clear
errors before any work. Datasets are synthetic images written to disk in the SA-Med2D-20M layout.
"""

import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoints
import data
import infer
import model
import model_cli
import official
import runs
import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """On a shared 2-core machine two OpenMP threads wait on each other: one is several times
    faster for these tiny models, and results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_dataset(root: Path, n: int = 4, size: int = 64, seed: int = 0) -> Path:
    """n grey images, each with a bright disk and a dimmer rectangle (its two masks, 0/255 PNGs),
    image2label_train.json, and label2image_val.json over the same images (overfitting is the
    point of these tests)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    manifest = {}
    for i in range(n):
        name = f"ct--synth--case{i:04d}--z_0000"
        cx, cy = rng.integers(16, size - 16, 2)
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= rng.integers(6, 12) ** 2
        x0, y0 = rng.integers(0, size - 20, 2)
        rect = (xx >= x0) & (xx < x0 + 16) & (yy >= y0) & (yy < y0 + 12) & ~disk
        image = rng.integers(0, 60, (size, size)).astype(np.uint8)
        image[disk], image[rect] = 200, 130
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        masks = []
        for k, m in enumerate((disk, rect)):
            masks.append(f"masks/{name}--label_{k}_000.png")
            Image.fromarray(m.astype(np.uint8) * 255).save(root / masks[-1])
        manifest[f"images/{name}.png"] = masks
    (root / "image2label_train.json").write_text(json.dumps(manifest))
    val = {m: img for img, ms in manifest.items() for m in ms}
    (root / "label2image_val.json").write_text(json.dumps(val))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def small(dataset, out, **kw) -> dict:
    """Settings for a fast tiny run: 64 px, 2 images x 2 masks, 2 click iterations. Adam turns
    float noise in near-zero gradients into steps of up to lr, so equivalence tests keep lr low
    (weights move ~1e-3, noise stays ~1e-6)."""
    args = dict(data=str(dataset), out=str(out), checkpoint="none", model="tiny", image_size=64,
                batch_size=2,
                masks_per_image=2, iter_points=2, steps=3, val_every=0, log_every=1,
                progress=False, lr=1e-4)  # fmt: skip
    return {**args, **kw}


def weights(path) -> dict:
    return load_file(str(path))


# ------------------------------------------------------------------------------------------------
# Losses


def test_loss_terms_match_hand_computed_values():
    # Mask 0: logits 0 everywhere (p = 1/2), target [1, 1, 0, 0], predicted IoU 0.5.
    #   focal: positives -0.25 (1/2)^2 ln(1/2) = 0.0433217, negatives -0.75 (1/2)^2 ln(1/2) =
    #   0.1299651; mean over 4 pixels = (2 * 0.0433217 + 2 * 0.1299651) / 4 = 0.0866434.
    #   dice: 1 - (2 * 1 + 1) / (2 + 2 + 1) = 0.4. IoU: 0 > 0 is false -> empty prediction,
    #   IoU 0 -> (0.5 - 0)^2 = 0.25.
    # Mask 1: logits [ln 3, -ln 3, -ln 3, -ln 3] (p = 3/4, 1/4, 1/4, 1/4), target [1, 0, 0, 0],
    #   predicted IoU 0.9.
    #   focal: pixel 0: -0.25 (1/4)^2 ln(3/4) = 0.0044951; others: -0.75 (1/4)^2 ln(3/4) =
    #   0.0134853 each; mean = (0.0044951 + 3 * 0.0134853) / 4 = 0.0112378.
    #   dice: 1 - (2 * 3/4 + 1) / (6/4 + 1 + 1) = 1 - 2.5 / 3.5 = 0.2857143.
    #   IoU: prediction [1, 0, 0, 0] = target -> 1; (0.9 - 1)^2 = 0.01.
    l3 = math.log(3)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [l3, -l3, -l3, -l3]]).reshape(2, 1, 2, 2)
    gt = torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0]]).reshape(2, 1, 2, 2)
    iou_pred = torch.tensor([0.5, 0.9])
    loss, terms = train.sam_loss(logits, gt, iou_pred, focal_weight=20.0)
    torch.testing.assert_close(terms["focal"], torch.tensor([0.0866434, 0.0112378]), atol=1e-6,
                               rtol=0)  # fmt: skip
    torch.testing.assert_close(terms["dice"], torch.tensor([0.4, 0.2857143]), atol=1e-6, rtol=0)
    torch.testing.assert_close(terms["iou"], torch.tensor([0.25, 0.01]), atol=1e-6, rtol=0)
    per_mask = [20 * 0.0866434 + 0.4 + 0.25, 20 * 0.0112378 + 0.2857143 + 0.01]
    assert loss.item() == pytest.approx(sum(per_mask) / 2, abs=1e-5)


def test_dice_is_averaged_per_mask_not_pooled():
    # A 1-pixel mask predicted empty and a 99-pixel mask predicted perfectly: per-mask Dice loss
    # averages ~1 and ~0 to ~0.5; pooling over the batch (the official code) would give ~0.01.
    gt = torch.zeros(2, 1, 10, 10)
    gt[0, 0, 0, 0] = 1
    gt[1, 0].view(-1)[1:] = 1
    logits = (gt * 2 - 1) * 30  # confident and right, except:
    logits[0, 0, 0, 0] = -30  # the small mask is missed
    _, terms = train.sam_loss(logits, gt, torch.ones(2))
    assert terms["dice"][0].item() == pytest.approx(1 - 1 / 2, abs=1e-3)  # (0 + 1) / (0 + 1 + 1)
    assert terms["dice"][1].item() == pytest.approx(0, abs=1e-3)
    # Pooled, as the official code: 1 - (2 * 99 + 1) / (99 + 100 + 1) = 0.005; ours: 0.25.
    assert terms["dice"].mean().item() == pytest.approx(0.25, abs=1e-3)


def test_upsample_is_bilinear_interpolation():
    low = torch.randn(3, 1, 16, 12, dtype=torch.float64).float()
    ref = torch.nn.functional.interpolate(low, (64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(train.upsample(low, 64), ref, atol=1e-6, rtol=1e-5)


def test_iou_target_has_no_gradient_and_handles_empty_masks():
    logits = torch.full((2, 1, 4, 4), -5.0, requires_grad=True)
    gt = torch.zeros(2, 1, 4, 4)
    gt[1, 0, 0, 0] = 1
    iou = train.mask_iou(logits.flatten(1), gt.flatten(1))
    assert iou.tolist() == [1.0, 0.0]  # both empty counts as perfect; a miss as 0
    assert not iou.requires_grad


# ------------------------------------------------------------------------------------------------
# Recipe pieces


def test_trainable_set_is_adapters_prompt_encoder_and_decoder(capsys):
    sam = model.Sam(model.SamConfig.from_name("tiny", image_size=64))
    params = train.select_trainable(sam)
    counts = model_cli.count_parameters(sam)
    assert sum(p.numel() for p in params) == (
        counts["adapters"] + counts["prompt_encoder"] + counts["mask_decoder"]
    )
    frozen = [n for n, p in sam.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("image_encoder.") and ".Adapter." not in n for n in frozen)
    assert f"frozen image encoder {counts['encoder'] / 1e6:.3f}M" in capsys.readouterr().out


def test_lr_schedules():
    cfg = train.TrainConfig(data="x", lr=1.0, warmup_steps=4, schedule="cosine", min_lr=0.1)
    assert [train.lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.lr_at(9, cfg, 14) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert train.lr_at(14, cfg, 14) == pytest.approx(0.1)
    cfg = train.TrainConfig(data="x", lr=1.0, schedule="step", milestones=(2, 5), gamma=0.5)
    assert [train.lr_at(s, cfg, 10) for s in range(7)] == [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]


def test_iteration_plan_has_mask_only_steps_at_a_random_one_and_the_last():
    cfg = train.TrainConfig(data="x", iter_points=8)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        plan = train.plan_iterations(cfg, gen)
        assert len(plan) == 8 and plan[-1] == 0 and plan[0] != 0
        assert plan[1:-1].count(0) == 1 and set(plan) <= {0, 1, 3, 5, 9}
        seen.add(plan.index(0))
    assert seen == set(range(1, 7))  # the official randint(1, iter_points - 1) range


def test_click_iteration_prompts_are_error_clicks_and_probabilities():
    S, M = 32, 2
    gt = torch.zeros(M, S, S, dtype=torch.bool)
    gt[0, 4:12, 4:12] = True  # predicted empty: every click is a false negative (label 1)
    gt[1, 20:30, 20:30] = True
    pred = gt.clone()
    pred[1, 0:4, 0:4] = True  # one false-positive patch: every click is there, label 0
    low = torch.randn(M, 1, S // 4, S // 4)
    mb = train.Micro(images=None, gt=gt[:, None].float(), boxes=None, points=None,
                     gens=[torch.Generator().manual_seed(1)], use_box=None, low=low,
                     pred=pred & torch.tensor([False, True])[:, None, None])  # fmt: skip
    [(rows, (coords, labels), boxes, mask_input)] = train.click_groups(mb, 5)
    assert boxes is None and rows.tolist() == [0, 1]
    torch.testing.assert_close(mask_input, torch.sigmoid(low))  # probabilities, not logits
    x, y = coords[..., 0].long(), coords[..., 1].long()
    assert labels[0].tolist() == [1] * 5 and bool(gt[0, y[0], x[0]].all())
    assert labels[1].tolist() == [0] * 5 and bool((x[1] < 4).all() and (y[1] < 4).all())
    [(_, points, _, _)] = train.click_groups(mb, 0)
    assert points is None  # a mask-only iteration


def test_a_perfect_prediction_gets_padding_points_or_a_confirming_click():
    S = 16
    gt = torch.zeros(2, S, S, dtype=torch.bool)
    gt[:, 4:10, 4:10] = True
    pred = gt.clone()
    pred[1, 0, 0] = True  # mask 1 has one false-positive pixel; mask 0 is perfect
    kw = dict(images=None, gt=gt[:, None].float(), boxes=None, points=None, use_box=None,
              low=torch.zeros(2, 1, 4, 4), pred=pred)  # fmt: skip
    for no_error, want in (("pad", [-1] * 3), ("confirm", [1] * 3)):
        mb = train.Micro(gens=[torch.Generator().manual_seed(0)], no_error=no_error, **kw)
        [(_, (coords, labels), _, _)] = train.click_groups(mb, 3)
        assert labels[0].tolist() == want  # official (utils.py:93-108): -1, "not a point"
        assert labels[1].tolist() == [0] * 3 and coords[1].tolist() == [[0, 0]] * 3


def test_pooled_loss_is_the_official_loss():
    """Against official.official_loss (its hand-worked value is in test_bench.py), on random and
    on saturated logits, where the official log(p + 1e-12) form is finite and must be kept."""
    g = torch.Generator().manual_seed(0)
    gt = (torch.rand(6, 1, 16, 16, generator=g) > 0.6).float()
    iou_pred = torch.rand(6, generator=g)
    for scale in (1.0, 60.0):  # 60: sigmoid rounds to exactly 0 or 1 in float32
        logits = torch.randn(6, 1, 16, 16, generator=g) * scale
        loss, terms = train.pooled_loss(logits, gt, iou_pred)
        want = official.official_loss(logits, gt, iou_pred[:, None])
        assert torch.isfinite(loss) and float(loss) == pytest.approx(float(want), rel=1e-6)
        assert set(terms) == {"focal", "dice", "iou"} and terms["dice"].ndim == 0  # pooled


def test_step_one_prompt_is_drawn_once_per_batch_or_per_image():
    cfg = train.TrainConfig(data="x")
    gen = torch.Generator().manual_seed(0)
    kinds = [train.draw_prompts(cfg, gen)[0] for _ in range(200)]
    assert set(kinds) == {True, False} and 70 < sum(kinds) < 130  # 50/50, one bool per batch
    batch = official.synthetic_batch(8, 1, 32, seed=0)
    for box in (True, False):
        assert train.make_micro(batch, 0, 0, "cpu", box).use_box.tolist() == [box] * 8
    cfg = train.TrainConfig(data="x", prompt_choice="image")
    assert train.draw_prompts(cfg, gen)[0] is None
    mixed = train.make_micro(batch, 0, 0, "cpu", None).use_box  # each image draws its own
    assert mixed.any() and not mixed.all()


def test_point_embeddings_train_unless_frozen():
    """The official bug froze the point and padding embeddings (prompt_encoder.py:92-94); ours
    trains them by default, --freeze-point-embeddings freezes exactly those three."""
    batch = official.synthetic_batch(2, 2, 64, seed=0)
    batch["point_labels"][0, 0, 0] = 0  # a negative point too: all three embeddings are used
    for freeze in (False, True):
        tr = tiny_trainer(freeze_point_embeddings=freeze)
        named = dict(tr.sam.named_parameters())
        before = {n: p.detach().clone() for n, p in named.items()}
        train.sub_step(tr, [train.make_micro(batch, 0, 0, "cpu", box=False)], None)  # points
        changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
        point_embeddings = set(train.POINT_EMBEDDINGS)
        assert point_embeddings <= set(named)  # the names exist in model.py
        assert (changed & point_embeddings) == (set() if freeze else point_embeddings)
        assert {n for n, p in named.items() if not p.requires_grad} >= (
            point_embeddings if freeze else set())  # fmt: skip
        assert any(n.startswith("mask_decoder.") for n in changed)


# ------------------------------------------------------------------------------------------------
# Equivalence with the official training step (issue 11)


class InjectedDraws:
    """The official port's draws (official.OfficialDraws' methods) set to what our step drew: the
    prompt kind and click counts read off a copy of our generator, the clicks replayed from what
    our data.error_clicks calls returned (checked to be asked about the same prediction, unless
    check is False: a variant of ours predicts otherwise)."""

    def __init__(self, box: bool, plan: list, calls: list, B: int, check: bool = True):
        self.box, self.plan, self.calls, self.B, self.check = box, plan, list(calls), B, check
        self.n_points = self.n_clicks = 0

    def kind(self):
        return 0.75 if self.box else 0.25  # official: random() > 0.5 -> boxes

    def point_num(self, point_list):
        self.n_points += 1
        return self.plan[self.n_points - 1] or 1  # 0: a mask-only iteration (points discarded)

    def init_mask_num(self, iter_point):
        return self.plan[:-1].index(0)

    def clicks(self, masks_binary, labels, n):
        it, self.n_clicks = self.n_clicks, self.n_clicks + 1  # the clicks of iteration `it`
        if self.plan[it] == 0:  # discarded by the official code: any points do
            return np.zeros((labels.shape[0], n, 2)), -np.ones((labels.shape[0], n), np.int64)
        mine, self.calls = self.calls[: self.B], self.calls[self.B :]  # one call per image
        pred, gt = torch.cat([c[0] for c in mine]), torch.cat([c[1] for c in mine])  # (P, S, S)
        assert torch.equal(labels[:, 0] > 0.5, gt)
        # The same prediction up to pixels whose logit sits within rounding of 0 (the two
        # codes upsample in different but equal-in-exact-arithmetic ways): at most 1 in 5,000.
        flips = int(((masks_binary[:, 0] > 0.5) != pred).sum())
        assert flips <= pred.numel() // 5000 or not self.check, flips
        coords = torch.cat([c[2][0] for c in mine]).numpy()  # (P, n, 2) x, y
        return coords, torch.cat([c[2][1] for c in mine]).numpy()


def run_both(monkeypatch, **ours_cfg) -> tuple:
    """One step of ours (train.train_step) and of the official port (official.train_one_batch)
    from the same tiny weights and batch, the port's draws injected from ours. -> (our 9 losses,
    the port's, our weights, the port's, the initial weights)."""
    torch.manual_seed(0)
    sam = model.Sam(model.SamConfig.from_name("tiny", image_size=64)).train()
    ref = copy.deepcopy(sam)
    init = {n: p.detach().clone() for n, p in sam.named_parameters()}
    cfg = train.TrainConfig(data="-", checkpoint="none", model="tiny", image_size=64,
                            masks_per_image=3, seed=3, **ours_cfg)  # fmt: skip
    tr = train.cpu_trainer(sam, cfg)
    batch = official.synthetic_batch(2, 3, 64, seed=0)
    copy_gen = torch.Generator().manual_seed(0)
    copy_gen.set_state(tr.gen.get_state())
    box, plan = train.draw_prompts(cfg, copy_gen)
    calls, losses, error_clicks = [], [], data.error_clicks
    loss_fns = dict(pooled_loss=train.pooled_loss, sam_loss=train.sam_loss)

    def record_clicks(pred, gt, n, generator=None, no_error="pad"):
        out = error_clicks(pred, gt, n, generator, no_error=no_error)
        calls.append((pred.clone(), gt.clone(), out))
        return out

    def recorder(fn):
        return lambda *args, **kw: losses.append(fn(*args, **kw)) or losses[-1]

    monkeypatch.setattr(data, "error_clicks", record_clicks)
    for name, fn in loss_fns.items():
        monkeypatch.setattr(train, name, recorder(fn))
    train.train_step(tr, [batch], 0)
    ours = [loss.item() for loss, _ in losses]
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr)  # as the official: train.py:225
    draws = InjectedDraws(box, plan, calls, B=2, check=not ours_cfg)
    theirs = official.train_one_batch(ref, opt, batch, cfg.iter_points, cfg.point_choices, draws)
    assert draws.calls == [] and draws.n_clicks == cfg.iter_points  # every click replayed
    a = {n: p.detach() for n, p in sam.named_parameters()}
    return ours, theirs, a, {n: p.detach() for n, p in ref.named_parameters()}, init, plan


def test_default_step_equals_the_official_train_one_epoch_body(monkeypatch):
    """Issue 11: our default step and a line-by-line port of the official train_one_epoch body,
    same weights, batch and prompt draws: the same 9 losses and the same updated weights, fp32,
    within 1e-5 relative to each tensor's scale (measured: losses equal to the last bit, weights
    <= 2.7e-6; one Adam step moves a weight by ~1e-4 = lr, so a wrong update cannot hide).
    Attention key biases are compared to 1e-5 absolute only: their gradient is 0 in exact
    arithmetic (softmax ignores a per-query shift), so in both codes Adam turns rounding noise
    (~1e-10) into steps of a few 1e-6."""
    ours, theirs, a, b, init, plan = run_both(monkeypatch)
    assert len(ours) == len(theirs) == 9 and plan.count(0) == 2
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    moved = 0
    for n in a:
        tol = 1e-5 if n.endswith("k_proj.bias") else 1e-5 * float(b[n].abs().max())
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=tol, msg=n)
        moved += float((b[n] - init[n]).abs().max()) > 50 * tol
    assert moved > 40  # adapters, prompt encoder, decoder moved well beyond the tolerance


def test_our_variants_differ_from_the_official_step(monkeypatch):
    """The equivalence test can fail: our per-mask loss (its losses) and our gradient clipping
    (the same losses in step 1, other weights after it) move away from the port."""
    ours, theirs, *_ = run_both(monkeypatch, loss="per-mask")
    assert abs(ours[0] - theirs[0]) > 1e-3 * abs(theirs[0])
    monkeypatch.undo()
    ours, theirs, a, b, *_ = run_both(monkeypatch, grad_clip=1e-3)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5) and ours[1:] != pytest.approx(theirs[1:])
    assert any(not torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-8) for n in a)


# ------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_overfit_learns(dataset, tmp_path):
    """Random weights score far below the threshold; 80 steps on 4 images pass it. Masks drawn
    without replacement: with the official draws (with replacement) half the items show one of
    an image's two masks twice, and this tiny random-init model then learns to ignore the prompt
    (measured, seeds 0, 1, 2: best 0.45, 0.45, 0.33; without replacement 0.90, 0.91, 0.91)."""
    for seed in (0, 1):
        cfg = train.TrainConfig(**small(dataset, tmp_path / "r0", seed=seed))
        sam = train.build_model(cfg, torch.device("cpu"))
        assert train.validate(sam, cfg)["score"] < 0.4
    run = tmp_path / "run"
    res = train.main(small(dataset, run, steps=80, val_every=80, iter_points=3, lr=2e-3,
                           mask_sampling="without"))  # fmt: skip
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert res["best"] > 0.75 and res["last"]["val"]["dice"]["box"] > 0.75
    best = model.load_checkpoint(run / "best.safetensors", verbose=False)
    assert best.cfg.name == "tiny" and best.cfg.image_size == 64


def tiny_trainer(**kw) -> train.Trainer:
    torch.manual_seed(0)
    sam = model.Sam(model.SamConfig.from_name("tiny", image_size=64)).train()
    cfg = train.TrainConfig(data="-", checkpoint="none", model="tiny", image_size=64,
                            **{"iter_points": 2, **kw})  # fmt: skip
    return train.cpu_trainer(sam, cfg)


def test_micro_batches_give_the_gradient_of_the_full_batch():
    """Adam hides a constant gradient scale, so compare the gradients themselves. The per-mask
    loss decomposes over micro-batches; the official one pools over each micro-batch."""
    tr = tiny_trainer(loss="per-mask")
    grads = []
    tr.optimizer_step = lambda: grads.append(
        [p.grad.clone() for p in tr.params if p.grad is not None]
    )
    batch = official.synthetic_batch(4, 3, 64, seed=0)
    halves = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
    for parts in ([batch], halves):
        micros = [train.make_micro(b, 0, 0, tr.device) for b in parts]
        train.sub_step(tr, micros, None)
        for p in tr.params:
            p.grad = None
        kinds = torch.cat([m.use_box for m in micros])
        assert kinds.any() and not kinds.all()  # both prompt kinds, split across the micros
    assert len(grads[0]) == len(grads[1]) > 10
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_step_one_trains_adapters_then_iterations_train_the_decoder_alone():
    tr = tiny_trainer()
    names = {id(p): n for n, p in tr.sam.named_parameters()}
    with_grad = []
    step = tr.optimizer_step

    def record():
        with_grad.append({names[id(p)].split(".")[0] + (".Adapter" * (".Adapter." in names[id(p)]))
                          for p in tr.params if p.grad is not None})  # fmt: skip
        step()

    tr.optimizer_step = record
    train.train_step(tr, [official.synthetic_batch(2, 3, 64, seed=0)], 0)
    assert len(with_grad) == 1 + 2  # step 1 + iter_points optimizer steps
    assert with_grad[0] == {"image_encoder.Adapter", "prompt_encoder", "mask_decoder"}
    assert all(g == {"mask_decoder"} for g in with_grad[1:])


def test_the_trained_output_is_saved_for_inference(tmp_path):
    """A --no-multimask run's checkpoints say so (SamConfig.single_mask), and infer.py then uses
    the single-mask output unless told otherwise; a multimask run's checkpoints (also a multimask
    fine-tune of a single-mask one) keep the official best-of-3."""
    start = tmp_path / "single.safetensors"
    for multimask, name in ((False, "single"), (True, "multi")):
        tr = tiny_trainer(multimask=multimask)
        if multimask:  # a fine-tune that starts from the single-mask checkpoint saved below
            sam = model.load_checkpoint(start, verbose=False).train()
            assert sam.cfg.single_mask
            tr = train.cpu_trainer(sam, tr.cfg)
        path = tmp_path / f"{name}.safetensors"
        model.save_checkpoint(tr.sam, path)
        assert model.load_checkpoint(path, verbose=False).cfg.single_mask is not multimask
        cfg = infer.InferConfig(checkpoint=str(path), dtype="float32")
        infer.load_model(cfg)
        assert cfg.multimask is multimask
        for forced in (True, False):
            cfg = infer.InferConfig(checkpoint=str(path), dtype="float32", multimask=forced)
            infer.load_model(cfg)
            assert cfg.multimask is forced
    sam = model.load_checkpoint(start, verbose=False)  # the Python API follows it too
    box = torch.tensor([[8.0, 6.0, 40.0, 50.0]])
    with torch.no_grad():
        emb = sam.encode(torch.randn(1, 3, 64, 64))
        got = infer._decode_best(sam, emb, boxes=box)[0]
        assert torch.equal(got, infer._decode_best(sam, emb, boxes=box, multimask=False)[0])
        assert not torch.equal(got, infer._decode_best(sam, emb, boxes=box, multimask=True)[0])


def test_single_mask_option_trains_and_validates_token_0(dataset):
    """--no-multimask (MedSAM/LiteMedSAM's training): the loss sees the single-mask output, so
    only token 0's hypernetwork gets a non-zero gradient; the official default never trains it.
    Validation scores the same output as infer.py --single-mask."""
    heads = {}
    for multimask in (True, False):
        tr = tiny_trainer(multimask=multimask)
        names = {id(p): n for n, p in tr.sam.named_parameters()}
        seen, step = set(), tr.optimizer_step

        def record(step=step, seen=seen, names=names, tr=tr):
            seen.update(int(names[id(p)].split(".")[2]) for p in tr.params
                        if "output_hypernetworks_mlps" in names[id(p)] and p.grad is not None
                        and p.grad.abs().sum() > 0)  # fmt: skip
            step()

        tr.optimizer_step = record
        train.train_step(tr, [official.synthetic_batch(2, 3, 64, seed=0)], 0)
        heads[multimask] = seen
    assert heads[False] == {0}
    assert 0 not in heads[True] and heads[True] <= {1, 2, 3} and heads[True]
    # Forward returns token 0's logits and predicted IoU, unselected
    tr = tiny_trainer(multimask=False)
    mb = train.make_micro(official.synthetic_batch(2, 3, 64, seed=0), 0, 0, tr.device, box=True)
    with torch.no_grad():
        emb, low, iou = tr.forward(train.first_groups(mb), images=mb.images)
        want_low, want_iou = tr.sam.decode(emb.repeat_interleave(3, 0), boxes=mb.boxes,
                                           multimask=False)  # fmt: skip
    torch.testing.assert_close(low, want_low)
    torch.testing.assert_close(iou, want_iou[:, 0])
    cfg = train.TrainConfig(data=str(dataset), checkpoint="none", model="tiny", image_size=64,
                            multimask=False)  # fmt: skip
    got = train.validate(tr.sam, cfg)["dice"]
    want = infer.evaluate(tr.sam, dataset, prompt_modes=("box", 1, 3, 5), split="val",
                          multimask=False)["dice"]  # fmt: skip
    assert got == pytest.approx({k: float(v) for k, v in want.items()})


@pytest.mark.slow
def test_grad_accumulation_matches_the_full_batch(dataset, tmp_path):
    # the per-mask loss: the official one pools over each micro-batch, so it differs
    train.main(small(dataset, tmp_path / "a", batch_size=2, loss="per-mask"))
    train.main(small(dataset, tmp_path / "b", batch_size=2, grad_accum=2, loss="per-mask"))
    a, b = (
        weights(tmp_path / "a" / "last.safetensors"),
        weights(tmp_path / "b" / "last.safetensors"),
    )
    for k in a:
        # Attention key biases get a gradient that is 0 in exact arithmetic (softmax ignores a
        # per-query shift), so Adam turns rounding noise into steps of up to lr: compared to lr.
        atol = 1e-4 if k.endswith("k_proj.bias") else 2e-5
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_resume_continues_exactly(dataset, tmp_path):
    train.main(small(dataset, tmp_path / "straight", steps=5))
    # Loading in a worker process changes nothing either: items are seeded by (seed, epoch, index).
    train.main(small(dataset, tmp_path / "split", steps=5, stop_after=2, workers=1))
    state = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["batch_in_epoch"] == 0 and state["epoch"] == 1
    train.main(dict(resume=str(tmp_path / "split")))
    a = weights(tmp_path / "straight" / "last.safetensors")
    b = weights(tmp_path / "split" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s1 = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)
    s2 = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    assert s1["step"] == s2["step"] == 5 and torch.equal(s1["generator"], s2["generator"])
    with pytest.raises(ValueError, match="cannot change"):
        train.main(dict(resume=str(tmp_path / "split"), lr=1.0))


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_amp_runs_the_model_in_the_autocast_dtype_and_the_loss_in_float32(amp, monkeypatch):
    tr = tiny_trainer(amp=amp)
    dtypes = []  # the mask decoder's logits at every call (step 1 decodes boxes and points apart)
    tr.sam.mask_decoder.register_forward_hook(lambda mod, inp, out: dtypes.append(out[0].dtype))
    losses, pooled_loss = [], train.pooled_loss

    def record(*args, **kw):
        losses.append(pooled_loss(*args, **kw))
        return losses[-1]

    monkeypatch.setattr(train, "pooled_loss", record)
    before = [p.detach().clone() for p in tr.params]
    res = train.train_step(tr, [official.synthetic_batch(2, 2, 64, seed=0)], 0)
    want = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert len(losses) == 3 and set(dtypes) == {want}  # step 1 + 2 iterations, all autocast
    assert all(loss.dtype == torch.float32 for loss, _ in losses) and math.isfinite(res["loss"])
    assert tr.scaler.is_enabled() == (amp == "fp16")  # fp16 gradients go through a GradScaler
    if amp == "fp16":
        assert tr.scaler.get_scale() > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params, strict=True))


def run_cli(*args, env=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip


@pytest.mark.slow
def test_two_gloo_processes_match_one(dataset, tmp_path):
    # the per-mask loss: the official one pools over each process's masks (as the official
    # code pools over its one process's batch), so 2 processes differ from 1 by design
    flags = ["--data", str(dataset), "--checkpoint", "none", "--model", "tiny", "--image-size",
             "64", "--batch-size", "2", "--masks-per-image", "2", "--iter-points", "2", "--steps",
             "3", "--val-every", "0", "--lr", "1e-4", "--no-progress", "--log-every", "1",
             "--loss", "per-mask"]  # fmt: skip
    ddp = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "train.py", *flags, "--out", str(tmp_path / "ddp"))  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train.main(small(dataset, tmp_path / "one", loss="per-mask"))
    a, b = (
        weights(tmp_path / "one" / "last.safetensors"),
        weights(tmp_path / "ddp" / "last.safetensors"),
    )
    moved = 0
    init = train.build_model(train.TrainConfig(**small(dataset, tmp_path)), "cpu").state_dict()
    for k in a:
        atol = 1e-4 if k.endswith("k_proj.bias") else 2e-5  # see the grad_accum test
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)
        moved += not torch.equal(a[k], init[k])
    assert moved > 20  # training changed the weights, so the comparison means something
    logs = [[json.loads(x)["loss"] for x in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("one", "ddp")]  # fmt: skip
    np.testing.assert_allclose(logs[0], logs[1], rtol=1e-4)


@pytest.mark.slow
def test_cli_reports_bad_flags_and_data_in_one_line(dataset, tmp_path):
    out = tmp_path / "never"
    r = run_cli("train.py", "--data", str(dataset), "--amp", "fp8", "--out", str(out))
    assert r.returncode == 2 and "--amp" in r.stderr and "fp8" in r.stderr
    r = run_cli("train.py", "--data", str(dataset), "--batch-size", "0", "--out", str(out))
    assert r.returncode == 2 and "batch_size" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train.py", "--data", str(tmp_path / "missing"), "--out", str(out))
    assert r.returncode == 2 and "missing" in r.stderr and "image2label_train.json" in r.stderr
    assert not out.exists()


def test_bad_settings_and_unreadable_data_fail_before_any_work(dataset, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="batch_size"):
        train.main(small(dataset, out, batch_size=0))
    bad = make_dataset(tmp_path / "bad", n=2)
    first = next(iter(json.loads((bad / "image2label_train.json").read_text())))
    (bad / first).write_bytes(b"not a png")
    with pytest.raises(ValueError, match=Path(first).name):
        train.main(small(bad, out))
    assert not out.exists()
    with pytest.raises(ValueError, match="batch size 3"):
        train.main(small(dataset, out, batch_size=3, grad_accum=2))
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="resume"):
        train.main(dict(resume=str(tmp_path / "nothing")))
    foreign = tmp_path / "foreign"  # a state.pt from another program (or version)
    foreign.mkdir()
    torch.save({"config": {"not_a_setting": 1}}, foreign / "state.pt")
    (foreign / "last.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"state\.pt: not a training state .*not_a_setting"):
        train.main(dict(resume=str(foreign)))


@pytest.mark.slow
def test_compile_matches_eager(dataset, tmp_path):
    flags = ["--data", str(dataset), "--checkpoint", "none", "--model", "tiny", "--image-size",
             "64", "--batch-size", "2", "--masks-per-image", "2", "--iter-points", "2", "--steps",
             "2", "--val-every", "0", "--lr", "1e-4", "--no-progress", "--log-every",
             "1"]  # fmt: skip
    r = run_cli("train.py", *flags, "--compile", "--out", str(tmp_path / "compiled"))
    assert r.returncode == 0, r.stderr[-3000:]
    train.main(small(dataset, tmp_path / "eager", steps=2))
    logs = [[json.loads(x)["loss"] for x in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("eager", "compiled")]  # fmt: skip
    np.testing.assert_allclose(logs[0], logs[1], rtol=1e-3)
    sam = model.load_checkpoint(tmp_path / "compiled" / "last.safetensors", verbose=False)
    assert sam.cfg.name == "tiny"  # saved uncompiled: plain parameter names, strict load


def test_a_save_killed_midway_leaves_the_previous_state(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train.main(small(dataset, run, steps=2))
    before = (run / "state.pt").read_bytes()
    tr, state = train.setup(dict(resume=str(run)))

    def dies_halfway(obj, f):
        Path(f).write_bytes(before[: len(before) // 2])
        raise KeyboardInterrupt  # the process is killed while writing

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        runs.save_state(tr, 3, (state["best"], None), state["steps_per_epoch"])
    assert (run / "state.pt").read_bytes() == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 2


# ------------------------------------------------------------------------------------------------
# Defaults, console output and config.json (issue 12)


def test_an_empty_val_split_is_refused_before_any_step(tmp_path):
    root = make_dataset(tmp_path / "data", n=2)
    (root / "label2image_val.json").write_text("{}")  # 3 cases split 0.8/0.1/0.1: no val case
    out = tmp_path / "never"
    want = r"label2image_val\.json: the val split lists no masks.*--val-data.*--val-every 0"
    with pytest.raises(ValueError, match=want):
        train.main(small(root, out, val_every=5))
    assert not out.exists()  # refused before any work, not at the first validation
    assert train.main(small(root, out, steps=1))["best_step"] is None  # --val-every 0 trains


def test_checkpoint_default_is_infers_and_random_init_is_explicit():
    assert runs.checkpoint_file(train.TrainConfig(data="x")) == checkpoints.default_checkpoint()
    assert (
        runs.checkpoint_file(train.TrainConfig(data="x", checkpoint="none", model="tiny")) is None
    )
    with pytest.raises(ValueError, match="--model is for --checkpoint none"):
        train.TrainConfig(data="x", model="tiny")  # would silently be ignored otherwise
    with pytest.raises(ValueError, match="--checkpoint none .* needs --model"):
        train.TrainConfig(data="x", checkpoint="none")


def test_validation_and_a_summary_reach_the_console_and_config_records_what_ran(
    dataset, tmp_path, capsys
):
    run = tmp_path / "run"
    res = train.main(small(dataset, run, steps=2, val_every=2, val_limit=2))
    out = capsys.readouterr().out
    line = r"validation Dice box [\d.]+  1pt [\d.]+  3pt [\d.]+  5pt [\d.]+  mean [\d.]+"
    assert re.search(rf"^step 0: {line}  \(best so far", out, flags=re.M)  # the starting point
    assert re.search(rf"^step 2: {line}  \(best", out, flags=re.M)
    assert f"trained steps 0..2 of 2; in {run}:" in out
    assert re.search(rf"best.safetensors  validation score {res['best']:.4f} .* at step "
                     rf"{res['best_step']}\n", out)  # fmt: skip
    ran = json.loads((run / "config.json").read_text())
    assert ran["model"] == "tiny" and ran["image_size"] == 64 and ran["steps"] == 2
    assert ran["epochs"] is None and ran["checkpoint_file"] == "none (random init)"
    assert ran["loss"] == "official" and ran["grad_clip"] == 0.0


def test_best_can_be_the_untouched_start(dataset, tmp_path, monkeypatch):
    """When every later validation scores below step 0's, best.safetensors is the starting model,
    bit for bit, and the summary says step 0 (scores injected: a run that makes the model worse,
    as fine-tuning LiteMedSAM on a few slices with the official recipe does, docs/train.md)."""
    scores = iter([0.6, 0.3, 0.2])
    monkeypatch.setattr(train, "validate", lambda sam, cfg: dict(
        dice={"box": (s := next(scores))}, score=s, n_masks=1))  # fmt: skip
    run = tmp_path / "run"
    res = train.main(small(dataset, run, steps=2, val_every=1, lr=1e-2))
    assert res["best_step"] == 0 and res["best"] == 0.6
    start = train.build_model(train.TrainConfig(**small(dataset, run)), torch.device("cpu"))
    best, last = weights(run / "best.safetensors"), weights(run / "last.safetensors")
    assert best.keys() == start.state_dict().keys()
    for k, v in start.state_dict().items():
        torch.testing.assert_close(best[k], v, rtol=0, atol=0)
    assert any(not torch.equal(last[k], v) for k, v in start.state_dict().items())


@pytest.mark.slow
def test_training_starts_from_litemedsam_by_default(dataset, tmp_path):
    run = tmp_path / "run"
    args = dict(small(dataset, run, steps=1, iter_points=1), image_size=256)
    del args["checkpoint"], args["model"]
    train.main(args)
    ran = json.loads((run / "config.json").read_text())
    assert ran["model"] == "lite_medsam" and ran["checkpoint_file"].endswith("lite_medsam.pth")
    assert ran["steps"] == 1 and ran["epochs"] is None
    r = run_cli("train.py", "--help")
    assert "none: random init" in " ".join(r.stdout.split()) and "LiteMedSAM" in r.stdout


# ------------------------------------------------------------------------------------------------
# The run directory (issue 13.7)


def dead_pid() -> int:
    """The id of a process that has exited (what a killed run's temp file names)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def loss_steps(run: Path) -> list:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if '"loss"' in x]


def test_a_fresh_run_refuses_a_non_empty_directory_unless_forced(dataset, tmp_path):
    run = tmp_path / "run"
    train.main(small(dataset, run, steps=1))
    with pytest.raises(FileExistsError, match=r"not empty \(.*state\.pt.*--resume .*--force"):
        train.main(small(dataset, run, steps=2))
    (run / "notes.txt").write_text("mine")
    train.main(small(dataset, run, steps=2, force=True))
    assert loss_steps(run) == [1, 2]  # the old run's log is gone, not appended to
    assert (run / "notes.txt").read_text() == "mine"  # --force removes run files only


def test_resume_names_the_missing_file_and_temp_files_are_cleaned(dataset, tmp_path):
    run = tmp_path / "run"
    train.main(small(dataset, run, steps=1))
    # what a kill during the first state.pt write leaves: the models, a temp file, no state.pt
    (run / "state.pt").unlink()
    tmp = run / f".state.pt.{dead_pid()}.tmp.pt"
    tmp.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"state\.pt is missing \(last\.safetensors is "
                       r"there\).*nothing to resume.*--force"):  # fmt: skip
        train.main(dict(resume=str(run)))
    train.main(small(dataset, run, steps=1, force=True))  # starting over removes the temp file
    assert not tmp.exists() and (run / "state.pt").is_file()
    (run / "last.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"cannot resume: last\.safetensors missing"):
        train.main(dict(resume=str(run)))
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        train.main(dict(resume=str(tmp_path / "nothing")))


def test_resume_drops_the_log_lines_after_the_saved_step(dataset, tmp_path):
    run = tmp_path / "run"
    train.main(small(dataset, run, steps=4, stop_after=2))
    with open(run / "log.jsonl", "a") as f:  # a killed run logged steps 3 and 4, saved neither
        f.write(json.dumps(dict(step=3, loss=1.0)) + "\n" + json.dumps(dict(step=4, loss=1.0)))
        f.write("\n" + '{"step": 5, "lo')  # and was killed while appending
    train.main(dict(resume=str(run)))
    assert loss_steps(run) == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_killed_run_resumes_with_its_log_trimmed_and_temp_files_cleaned(dataset, tmp_path):
    """kill -9 between two saves (a real process), then --resume: each step is logged once."""
    run = tmp_path / "run"
    flags = ["--data", str(dataset), "--checkpoint", "none", "--model", "tiny", "--image-size",
             "64", "--batch-size", "2", "--masks-per-image", "2", "--iter-points", "2", "--steps",
             "400", "--val-every", "5", "--val-limit", "1", "--log-every", "1",
             "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *flags, "--out", str(run)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline, saved, logged = time.monotonic() + 300, 0, []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            if (run / "state.pt").is_file() and (run / "log.jsonl").is_file():
                saved = torch.load(run / "state.pt", weights_only=True)["step"]
                logged = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text()
                          .splitlines() if x.endswith("}") and '"loss"' in x]  # fmt: skip
                if saved >= 5 and logged and logged[-1] >= saved + 2:
                    break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    saved = torch.load(run / "state.pt", weights_only=True)["step"]
    assert saved >= 5 and max(loss_steps(run)) > saved, "no kill between two saves"
    (run / f".last.safetensors.{dead_pid()}.tmp.safetensors").write_bytes(b"half")
    r = run_cli("train.py", "--resume", str(run), "--stop-after", "2", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropped" in r.stdout and "removed temp files of a killed run" in r.stdout
    assert loss_steps(run) == list(range(1, saved + 3))  # each step once, in order
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
