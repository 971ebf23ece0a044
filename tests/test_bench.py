"""Tests for bench.py (the timing helper and the three benchmarks on the tiny preset, one repeat)
and official.py (the ports of the official code: what they compute, checked against our flow on
the same weights and against hand-worked values)."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
import infer
import model
import model_cli
import official

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(image_size=256) -> model.Sam:
    torch.manual_seed(0)
    return model.Sam(model.SamConfig.from_name("tiny", image_size=image_size)).eval()


# ------------------------------------------------------------------------------------------------
# The timing helper


def test_time_runs_times_each_run_after_untimed_warmups():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        time.sleep(0.02 if len(calls) <= 2 else 0.005)  # the two warm-ups are the slow ones

    t = bench.time_runs(fn, runs=3, warmup=2)
    assert len(calls) == 5 and t.runs == 3
    assert 0.005 <= t.min <= t.median <= t.max < 0.02  # the slow warm-ups were not timed
    with pytest.raises(ValueError, match="runs must be at least 1"):
        bench.time_runs(fn, runs=0)


def test_peak_rss_sees_an_allocation():
    with bench.PeakRSS() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    assert mem.delta_mb > 48


# ------------------------------------------------------------------------------------------------
# Encoder latency


LINE = re.compile(
    r"^tiny@128 adapter=True kernels=reference threads=1: encoder median (\d+) ms "
    r"\(min (\d+), max (\d+), 2 runs\)$"
)


def test_encoder_latency_prints_the_model_bench_line(capsys):
    res = bench.encoder_latency("tiny", 128, kernels="reference", runs=2, warmup=0, threads=1)
    m = LINE.match(capsys.readouterr().out.strip())
    assert m, "the line `python model.py bench` prints"
    assert [int(v) for v in m.groups()] == [
        round(res[k] * 1e3) for k in ("median_s", "min_s", "max_s")
    ]
    assert res["min_s"] <= res["median_s"] <= res["max_s"] and res["runs"] == 2


def test_encoder_cli_prints_parameter_counts_then_latency(capsys):
    bench.main(bench.parse_args(["encoder", "tiny", "--image-size", "64", "--runs", "1",
                                 "--warmup", "0"]))  # fmt: skip
    first, second = capsys.readouterr().out.strip().splitlines()
    counts = model_cli.count_parameters(model.Sam(model.SamConfig.from_name("tiny", image_size=64)))
    assert first == "parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert second.startswith("tiny@64 adapter=True kernels=auto threads=")


# ------------------------------------------------------------------------------------------------
# Inference: the SammedPredictor port against our flow, then the benchmark


def test_predictor_port_gives_our_embedding_and_masks():
    """Above 256 px both flows resize nearest, so the embedding is ours; the masks of five boxes
    (each decoded alone, best of three, upsampled) are the masks of our batched decode."""
    sam = tiny()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)
    with torch.no_grad():
        emb, geom = infer.encode_image(sam, image)
        np.testing.assert_allclose(official.predictor_encode(sam, image), emb, atol=1e-5)
        boxes = np.array([[10, 20, 150, 200], [100, 30, 270, 120], [0, 0, 279, 299],
                          [40, 150, 90, 290], [200, 200, 260, 260]], dtype=float)  # fmt: skip
        port = official.predictor_decode(sam, emb, (300, 280), boxes)  # (5, 1, H, W)
        ours = infer.decode_prompts(sam, emb, geom, [infer.Prompt(box=b) for b in boxes.tolist()])
    assert port.shape == (5, 1, 300, 280)
    assert 0.05 < port.mean() < 0.95  # the random weights give masks with both values
    # The official threshold is sigmoid > 0.5, ours logit > 0: in float32 sigmoid(x) rounds to
    # 0.5 for 0 < x < ~1.2e-7, so such pixels are foreground for us and background for it.
    differ = port[:, 0].bool().numpy() != ours.masks
    assert differ.sum() < 10 and (np.abs(ours.logits[differ]) < 1.2e-7).all()


def test_infer_latency_on_tiny():
    res = bench.infer_latency("tiny", size=64, repeats=1, counts=(1, 2))
    assert res["preset"] == "tiny" and res["image"] == "64x64"
    assert "decode_s" not in res["ours_reference_encoder"]
    for flow in ("ours", "official"):
        r = res[flow]
        assert set(r["decode_s"]) == {1, 2}
        assert all(0 < lo <= med for lo, med in [r["encode_s"], *r["decode_s"].values()])
        assert r["one_box_s"] == r["encode_s"][0] + r["decode_s"][1][0]
        assert r["per_extra_prompt_s"] == pytest.approx(r["decode_s"][2][0] - r["decode_s"][1][0])
    with pytest.raises(ValueError, match="must be positive"):
        bench.infer_latency("tiny", size=0)


@pytest.mark.slow
def test_infer_cli_prints_json(tmp_path):
    out = subprocess.run(
        [sys.executable, "bench.py", "infer", "--bench-preset", "tiny", "--size", "64",
         "--repeats", "1", "--counts", "1", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    res = json.loads(out)
    assert set(res["official"]["decode_s"]) == {"1", "3"} and res["preset"] == "tiny"


# ------------------------------------------------------------------------------------------------
# Training: the ported pieces, then the benchmark


def test_official_loss_hand_worked():
    """Logits 0 (p = 1/2) on 8 pixels, 4 of them foreground: focal = 1/8 * 1/4 * ... worked out
    below; Dice 1 - (2 * 2 + 1) / (4 + 4 + 1) = 4/9; soft IoU 2 / (4 + 4 - 2) = 1/3."""
    masks = torch.zeros(2, 1, 2, 2)
    labels = torch.tensor([1.0, 1, 0, 0, 1, 0, 1, 0]).reshape(2, 1, 2, 2)
    # each pixel: -alpha_or_(1-alpha) * (1/2)^2 * log(1/2); mean over 8 = (0.25 + 0.75) / 2 / 4 ln 2
    focal = (0.25 + 0.75) / 2 * 0.25 * np.log(2)
    want = 20 * focal + 4 / 9 + (1 / 3 - 0.5) ** 2
    got = official.official_loss(masks, labels, torch.full((2, 1), 0.5))
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_train_decode_picks_the_best_of_three_and_upsamples():
    sam = tiny(64)
    with torch.no_grad():
        emb = sam.encode(torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    boxes = torch.tensor([[4.0, 4, 40, 40], [10, 0, 63, 30], [0, 20, 30, 63]])
    prompt = dict(point_coords=None, point_labels=None, boxes=boxes, mask_inputs=None)
    with torch.no_grad():
        masks, low, iou = official.train_decode(sam, emb, prompt, True, 64)
        want_low, want_iou = model.select_best(*sam.decode(emb, boxes=boxes))
    torch.testing.assert_close(low, want_low)
    torch.testing.assert_close(iou, want_iou[:, None])
    want = F.interpolate(want_low, (64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(masks, want)


def test_official_points_clicks_errors_with_their_true_labels():
    gt = torch.zeros(2, 1, 16, 16)
    gt[:, :, 4:12, 4:12] = 1
    logits = torch.full((2, 1, 16, 16), -10.0)
    logits[0, :, 0:8, 0:8] = 10  # mask 0: overlaps the truth in part
    logits[1] = torch.where(gt[1] > 0, 10.0, -10.0)  # mask 1: right everywhere
    low = torch.randn(2, 1, 4, 4)
    prompt = dict(point_coords=None, point_labels=None, boxes=torch.zeros(2, 4), mask_inputs=None)
    out = official.official_points(logits, gt, low, prompt, 9, np.random.default_rng(0))
    assert out["point_coords"].shape == (2, 9, 2) and out["boxes"] is None
    torch.testing.assert_close(out["mask_inputs"], torch.sigmoid(low))
    pred = logits[0, 0] > 0
    coords, labels = out["point_coords"][0].tolist(), out["point_labels"][0].tolist()
    for (x, y), label in zip(coords, labels, strict=True):
        assert pred[y, x] != (gt[0, 0, y, x] > 0)  # (x, y) = (column, row), in the error region
        assert label == int(gt[0, 0, y, x])  # a missed pixel 1, a false one 0
    assert out["point_labels"][1].tolist() == [-1] * 9  # no error: random padding points


def test_official_step_trains_the_decoder_not_the_frozen_encoder():
    sam = tiny(64).train()
    before = {n: p.detach().clone() for n, p in sam.named_parameters()}
    opt = torch.optim.Adam(sam.parameters(), lr=1e-3)
    batch = official.synthetic_batch(1, 2, 64, seed=0)
    loss = official.official_step(sam, opt, batch, 3, (1, 3), np.random.default_rng(0))
    assert np.isfinite(loss)
    changed = {n for n, p in sam.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n in changed if ".Adapter." in n}
    assert adapters == {n for n in before if ".Adapter." in n}  # step 1 trains the adapters
    assert {n.split(".")[0] for n in changed - adapters} == {"prompt_encoder", "mask_decoder"}


@pytest.mark.slow
def test_train_step_on_tiny(capsys):
    """Both variants, one timed step each after the warm-up; then the CLI's lines."""
    res = bench.train_step("tiny", runs=1)
    assert set(res) == {"official", "ours"}
    assert all(len(rows) == 1 and rows[0][0] > 0 and rows[0][1] >= 0 for rows in res.values())
    bench.train_step_cli("tiny", 1, "ours")
    out = capsys.readouterr().out
    assert re.search(r"^ours +step median [\d.]+ s \(min [\d.]+, 1 runs\), peak RSS \+\d+ MiB", out,
                     flags=re.M)  # fmt: skip
    assert "process peak RSS" in out and "official" not in out
