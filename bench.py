"""Benchmarks: the encoder, inference (ours against the official predictor flow) and one training
step (ours against the official step), each timed with the one helper `time_runs`.

    python bench.py encoder vit_b --image-size 256 [--kernels reference] [--runs 7]
    python bench.py infer [--preset vit_b] [--size 512] [--repeats 5] [--checkpoint FILE]
    python bench.py train [--preset vit_b] [--runs 3] [--only official|ours]
    python bench.py prompts [--counts 1 10 100 1000] [--size 6000] [--preset tiny]
    python bench.py precision [--presets lite_medsam vit_b] [--runs 5] [--threads 2] [--no-onnx]
                              [--ablate]

`python model.py bench`, `python infer.py --bench` and `python train.py --bench` call the same
functions. The official side is official.py (line-by-line ports run on our modules), so both sides
of a comparison share weights and process. The measured figures, with their commands, commit and
date, are in docs/measurements.md. Nothing imports this module except those CLI branches.
"""

import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import statistics
import threading
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import infer
import model
import model_cli
import official
import train

# ------------------------------------------------------------------------------------------------
# The timing helper
# ------------------------------------------------------------------------------------------------


class Times(NamedTuple):
    """Wall seconds over the timed runs. The minimum is the figure least disturbed by other
    processes on a shared machine; the median is reported beside it."""

    min: float
    median: float
    max: float
    runs: int


def time_runs(fn, runs: int, warmup: int = 0) -> Times:
    """Call fn() `warmup` times untimed, then `runs` times timed with perf_counter."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Times(min(times), statistics.median(times), max(times), runs)


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self):
        gc.collect()
        try:  # glibc: hand freed memory back to the OS so the baseline is fair
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (macOS, musl): baseline includes free lists
            pass
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.delta_mb = (self.peak - self.base) / 2**20

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------
# Encoder latency (python bench.py encoder; python model.py bench)
# ------------------------------------------------------------------------------------------------


def parameters_line(sam: model.Sam) -> str:
    counts = model_cli.count_parameters(sam)
    return "parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())


@torch.inference_mode()
def encoder_latency(
    name, image_size=256, adapter=None, kernels="auto", runs=7, warmup=2, threads=None
) -> dict:
    """Encoder latency of one random (1, 3, S, S) image on random weights; prints one line.
    adapter None: the preset's (on for the ViTs, off for lite_medsam). threads: torch's intra-op
    threads for the measurement (None: as they are)."""
    overrides = {} if adapter is None else {"adapter": adapter}
    cfg = model.SamConfig.from_name(name, image_size=image_size, kernels=kernels, **overrides)
    sam = model.Sam(cfg).eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        x = torch.randn(1, 3, cfg.image_size, cfg.image_size)  # (1, 3, S, S)
        t = time_runs(lambda: sam.encode(x), runs, warmup)
        res = dict(name=cfg.name, image_size=cfg.image_size, adapter=cfg.adapter,
                   kernels=cfg.kernels, threads=torch.get_num_threads(), runs=runs,
                   min_s=t.min, median_s=t.median, max_s=t.max)  # fmt: skip
    finally:
        torch.set_num_threads(before)
    print(
        f"{res['name']}@{res['image_size']} adapter={res['adapter']} kernels={res['kernels']} "
        f"threads={res['threads']}: encoder median {t.median * 1e3:.0f} ms "
        f"(min {t.min * 1e3:.0f}, max {t.max * 1e3:.0f}, {runs} runs)"
    )
    return res


# ------------------------------------------------------------------------------------------------
# Inference latency (python bench.py infer; python infer.py --bench): our flow against the
# official SammedPredictor flow (official.predictor_encode / predictor_decode)
# ------------------------------------------------------------------------------------------------


def _slope(x, y) -> float:
    return float(np.polyfit(x, y, 1)[0]) if len(x) > 1 else float("nan")


@torch.inference_mode()
def infer_latency(preset="vit_b", size=512, repeats=5, counts=(1, 2, 4, 8), checkpoint=None):
    """Seconds (min and median of `repeats`) for one size x size image: the encoder pass
    (preprocessing included) and the decoding of 1..8 box prompts (postprocessing to the original
    size included), for ours (fast kernels, batched decode), ours on the reference encoder, and
    the official flow (reference encoder, per-prompt decode). Random weights unless a checkpoint
    is given (the timing does not depend on them). -> dict, printed as JSON by the CLI."""
    if size < 1 or repeats < 1 or not counts or min(counts) < 1:
        raise ValueError(
            f"size, repeats and counts must be positive, got {size}, {repeats}, {counts}"
        )
    if checkpoint:
        from checkpoints import resolve_checkpoint

        sam = model.load_checkpoint(resolve_checkpoint(checkpoint))
    else:
        sam = model.Sam(model.SamConfig.from_name(preset, image_size=256, adapter=True)).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    xy = rng.uniform(0, size / 2, (max(counts), 2))
    boxes = np.array([[x, y, x + size / 3, y + size / 3] for x, y in xy.tolist()])  # (n, 4)
    prompts = [infer.Prompt(box=b) for b in boxes.tolist()]
    emb, geom = infer.encode_image(sam, image)
    flows = {  # name: (kernels path of the encoder, encode(), decode(n))
        "ours": ("auto", lambda: infer.encode_image(sam, image),
                 lambda n: infer.decode_prompts(sam, emb, geom, prompts[:n])),
        "ours_reference_encoder": ("reference", lambda: infer.encode_image(sam, image), None),
        "official": ("reference", lambda: official.predictor_encode(sam, image),
                     lambda n: official.predictor_decode(sam, emb, (size, size), boxes[:n])),
    }  # fmt: skip
    out = {"preset": sam.cfg.name, "image": f"{size}x{size}", "threads": torch.get_num_threads()}
    try:
        for name, (impl, enc, dec) in flows.items():
            model.use_kernels(sam, impl)
            res = {"encode_s": time_runs(enc, repeats, warmup=1)[:2]}  # (min, median)
            if dec is not None:
                dec(max(counts))  # warm-up
                res["decode_s"] = {n: time_runs(partial(dec, n), 4 * repeats)[:2] for n in counts}
                mins = [res["decode_s"][n][0] for n in counts]
                res["one_box_s"] = res["encode_s"][0] + mins[0]
                res["per_extra_prompt_s"] = _slope(counts, mins)
            out[name] = res
    finally:
        model.use_kernels(sam, "auto")
    return out


# ------------------------------------------------------------------------------------------------
# Memory of many prompts on a large image (python bench.py prompts): decode_prompts keeps the
# low-res logits and Segmentation.label_map makes full-size masks a chunk of prompts at a time
# ------------------------------------------------------------------------------------------------


@torch.inference_mode()
def prompt_memory(counts=(1, 10, 100, 1000), size=6000, preset="tiny", seed=0) -> dict:
    """Peak resident memory (MiB above the level before: model, image and embedding already held)
    and seconds of decoding n random boxes on one size x size image and building its label map,
    as the segmenter CLI does. Random weights (memory does not depend on them). For contrast,
    `whole_stack_mib` is what stacking all n masks at once (float32 logits + bool masks,
    n x H x W x 5 bytes) would need: the pre-chunking flow's floor."""
    if size < 1 or not counts or min(counts) < 1:
        raise ValueError(f"size and counts must be positive, got {size}, {counts}")
    sam = model.Sam(model.SamConfig.from_name(preset)).eval()
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # (H, W, 3)
    emb, geom = infer.encode_image(sam, image)
    xy = rng.uniform(0, size * 0.7, (max(counts), 2))
    wh = rng.uniform(size * 0.05, size * 0.3, (max(counts), 2))
    prompts = [
        infer.Prompt(box=[x, y, x + w, y + h]) for (x, y), (w, h) in zip(xy, wh, strict=True)
    ]
    out = {"preset": preset, "image": f"{size}x{size}", "threads": torch.get_num_threads(),
           "chunk_bytes": infer.CHUNK_BYTES, "load": _load(), "counts": {}}  # fmt: skip
    for n in counts:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            ids, areas = infer.decode_prompts(sam, emb, geom, prompts[:n]).label_map()
            seconds = time.perf_counter() - t0
        del ids, areas
        out["counts"][n] = {"peak_mib": round(mem.delta_mb, 1), "seconds": round(seconds, 2),
                            "whole_stack_mib": round(n * size * size * 5 / 2**20)}  # fmt: skip
        print(f"{n:5d} boxes on {size}x{size}: peak +{mem.delta_mb:.0f} MiB, {seconds:.1f} s",
              flush=True)  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------
# One training step (python bench.py train; python train.py --bench): ours against
# official.official_step, same weights, same batch, same process
# ------------------------------------------------------------------------------------------------


def train_step(preset: str, runs: int = 3, which=("official", "ours")) -> dict:
    """-> {name: [(seconds, peak RSS increase MiB)]} per timed step, after one warm-up step each.
    TrainConfig's defaults give the issue's step: 256 px, 2 images x 5 masks, 1 + 8 updates. Both
    variants start from the same weights (same seed) and batch; "official" is the port on the
    reference kernels (materialised rel-pos bias, padded windows) with the official Adam over
    model.parameters(). The variants alternate so that machine load hits both alike."""
    cfg = train.TrainConfig(data="-", checkpoint="none", model=preset)
    batch = official.synthetic_batch(cfg.batch_size, cfg.masks_per_image, cfg.image_size, seed=0)
    steps = {}
    if "official" in which:
        ref = model.use_kernels(train.build_model(cfg, "cpu"), "reference").train()
        opt, rng = torch.optim.Adam(ref.parameters(), lr=cfg.lr), np.random.default_rng(0)
        steps["official"] = lambda i: official.official_step(
            ref, opt, batch, cfg.iter_points, cfg.point_choices, rng
        )
    if "ours" in which:
        tr = train.cpu_trainer(train.build_model(cfg, "cpu"), cfg)
        steps["ours"] = lambda i: train.train_step(tr, [batch], i)
    result = {name: [] for name in steps}
    for i in range(runs + 1):  # step 0 warms up
        for name, step in steps.items():
            with PeakRSS() as mem:
                t = time_runs(partial(step, i), 1)
            if i:
                result[name].append((t.min, mem.delta_mb))
    return result


def train_step_cli(preset: str, runs: int, only: str | None) -> None:
    """Print train_step's medians, the speed-up, the process peak RSS and tiny's images/s."""
    print(f"threads={torch.get_num_threads()} load avg before: {_load()}")
    res = train_step(preset, runs, (only,) if only else ("official", "ours"))
    med = {n: statistics.median(r[0] for r in rows) for n, rows in res.items()}
    for name, rows in res.items():
        print(
            f"{name:9s} step median {med[name]:.2f} s (min {min(r[0] for r in rows):.2f}, "
            f"{len(rows)} runs), peak RSS +{max(r[1] for r in rows):.0f} MiB during a step"
        )
    if len(res) == 2:
        print(f"speed-up {med['official'] / med['ours']:.2f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"process peak RSS {peak:.2f} GiB (weights, Adam state and steps of: {', '.join(res)})")
    if not only:
        t = statistics.median(r[0] for r in train_step("tiny", 3, ("ours",))["ours"])
        print(f"tiny@256: {2 / t:.2f} images/s (median step {t:.3f} s, 2 images x 5 masks, 1 + 8)")
    print(f"load avg after: {_load()}")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Reduced precision (python bench.py precision): the encoder at fp32 and on precision.py's fast
# path, the official computation and onnxruntime beside them, and this CPU's matmul rates; all
# interleaved in one run so that a loaded machine slows every side alike
# ------------------------------------------------------------------------------------------------


def matmul_rate(dtype, m=2048, k=768, n=3072, runs=5) -> float:
    """GFLOP/s of one (m, k) @ (k, n) matmul in `dtype`, the best of `runs` (the shape of vit_b's
    MLP on 2048 tokens)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    return 2 * m * k * n / time_runs(lambda: a @ b, runs, warmup=1).min / 1e9


def _onnx_encoder(sam: model.Sam, x: torch.Tensor):
    """onnxruntime on sam's image encoder exported as it is (torch.onnx, dynamo exporter, opset
    18), fp32, on torch's thread count -> a callable, or None when onnxruntime is absent."""
    import tempfile

    try:
        import onnxruntime as ort
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/encoder.onnx"
        torch.onnx.export(sam.image_encoder, (x,), path, dynamo=True, opset_version=18,
                          input_names=["image"], external_data=False)  # fmt: skip
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {"image": x.numpy()}
    return lambda: session.run(None, feed)


# Issue 14's goals: (preset, fast path against, at least this many times faster)
PRECISION_GOALS = (("lite_medsam", "float32", 3.0), ("vit_b", "float32", 2.0),
                   ("vit_b", "official", 4.0), ("vit_b", "onnxruntime", 1.8))  # fmt: skip


def encoder_gflop(sam: model.Sam, x: torch.Tensor) -> float:
    """GFLOP of one encoder pass (torch's FLOP counter: matmuls and convs, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        sam.encode(x)
    return counter.get_total_flops() / 1e9


def _example_image(cfg) -> torch.Tensor:
    """The README's MNI152 axial slice, preprocessed for cfg: (1, 3, S, S). LiteMedSAM is timed
    on a real image, not torch.randn: its [0, 1] inputs never reach the GELU tails whose
    underflow to subnormal floats (slow on x86 without flush-to-zero) slowed the bf16 path by
    half on a N(0, 1) image (docs/precision.md)."""
    from PIL import Image

    import data

    path = Path(__file__).resolve().parent / "examples" / "mni152_axial.png"
    return data.preprocess(np.array(Image.open(path).convert("RGB")), cfg)[0]


@torch.inference_mode()
def precision_latency(
    presets=("lite_medsam", "vit_b"), runs=5, threads=2, onnx=True, ablate=False
) -> dict:
    """Encoder seconds of one 256x256 image (batch 1) per preset: fp32 (today's path), the fast
    path (precision.FAST), and for the ViTs the official computation (kernels="reference") and
    onnxruntime on that official graph; LiteMedSAM with its released weights on the README's
    MNI152 slice, the ViTs with random weights on a random image. The variants take turns, one
    call each per round. Ends with issue 14's goals (PRECISION_GOALS) against the medians, and
    each path's GFLOP/s beside the matmul rates measured in the same run. ablate: also the fast
    path without each of precision.STEPS in turn, and with none of them (autocast alone)."""
    import precision
    from checkpoints import default_checkpoint

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    res = {"threads": threads, "runs": runs, "load_before": _load()}
    try:
        res["matmul_gflops"] = {
            str(d).removeprefix("torch."): matmul_rate(d) for d in (torch.float32, torch.bfloat16)
        }
        for name in presets:
            if name == "lite_medsam":
                sam = model.load_checkpoint(default_checkpoint(), verbose=False).eval()
                x = _example_image(sam.cfg)  # (1, 3, 256, 256)
            else:
                torch.manual_seed(0)
                sam = model.Sam(model.SamConfig.from_name(name, image_size=256)).eval()
                x = torch.randn(1, 3, sam.cfg.image_size, sam.cfg.image_size)  # (1, 3, S, S)
            fast = precision.apply(copy.deepcopy(sam), precision.FAST)  # after the weights
            calls = {"float32": partial(sam.encode, x), precision.FAST: partial(fast.encode, x)}
            if ablate:  # the adapter layouts are the ViT's own; channels-last and fusions TinyViT's
                vit_steps = ("bf16_weights", "deconv_taps", "conv_taps", "onednn_packed")
                tiny_steps = [t for t in precision.STEPS if not t.endswith("_taps")]
                steps = tiny_steps if sam.cfg.encoder == "tinyvit" else vit_steps
                for step in steps:
                    keep = [t for t in precision.STEPS if t != step]
                    calls[f"without {step}"] = partial(precision.fast_variant(sam, keep), x)
                if len(steps) > 1:
                    calls["autocast only"] = partial(precision.fast_variant(sam, ()), x)
            ref = sam.encode(x)
            errs = {k: float((fn() - ref).norm() / ref.norm()) for k, fn in calls.items()}
            if sam.cfg.encoder == "vit":
                cfg = model.SamConfig.from_name(name, image_size=256, kernels="reference")
                official = model.Sam(cfg).eval()
                official.load_state_dict(sam.state_dict())
                calls["official"] = partial(official.encode, x)
                session = _onnx_encoder(official, x) if onnx else None
                if session is not None:
                    calls["onnxruntime"] = session
            for fn in calls.values():
                fn()  # warm-up
            times, cpu = {k: [] for k in calls}, {k: [] for k in calls}
            for _ in range(runs):
                for k, fn in calls.items():
                    c0 = time.process_time()  # CPU seconds of this process: what a loaded
                    times[k].append(time_runs(fn, 1).min)  # machine disturbs least
                    cpu[k].append(time.process_time() - c0)
            med = {k: statistics.median(v) for k, v in times.items()}
            cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
            gflop = encoder_gflop(sam, x)
            res[name] = {
                "median_s": med,
                "min_s": {k: min(v) for k, v in times.items()},
                "cpu_median_s": cpu_med,
                "speedup_vs": {k: med[k] / med[precision.FAST] for k in med},
                "cpu_speedup_vs": {k: cpu_med[k] / cpu_med[precision.FAST] for k in med},
                "gflop": gflop,
                "gflops": {k: gflop / med[k] for k in med},
                "embedding_rel_err": errs,
            }
            print(name, json.dumps(res[name]), flush=True)
    finally:
        torch.set_num_threads(before)
    res["load_after"] = _load()
    rates = res["matmul_gflops"]
    print(
        f"matmul (2048x768 @ 768x3072, {threads} threads): fp32 {rates['float32']:.0f} GFLOP/s, "
        f"bf16 {rates['bfloat16']:.0f} GFLOP/s; load {res['load_before']} -> {res['load_after']}"
    )
    for name, against, goal in PRECISION_GOALS:
        if name in res and against in res[name]["speedup_vs"]:
            r = res[name]
            got = r["speedup_vs"][against]
            print(f"goal {name} {precision.FAST} vs {against}: {got:.2f}x median (min "
                  f"{r['min_s'][against] / r['min_s'][precision.FAST]:.2f}x, CPU "
                  f"{r['cpu_speedup_vs'][against]:.2f}x), goal >= {goal}x: "
                  f"{'met' if got >= goal else 'NOT met'}; {r['gflops'][precision.FAST]:.0f} "
                  f"GFLOP/s of {r['gflop']:.1f} GFLOP")  # fmt: skip
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("encoder", help="parameter counts and encoder latency (model.py bench)")
    e.add_argument("name", choices=list(model.PRESETS))
    e.add_argument("--image-size", type=int, default=256)
    e.add_argument(
        "--adapter", action=argparse.BooleanOptionalAction, default=None,
        help="default: the preset's (on for the ViTs, off for lite_medsam)",
    )  # fmt: skip
    e.add_argument("--runs", type=int, default=7)
    e.add_argument("--warmup", type=int, default=2)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument(
        "--kernels", choices=("auto", "reference"), default="auto",
        help="reference: the official computation (materialised bias, padding)",
    )  # fmt: skip
    i = sub.add_parser("infer", help="latency: ours vs the official predictor flow")
    i.add_argument("--preset", "--bench-preset", dest="preset", default="vit_b")
    i.add_argument("--size", "--bench-size", dest="size", type=int, default=512)
    i.add_argument("--repeats", "--bench-repeats", dest="repeats", type=int, default=5)
    i.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8], help="boxes decoded")
    i.add_argument("--checkpoint", default=None, help="a file or a known name; default random")
    m = sub.add_parser("prompts", help="peak memory of many box prompts on a large image")
    m.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100, 1000])
    m.add_argument("--size", type=int, default=6000)
    m.add_argument("--preset", default="tiny", choices=list(model.PRESETS))
    t = sub.add_parser("train", help="one training step vs the official port")
    t.add_argument("--preset", "--bench-preset", dest="preset", default="vit_b",
                   choices=list(model.PRESETS))  # fmt: skip
    t.add_argument("--runs", "--bench-runs", dest="runs", type=int, default=3)
    t.add_argument(
        "--only", "--bench-only", dest="only", choices=["official", "ours"], default=None,
        help="one variant alone, for its process peak memory",
    )  # fmt: skip
    r = sub.add_parser("precision", help="encoder fp32 vs the bf16 fast path (precision.py)")
    r.add_argument("--presets", nargs="+", default=["lite_medsam", "vit_b"])
    r.add_argument("--runs", type=int, default=5)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--ablate", action="store_true", help="also the fast path less each step")
    return p.parse_args(argv)


def main(args) -> int:
    if args.command == "encoder":
        overrides = {} if args.adapter is None else {"adapter": args.adapter}
        cfg = model.SamConfig.from_name(args.name, image_size=args.image_size, **overrides)
        print(parameters_line(model.Sam(cfg)))  # as `python model.py bench` prints it first
        encoder_latency(args.name, args.image_size, args.adapter, args.kernels, args.runs,
                        args.warmup, args.threads)  # fmt: skip
    elif args.command == "infer":
        res = infer_latency(args.preset, args.size, args.repeats, tuple(args.counts),
                            args.checkpoint)  # fmt: skip
        print(json.dumps(res, indent=1))
    elif args.command == "prompts":
        print(json.dumps(prompt_memory(tuple(args.counts), args.size, args.preset), indent=1))
    elif args.command == "precision":
        res = precision_latency(
            tuple(args.presets), args.runs, args.threads, args.onnx, args.ablate
        )
        print(json.dumps(res, indent=1))
    else:
        train_step_cli(args.preset, args.runs, args.only)
    return 0


if __name__ == "__main__":
    import cli

    cli.main_guard(main, parse_args(), "bench.py")
