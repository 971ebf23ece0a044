"""Benchmark of kernels/ (a script, not a test): every path against the reference, same weights.

    python kernels/bench.py                  # CPU, and CUDA too when present
    python kernels/bench.py --runs 3 --batches 1 8 --threads 2

Prints one markdown table per device: the attention layer per block type and the adapter at
vit_b@256 shapes (ms per call, batch 1), then the whole vit_b@256 + adapter image encoder in
images/s at each batch size, each with the max abs difference against the reference path (fp32).
The encoder rows import model.py: this script sits at the top of the import chain, the library
modules in kernels/ never import model.
"""

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere

import kernels  # noqa: E402


@dataclass
class BenchConfig:
    runs: int = 5  # timed runs per row (median reported), after one warm-up round
    batches: tuple = (1, 8)  # encoder batch sizes
    threads: int = 0  # CPU threads (0: torch's default)
    encoder: bool = True  # also time the whole encoder (needs model.py)


def timeit(fns: dict, runs: int, device: str) -> dict:
    """Median seconds of each fn() over runs, after one warm-up call each. The functions take
    turns run by run, so a machine shared with other jobs slows them alike."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    for i in range(runs + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            if i:  # the first round is the warm-up
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def paths(device: str):
    return ["reference", "torch"] + (["triton"] if device == "cuda" else [])


def layer_rows(device: str, runs: int, g: torch.Generator):
    """Attention (windowed and global block) and adapter at vit_b@256 shapes, batch 1."""
    C, heads, grid = 768, 12, 16
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)
    x = r(1, grid, grid, C)
    attn_w = [r(3 * C, C, scale=C**-0.5), r(3 * C), r(C, C, scale=C**-0.5), r(C)]
    adapter_w = [r(C // 4, C, scale=C**-0.5), r(C, C // 4, scale=2 * C**-0.5)]
    adapter_w += [r(C, C, 3, 3, scale=(9 * C) ** -0.5), r(C, C, 4, 4, scale=(4 * C) ** -0.5)]
    adapter_w += [1 + r(C, scale=0.1), r(C, scale=0.1)]
    tables = {size: (r(size, 64, scale=0.5), r(size, 64, scale=0.5)) for size in (27, 31)}
    cases = {
        "attention, windowed block (14x14 windows, padded)": lambda impl: kernels.attention_layer(
            x, *attn_w, *tables[27], heads, 14, impl=impl
        ),
        "attention, global block (16x16)": lambda impl: kernels.attention_layer(
            x, *attn_w, *tables[31], heads, 0, impl=impl
        ),
        "adapter (+ residual + mlp sums)": lambda impl: kernels.adapter_layer(
            x, *adapter_w, 1e-5, residual=x, mlp=x, impl=impl
        ),
    }
    rows = []
    for name, run in cases.items():
        with torch.inference_mode():
            outs = {impl: run(impl) for impl in paths(device)}
            times = timeit({impl: partial(run, impl) for impl in paths(device)}, runs, device)
        for impl, out in outs.items():
            t, t_ref = times[impl], times["reference"]
            diff = (out.float() - outs["reference"].float()).abs().max().item()
            rows.append((name, impl, f"{t * 1e3:.1f} ms", f"{t_ref / t:.2f}x", f"{diff:.1e}"))
    return rows


def encoder_rows(device: str, runs: int, batches, g: torch.Generator):
    """The whole vit_b@256 + adapter encoder, images/s: reference vs the default path."""
    import model  # noqa: PLC0415  (a script-level dependency, see the module docstring)

    cfg = model.SamConfig.from_name("vit_b", image_size=256, adapter=True)
    sam = model.Sam(cfg).eval().to(device)
    with torch.no_grad():  # rel-pos tables are zero at init: make the comparison meaningful
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(device) * 0.5)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 256, 256, generator=g).to(device)

        def encode(impl, x=x):
            model.use_kernels(sam, impl)
            return sam.encode(x)

        with torch.inference_mode():
            outs = {impl: encode(impl) for impl in ("reference", "auto")}
            path = kernels.last_path["attention"]
            times = timeit({impl: partial(encode, impl) for impl in outs}, runs, device)
        for impl, out in outs.items():
            t, t_ref = times[impl], times["reference"]
            label = f"encoder vit_b@256+adapter, batch {batch}"
            diff = (out - outs["reference"]).abs().max().item()
            name = impl if impl == "reference" else f"auto ({path})"
            rows.append((label, name, f"{batch / t:.2f} img/s", f"{t_ref / t:.2f}x", f"{diff:.1e}"))
    return rows


def main(cfg: BenchConfig):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        g = torch.Generator().manual_seed(0)
        rows = layer_rows(device, cfg.runs, g)
        if cfg.encoder:
            rows += encoder_rows(device, cfg.runs, cfg.batches, g)
        name = (
            torch.cuda.get_device_name()
            if device == "cuda"
            else f"{torch.get_num_threads()} threads"
        )
        print(f"\n{device} ({name}), torch {torch.__version__}, median of {cfg.runs} runs")
        print("| what | path | time or rate | speed-up | max abs diff vs reference |")
        print("|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Benchmark kernels/ against the reference paths.")
    p.add_argument("--runs", type=int, default=BenchConfig.runs)
    p.add_argument("--batches", type=int, nargs="+", default=list(BenchConfig.batches))
    p.add_argument("--threads", type=int, default=BenchConfig.threads)
    p.add_argument("--encoder", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args()
    main(BenchConfig(a.runs, tuple(a.batches), a.threads, a.encoder))
