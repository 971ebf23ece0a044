"""Benchmarks of kernels/ (a script, not a library): speed against the reference, and what the
Triton kernels cost a GPU in registers, spills and shared memory, compiled without one.

    python kernels/bench.py                  # time every path, CPU (and CUDA when present)
    python kernels/bench.py --runs 3 --batches 1 8 --threads 2
    python kernels/bench.py --aot sm_90      # compile every kernel for the H100/H200, no GPU
    python kernels/bench.py --aot sm_80 --quick

Timing prints one markdown table per device: the attention layer per block type and the adapter
at vit_b@256 shapes (ms per call, batch 1), then the whole vit_b@256 + adapter image encoder in
images/s at each batch size, each with the max abs difference against the reference (fp32). The
reference is model.py's (Attention and Adapter with kernels="reference"): this script sits at the
top of the import chain; the library modules in kernels/ never import model.

--aot compiles every Triton kernel of kernels/ at every launch configuration the dispatcher can
choose (kernels.attention.launch_config, kernels.adapter.launch_config) for the given GPU, and
prints one line per compiled kernel:

    name dtype shapes,config regs=N spill=BYTES smem=BYTES mma=wgmma|mma|none

(registers and stack bytes per thread from the cuobjdump shipped in the Triton wheel, the dynamic
shared memory the launch requests, which tensor-core instruction the PTX uses). It exits non-zero
when a bf16/fp16 configuration spills or any needs more shared memory than a block may have.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere


@dataclass
class BenchConfig:
    runs: int = 5  # timed runs per row (median reported), after one warm-up round
    batches: tuple = (1, 8)  # encoder batch sizes
    threads: int = 0  # CPU threads (0: torch's default)
    encoder: bool = True  # also time the whole encoder
    aot: str = ""  # "sm_90" or "sm_80": compile the kernels for that GPU instead of timing
    quick: bool = False  # --aot: only bf16, head size 64, the vit_b grids and width


# --------------------------------------------------------------------------------------------------
# Timing


def timeit(fns: dict, runs: int, device: str) -> dict:
    """Median seconds of each fn() over runs, after one warm-up call each. The functions take
    turns run by run, so a machine shared with other jobs slows them alike. The one timing helper
    of the project's kernel benchmarks (kernels/gpu_check.py uses it too)."""
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


def vit_b_layers(device: str, g: torch.Generator):
    """vit_b@256's windowed and global attention and its adapter, random weights (rel-pos tables
    non-zero, unlike at initialisation, so the bias matters)."""
    import model  # noqa: PLC0415  (a script-level dependency, see the module docstring)

    C, heads, grid = 768, 12, 16
    layers = {
        "window": model.Attention(C, heads, 14, window=14),
        "global": model.Attention(C, heads, grid),
        "adapter": model.Adapter(C),
    }
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.parameters():
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
            layer.to(device)
    return layers


def layer_rows(device: str, runs: int, g: torch.Generator):
    """Attention (windowed and global block) and adapter at vit_b@256 shapes, batch 1."""
    layers = vit_b_layers(device, g)
    x = torch.randn(1, 16, 16, 768, generator=g).to(device)

    def adapter(impl):  # the block's x + mlp + adapter(x), with x standing in for all three
        if impl == "reference":
            return x + x + layers["adapter"](x)
        return layers["adapter"].fused(x, residual=x, mlp=x, impl=impl)

    cases = {
        "attention, windowed block (14x14 windows, padded)": lambda i: layers["window"](x, i),
        "attention, global block (16x16)": lambda impl: layers["global"](x, impl),
        "adapter (+ residual + mlp sums)": adapter,
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
    import kernels  # noqa: PLC0415
    import model  # noqa: PLC0415

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


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a GPU this machine may not have: registers, spills, shared memory

ARCHS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}  # capability, max smem per block
# The shapes the dispatcher meets: vit_b/l/h at 256 px (16x16 tokens) and 1024 px (64x64), 14x14
# windows (whole, and the edge windows of a padded grid) and global blocks; the adapter's widths.
ATTN_GRIDS = [(14, 14), (14, 2), (2, 14), (2, 2), (16, 16), (14, 8), (8, 14), (8, 8), (64, 64)]
HEAD_SIZES = (64, 80)  # vit_b and vit_l, vit_h
ADAPTER_WIDTHS = (768, 1024, 1280)  # vit_b, vit_l, vit_h
QUICK = dict(dtypes=("bfloat16",), grids=[(14, 14), (16, 16), (64, 64)], hs=(64,), widths=(768,))


def aot_cases(quick: bool, capability: int = 90):
    """(kernel name, dtype, shape label, JIT function, positional args, launch kwargs) for every
    launch the dispatcher can make in the sweep: dtypes stand for tensors, ints are the shape's."""
    from kernels import adapter as ad  # noqa: PLC0415  (after the caller fixed TRITON_INTERPRET)
    from kernels import attention as at  # noqa: PLC0415

    f32 = torch.float32
    dtypes = QUICK["dtypes"] if quick else ("float32", "float16", "bfloat16")
    for name in dtypes:
        dt = getattr(torch, name)
        for hs in QUICK["hs"] if quick else HEAD_SIZES:
            for kh, kw in QUICK["grids"] if quick else ATTN_GRIDS:
                c = at.launch_config(dt, hs, kh, kw, capability)
                n, label = kh * kw, f"hs{hs},{kh}x{kw}"
                shape = (n, hs, kh, kw, hs**-0.5)
                yield (
                    "attn_fwd",
                    name,
                    label,
                    at._fwd_kernel,
                    (*[dt] * 6, f32, *shape),
                    c["forward"],
                )
                bwd = (*[dt] * 6, f32, f32)
                yield (
                    "attn_dkdv",
                    name,
                    label,
                    at._bwd_dkdv_kernel,
                    (*bwd, dt, dt, *shape),
                    c["dkdv"],
                )
                yield "attn_dq", name, label, at._bwd_dq_kernel, (*bwd, dt, dt, dt, *shape), c["dq"]
        for C in QUICK["widths"] if quick else ADAPTER_WIDTHS:
            c, L, R, CR = ad.launch_config(C), 256, 2 * 256, C // 4
            label = f"C{C}"
            yield "gate_fwd", name, label, ad._gate_fwd_kernel, (
                dt, dt, dt, dt, f32, f32, f32, L, C, CR), c["gate_fwd"]  # fmt: skip
            yield "gate_bwd_reduce", name, label, ad._gate_bwd_reduce_kernel, (
                dt, dt, f32, L, C), c["gate_bwd_reduce"]  # fmt: skip
            yield "gate_bwd_dx", name, label, ad._gate_bwd_dx_kernel, (
                dt, f32, f32, dt, L, C), c["gate_bwd_dx"]  # fmt: skip
            for res, mlp in [(True, True), (False, False), (True, False), (False, True)]:
                yield "epilogue_fwd", name, label, (
                    ad._epilogue_fwd_kernel), (*[dt] * 6, dt, f32, f32, C, 1e-5), dict(
                    c["epilogue_fwd"], HAS_RES=res, HAS_MLP=mlp)  # fmt: skip
            args = (dt, dt, dt, dt, f32, f32, dt, dt, f32, f32, R, C, 1e-5)
            yield "epilogue_bwd", name, label, ad._epilogue_bwd_kernel, args, c["epilogue_bwd"]


def aot_source(fn, args, kwargs, capability: int):
    """What a launch of fn with these arguments compiles, for sm_<capability>, without a GPU:
    (ASTSource, options, target, key). The JIT's own binder specializes the arguments (16-byte
    aligned pointers, ints divisible by 16), so the cubin is the one a real launch builds; it is
    Triton's internal API (as of 3.9), the price of not guessing those rules here."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource, make_backend  # noqa: PLC0415
    from triton.runtime.jit import MockTensor, create_function_from_signature  # noqa: PLC0415

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [MockTensor(a) if isinstance(a, torch.dtype) else a for a in args]
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )  # fmt: skip
    key = (fn.__name__, str(signature), str(constexprs), str(attrs), str(options))
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, target, key


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack (spilled) bytes per thread, read by the cuobjdump shipped in Triton."""
    import triton  # noqa: PLC0415

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
            check=True,
        ).stdout  # fmt: skip
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return dict(regs=int(m[1]), stack=int(m[2]), local=int(m[4]))


def aot(arch: str, quick: bool = False) -> int:
    """Compile every kernel at every launch configuration for arch (one line each); returns the
    number of failures: a bf16/fp16 configuration that spills, or any that needs more shared
    memory than a block may have."""
    import triton  # noqa: PLC0415

    capability, smem_limit = ARCHS[arch]
    seen, failures = {}, 0
    for name, dtype, label, fn, args, kwargs in aot_cases(quick, capability):
        src, options, target, key = aot_source(fn, args, kwargs, capability)
        if key in seen:  # another shape with the same compiled kernel: say so on its line
            seen[key][0].append(label)
            continue
        print(f"compiling {name} {dtype} {label} for {arch}", file=sys.stderr, flush=True)
        kernel = triton.compile(src, target=target, options=options)
        use = resource_usage(kernel.asm["cubin"])
        ptx = kernel.asm["ptx"]
        mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
        spill = use["stack"] + use["local"]
        bad = (spill and dtype != "float32") or kernel.metadata.shared > smem_limit
        failures += bool(bad)
        seen[key] = ([label], name, dtype, kwargs, use, spill, kernel.metadata.shared, mma, bad)
    for labels, name, dtype, kwargs, use, spill, smem, mma, bad in seen.values():
        config = ",".join([*labels, *(f"{k}={v}" for k, v in kwargs.items())])
        line = f"{name} {dtype} {config} regs={use['regs']} spill={spill} smem={smem} mma={mma}"
        print(line + ("  FAIL" if bad else ""), flush=True)
    print(f"{arch}: {len(seen)} compiled kernels, {failures} failing (bf16/fp16 spills or smem)")
    return failures


def main(cfg: BenchConfig) -> int:
    if cfg.aot:
        # The kernels must be compiled, not interpreted: Triton reads this when kernels/ defines
        # them, so it has to be set before the first import of kernels.
        if "kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError("--aot needs kernels/ imported without TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "0"
        return int(aot(cfg.aot, cfg.quick) > 0)
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
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Benchmark kernels/ against the reference paths.")
    p.add_argument("--runs", type=int, default=BenchConfig.runs)
    p.add_argument("--batches", type=int, nargs="+", default=list(BenchConfig.batches))
    p.add_argument("--threads", type=int, default=BenchConfig.threads)
    p.add_argument("--encoder", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--aot", choices=sorted(ARCHS), default="", help="compile for this GPU")
    p.add_argument("--quick", action="store_true", help="--aot: the vit_b bf16 shapes only")
    a = p.parse_args()
    sys.exit(main(BenchConfig(a.runs, tuple(a.batches), a.threads, a.encoder, a.aot, a.quick)))
