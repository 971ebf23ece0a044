"""Issue 16's device work in one call: the Triton kernels compiled, checked and timed on a GPU.

    PYTHONUNBUFFERED=1 python kernels/gpu_check.py OUT            # on the GPU machine, <= ~8 min
    python kernels/gpu_check.py OUT --dry                         # CPU rehearsal, < ~2 min

writes OUT/results.json (every figure), OUT/results.md (the same as tables) and OUT/log.txt (the
raw log), re-written after every section so a run cut short still returns what it measured.
Sections, most important first; each item checks the time budget (--budget seconds) and is
recorded as "skipped: ..." when it runs out, and any exception is recorded, never raised:

  kernels     the attention op, compiled (TRITON_INTERPRET=0), at full sizes (14x14 windows and
              their edge windows of a 16x16 grid at batch 1 and 64, 16x16 and 64x64 global grids,
              head sizes 64 and 80) in fp32/fp16/bf16, forward and backward, against the float64
              spec (attention_reference): max errors and pass/fail at the tests' tolerances.
  blocks      whole vit_b@256 blocks with adapters (windowed, global): the Triton path in bf16 and
              fp32 against model.py's reference path in float64, outputs and input gradients.
  encoder     vit_b@256 + adapters, images/s and peak memory at batch 1/8/64/256 in bf16, for the
              official computation (kernels="reference"), the PyTorch peer (the same layout, SDPA
              with the rel-pos bias as an additive mask: what a PyTorch user would write), our
              fast PyTorch path and our Triton path; then fp32; then each with torch.compile.
  ops         per-op times, fwd and fwd+bwd: attention windowed / global and the adapter.
  training    one step of the recipe (B images x 5 masks, 1 + 8 updates, AMP bf16) ours vs the
              port of the official step, s/step and peak memory (train.py's pieces, when they
              import; otherwise "skipped: <why>").
  autotune    the forward kernel's block sizes, warps and stages on the two main shapes.

The script imports model.py (which must not import nibabel: the GPU machine lacks it) and uses
kernels/bench.py's timing helper. --dry runs everything on the CPU through Triton's interpreter at
tiny sizes (bf16 kernels skipped: the interpreter's bf16 tl.dot is broken) so the command can be
rehearsed before any GPU time is spent.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import types
from contextlib import contextmanager
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Report:
    """Sections of rows (dicts), a log, a deadline; written to OUT after every section."""

    def __init__(self, out: Path, budget: float):
        self.out, self.deadline, self.t0 = out, time.monotonic() + budget, time.monotonic()
        self.sections: dict[str, list] = {}
        self.meta: dict = {}
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "log.txt", "a")

    def log(self, msg: str):
        line = f"[{time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section: str, row: dict):
        self.sections.setdefault(section, []).append(row)
        self.log(f"{section}: {json.dumps(row, default=str)}")

    def item(self, section: str, name: dict, fn, need: float = 5.0):
        """Run fn() -> dict for one row, unless under `need` seconds are left; never raise."""
        if self.left() < need:
            return self.add(section, {**name, "status": "skipped: time budget"})
        try:
            self.add(section, {**name, **fn(), "status": "ok"})
        except Exception as e:  # recorded, the run goes on
            self.log(traceback.format_exc())
            self.add(section, {**name, "status": f"error: {type(e).__name__}: {e}"[:300]})

    def save(self):
        doc = dict(meta=self.meta, sections=self.sections)
        _atomic_write(self.out / "results.json", json.dumps(doc, indent=1, default=str))
        _atomic_write(self.out / "results.md", self.markdown())

    def markdown(self) -> str:
        lines = ["# kernels/gpu_check.py results", ""]
        lines += [f"- {k}: {v}" for k, v in self.meta.items()]
        for name, rows in self.sections.items():
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", f"## {name}", "", "| " + " | ".join(keys) + " |"]
            lines += ["|" + "---|" * len(keys)]
            for r in rows:
                lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |"]
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _atomic_write(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# Setup: what the run is on


def setup(r: Report, dry: bool):
    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415

    if "nibabel" in sys.modules:
        r.log("warning: nibabel was imported by the kernels/model import chain")
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry to rehearse on the CPU)")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    r.meta.update(
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), commit=commit or "unknown",
        dry=dry, device=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        torch=torch.__version__, triton=triton.__version__,
        interpret=os.environ.get("TRITON_INTERPRET"), nibabel_imported="nibabel" in sys.modules,
    )  # fmt: skip
    r.log(f"setup: {r.meta}")
    return device


def sync(device):
    import torch  # noqa: PLC0415

    if device == "cuda":
        torch.cuda.synchronize()


@contextmanager
def peak_memory(device, box: dict):
    """box["peak_mib"]: the peak CUDA memory allocated inside the block (None on the CPU)."""
    import torch  # noqa: PLC0415

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    yield
    box["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


# --------------------------------------------------------------------------------------------------
# 1. The attention op against its float64 spec, and whole blocks against the reference path

TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-2}  # relative to max(1, max |ref|)


def check_kernels(r: Report, device: str, dry: bool):
    from kernels import attention as at  # noqa: PLC0415

    shapes = (
        [(1, 1, 14, 14, 16), (1, 1, 5, 7, 16)]
        if dry
        else [(1, 12, 14, 14, 64), (64, 12, 14, 14, 64), (64, 12, 14, 2, 64), (64, 12, 2, 14, 64),
              (64, 12, 2, 2, 64), (64, 12, 16, 16, 64), (16, 16, 14, 14, 80), (2, 12, 64, 64, 64),
              (1, 16, 64, 64, 80)]
    )  # fmt: skip
    dtypes = ["float32", "float16"] + ([] if dry else ["bfloat16"])
    for dtype_name in dtypes:
        for shape in shapes:
            name = dict(dtype=dtype_name, shape="Z{} nh{} {}x{} hs{}".format(*shape))
            r.item("kernels", name, lambda s=shape, d=dtype_name: _kernel_case(s, d, device, at))
    if dry:
        r.add("kernels", dict(dtype="bfloat16", status="skipped: interpreter (bf16 tl.dot)"))


def _kernel_case(shape, dtype_name, device, at):
    import torch  # noqa: PLC0415

    Z, nh, kh, kw, hs = shape
    dtype, N = getattr(torch, dtype_name), kh * kw
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(device)
    q, k, v = (rand(Z, nh, N, hs).to(dtype) for _ in range(3))
    rel_h, rel_w = rand(Z, nh, N, kh).to(dtype), rand(Z, nh, N, kw).to(dtype)
    d_out, d_lse = rand(Z, nh, N, hs), rand(Z, nh, N)
    ins = [t.detach().requires_grad_() for t in (q, k, v, rel_h, rel_w)]
    launches = at.launches["forward"]
    out, lse = at.attention_triton(*ins, hs**-0.5)
    grads = torch.autograd.grad((out.float() * d_out).sum() + (lse * d_lse).sum(), ins)
    assert at.launches["forward"] == launches + 1, "the Triton kernel did not run"
    ref_ins = [t.detach().double().requires_grad_() for t in (q, k, v, rel_h, rel_w)]
    ref_out, ref_lse = at.attention_reference(*ref_ins, hs**-0.5)
    ref_grads = torch.autograd.grad((ref_out * d_out).sum() + (ref_lse * d_lse).sum(), ref_ins)
    row, ok = {}, True
    pairs = [("out", out, ref_out), ("lse", lse, ref_lse)]
    pairs += list(zip(("dq", "dk", "dv", "drel_h", "drel_w"), grads, ref_grads, strict=True))
    for name, a, b in pairs:
        err = (a.double() - b).abs().max().item()
        rel = err / max(1.0, b.abs().max().item())
        row[f"{name}_err"] = rel
        ok &= rel <= TOL[dtype_name]
    return dict(passed=ok, tol=TOL[dtype_name], **row)


def _vit_b(dry: bool, adapter: bool = True):
    import model  # noqa: PLC0415

    if dry:  # an 8x8 token grid in 4x4 windows: the interpreter is slow
        return model.SamConfig(
            image_size=128, encoder_dim=32, encoder_depth=2, encoder_heads=2, global_attn=(1,),
            window_size=4, adapter=adapter,
        )  # fmt: skip
    return model.SamConfig.from_name("vit_b", image_size=256, adapter=adapter)


def _randomise(module, g):
    """Weights with the scale of a trained model; rel-pos tables non-zero (zero at init)."""
    import torch  # noqa: PLC0415

    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            scale = 0.5 if "rel_pos" in name else fan_in**-0.5 if p.ndim > 1 else 0.1
            p.copy_(base + torch.randn(p.shape, generator=g) * scale)
    return module


def check_blocks(r: Report, device: str, dry: bool):
    import torch  # noqa: PLC0415

    import model  # noqa: PLC0415

    cfg = _vit_b(dry)
    batch = 2 if dry else 8
    for index in (0, cfg.global_attn[0]):
        for dtype_name in ["float32"] + ([] if dry else ["bfloat16"]):
            name = dict(block=index, kind="global" if index in cfg.global_attn else "window",
                        dtype=dtype_name, batch=batch)  # fmt: skip

            def case(index=index, dtype_name=dtype_name):
                g = torch.Generator().manual_seed(index)
                block = _randomise(model.Block(cfg, index), g).to(device)
                x = torch.randn(batch, cfg.embed_size, cfg.embed_size, cfg.encoder_dim, generator=g)
                d_out = torch.randn(x.shape, generator=g).to(device, torch.float64)
                results = {}
                x_in = x.to(device, getattr(torch, dtype_name))  # both paths see these values
                for impl, dt in (("triton", x_in.dtype), ("reference", torch.float64)):
                    b = block.to(dt)  # the reference: the same (rounded) weights in float64
                    model.use_kernels(b, impl)
                    xi = x_in.to(dt).requires_grad_()
                    out = b(xi)
                    (dx,) = torch.autograd.grad((out.double() * d_out).sum(), [xi])
                    results[impl] = (out.double(), dx.double())
                    if impl == "triton":
                        import kernels  # noqa: PLC0415

                        assert kernels.last_path["attention"] == "triton"
                (o, dx), (ro, rdx) = results["triton"], results["reference"]
                rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()
                out_err, dx_err = rel(o, ro), rel(dx, rdx)
                tol = TOL[dtype_name] * (1 if dtype_name == "float32" else 5)
                return dict(
                    out_err=out_err, dx_err=dx_err, tol=tol, passed=max(out_err, dx_err) <= tol
                )

            r.item("blocks", name, case, need=20)


# --------------------------------------------------------------------------------------------------
# 2. Speed: the encoder, the ops


def peer_attend(self, x):
    """The PyTorch peer of model.Attention.attend: the official layout (padded windows, every
    token), the bias materialised and handed to scaled_dot_product_attention as an additive mask."""
    import torch.nn.functional as F  # noqa: PLC0415
    from einops import rearrange  # noqa: PLC0415

    from kernels import attention as at  # noqa: PLC0415

    B, h, w, C = x.shape
    qkv = rearrange(self.qkv(x), "b y x (k nh hs) -> k b nh (y x) hs", k=3, nh=self.heads)
    q, k, v = qkv.unbind(0)  # each (B, nh, L, hs)
    rh, rw = at.rel_pos_table(h, self.rel_pos_h), at.rel_pos_table(w, self.rel_pos_w)
    rel_h, rel_w = at.rel_pos_terms(q, (h, w), rh.to(q.dtype), rw.to(q.dtype))
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)  # (B, nh, L, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    return self.proj(rearrange(out, "b nh (y x) hs -> b y x (nh hs)", y=h))  # (B, h, w, C)


@contextmanager
def peer_path():
    import model  # noqa: PLC0415

    original = model.Attention.attend
    model.Attention.attend = peer_attend
    try:
        yield
    finally:
        model.Attention.attend = original


PATHS = {"official": "reference", "peer (SDPA + bias)": "reference", "ours torch": "torch",
         "ours triton": "triton"}  # fmt: skip


def speed_encoder(r: Report, device: str, dry: bool, dtype_name: str, compiled: bool):
    import torch  # noqa: PLC0415

    import model  # noqa: PLC0415
    from kernels.bench import timeit  # noqa: PLC0415

    cfg = _vit_b(dry)
    dtype = getattr(torch, dtype_name)
    sam = _randomise(model.Sam(cfg), torch.Generator().manual_seed(0)).eval().to(device, dtype)
    batches = ([2] if compiled else [1, 2]) if dry else ([64] if compiled else [1, 8, 64, 256])
    size = cfg.image_size
    runs = 1 if dry else 5
    gflop = None if dry else 67.0  # the figure: GFLOP of real work per vit_b@256 image
    for batch in batches:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        x = x.to(device, dtype)
        for label, impl in PATHS.items():
            skip = impl == "triton" and dtype_name == "bfloat16" or compiled and impl != "triton"
            if dry and skip:  # the interpreter has no bf16 dots; compiling on a CPU is slow
                continue

            def case(label=label, impl=impl, x=x, batch=batch):
                model.use_kernels(sam, impl)
                encode = sam.image_encoder
                if compiled:
                    torch._dynamo.reset()
                    encode = torch.compile(encode, backend="eager" if dry else "inductor")
                box = {}
                ctx = peer_path() if label.startswith("peer") else _nothing()
                with ctx, torch.inference_mode(), peak_memory(device, box):
                    t = timeit({"run": lambda: encode(x)}, runs, device)["run"]
                row = dict(img_s=batch / t, ms=t * 1e3, peak_mib=box["peak_mib"])
                if gflop:
                    row["tflop_s"] = gflop * batch / t / 1e3
                return row

            name = dict(dtype=dtype_name, compiled=compiled, batch=batch, path=label)
            r.item("encoder", name, case, need=60 if compiled else 10)


@contextmanager
def _nothing():
    yield


def speed_ops(r: Report, device: str, dry: bool):
    import torch  # noqa: PLC0415

    import model  # noqa: PLC0415
    from kernels.bench import timeit  # noqa: PLC0415

    C, heads, grid, window, batch = (32, 2, 8, 4, 2) if dry else (768, 12, 16, 14, 64)
    g = torch.Generator().manual_seed(2)
    dtype = torch.float32 if dry else torch.bfloat16
    layers = {
        f"attention window {window}": model.Attention(C, heads, window, window=window),
        f"attention global {grid}x{grid}": model.Attention(C, heads, grid),
        "adapter": model.Adapter(C),
    }
    x = torch.randn(batch, grid, grid, C, generator=g).to(device, dtype)
    for name, layer in layers.items():
        layer = _randomise(layer, g).to(device, dtype)
        for impl in ("reference", "torch", "triton"):
            if name == "adapter":
                run = (lambda t, layer=layer: layer(t)) if impl == "reference" else (
                    lambda t, layer=layer, impl=impl: layer.fused(t, t, t, impl=impl))  # fmt: skip
            else:
                run = lambda t, layer=layer, impl=impl: layer(t, impl)
            for mode in ("fwd", "fwd+bwd"):

                def case(run=run, mode=mode):
                    xi = x.detach().requires_grad_(mode == "fwd+bwd")

                    def step():
                        out = run(xi)
                        if mode == "fwd+bwd":
                            out.float().sum().backward()

                    box = {}
                    with peak_memory(device, box):
                        t = timeit({"op": step}, 1 if dry else 10, device)["op"]
                    return dict(ms=t * 1e3, peak_mib=box["peak_mib"])

                r.item("ops", dict(op=name, path=impl, mode=mode, dtype=str(dtype)), case)


# --------------------------------------------------------------------------------------------------
# 3. Training: one step of the recipe, ours against the port of the official step


def _import_training():
    """train.py's step and official.py's port of the official step. Both import data.py, which
    imports nibabel at the top; the step never reads a NIfTI file, so when nibabel is absent (the
    GPU machine) an empty stand-in module takes its name for this process."""
    stand_in = False
    try:
        import nibabel  # noqa: F401, PLC0415
    except ImportError:
        sys.modules["nibabel"] = types.ModuleType("nibabel")
        stand_in = True
    import official  # noqa: PLC0415
    import train  # noqa: PLC0415

    pieces = dict(official_step=official.official_step, synthetic_batch=official.synthetic_batch,
                  train_step=train.train_step, build_model=train.build_model,
                  make_trainer=train.make_trainer, TrainConfig=train.TrainConfig)  # fmt: skip
    return types.SimpleNamespace(**pieces), stand_in


def speed_training(r: Report, device: str, dry: bool):
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    import model  # noqa: PLC0415

    try:
        t, stand_in = _import_training()
    except Exception as e:  # recorded: the rest of the run does not depend on it
        r.add("training", dict(status=f"skipped: {type(e).__name__}: {e}"[:300]))
        return
    r.meta["training_nibabel_stand_in"] = stand_in
    preset, images, size = ("tiny", [1], 64) if dry else ("vit_b", [2, 16, 64], 256)
    runs = 0 if dry else 3  # dry: the one (warm-up) step is the measurement
    for B in images:
        for variant in ("official", "ours"):

            def case(B=B, variant=variant):
                cfg = t.TrainConfig(
                    data="-", checkpoint="none", model=preset, batch_size=B, amp="bf16",
                    image_size=size,
                    masks_per_image=2 if dry else 5, iter_points=3 if dry else 8,
                )  # fmt: skip
                batch = t.synthetic_batch(B, cfg.masks_per_image, cfg.image_size, seed=0)
                batch = {k: v.to(device) for k, v in batch.items()}
                sam = t.build_model(cfg, device)
                autocast = lambda: torch.autocast(device, dtype=torch.bfloat16)
                if variant == "official":
                    sam = model.use_kernels(sam, "reference").train()
                    opt, rng = (
                        torch.optim.Adam(sam.parameters(), lr=cfg.lr),
                        np.random.default_rng(0),
                    )

                    def step(i):
                        with autocast():
                            t.official_step(
                                sam, opt, batch, cfg.iter_points, cfg.point_choices, rng
                            )

                else:
                    tr = t.make_trainer(sam, cfg, torch.device(device), verbose=False)

                    def step(i):
                        t.train_step(tr, [batch], i)

                times, box = [], {}
                with peak_memory(device, box):
                    for i in range(runs + 1):
                        sync(device)
                        t0 = time.perf_counter()
                        step(i)
                        sync(device)
                        times.append(time.perf_counter() - t0)
                timed = sorted(times[1:] or times)
                return dict(s_step=timed[len(timed) // 2], peak_mib=box["peak_mib"])

            name = dict(images=B, masks=2 if dry else 5, variant=variant)
            r.item("training", name, case, need=30)


# --------------------------------------------------------------------------------------------------
# 4. Autotune: the forward kernel's launch constants on the two main shapes


def autotune(r: Report, device: str, dry: bool):
    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415

    from kernels import attention as at  # noqa: PLC0415
    from kernels.bench import timeit  # noqa: PLC0415

    shapes = [(1, 1, 5, 7, 16)] if dry else [(64, 12, 14, 14, 64), (4, 12, 64, 64, 64)]
    dtype = torch.float32 if dry else torch.bfloat16
    options = (
        [dict(BLOCK_M=16, keys=32, num_warps=4, num_stages=2)]
        if dry
        else [dict(BLOCK_M=m, keys=n, num_warps=w, num_stages=s) for m in (64, 128)
              for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
    )  # fmt: skip
    for Z, nh, kh, kw, hs in shapes:
        g = torch.Generator().manual_seed(3)
        N = kh * kw
        q, k, v = (torch.randn(Z, nh, N, hs, generator=g).to(device, dtype) for _ in range(3))
        rel_h = torch.randn(Z, nh, N, kh, generator=g).to(device, dtype)
        rel_w = torch.randn(Z, nh, N, kw, generator=g).to(device, dtype)
        expected, _ = at.attention_triton(q, k, v, rel_h, rel_w, hs**-0.5)
        base = at.launch_config(dtype, hs, kh, kw, at.capability_of(q))["forward"]
        for opt in options:
            bkw = base["BLOCK_KW"]
            rows = max(1, opt["keys"] // bkw, triton.cdiv(16, bkw))
            c = dict(base, BLOCK_M=opt["BLOCK_M"], ROWS=rows, num_warps=opt["num_warps"],
                     num_stages=opt["num_stages"])  # fmt: skip

            case = partial(_time_forward, at, timeit, c, (q, k, v, rel_h, rel_w), expected, dry)
            name = dict(shape=f"Z{Z} nh{nh} {kh}x{kw} hs{hs}", BLOCK_M=c["BLOCK_M"],
                        ROWS=rows, warps=c["num_warps"], stages=c["num_stages"],
                        default=all(c[key] == base[key] for key in c))  # fmt: skip
            r.item("autotune", name, case, need=3)


def _time_forward(at, timeit, c, ins, expected, dry):
    """One launch configuration of the forward kernel: its time, its difference to the default."""
    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415

    q, _, _, rel_h, rel_w = ins
    Z, nh, N, hs = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    o = torch.empty_like(q)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    grid = (Z * nh, triton.cdiv(N, c["BLOCK_M"]))
    launch = lambda: at._fwd_kernel[grid](*ins, o, lse, N, hs, kh, kw, hs**-0.5, **c)
    t = timeit({"k": launch}, 1 if dry else 20, q.device.type)["k"]
    return dict(us=t * 1e6, max_diff_vs_default=(o.float() - expected.float()).abs().max().item())


# --------------------------------------------------------------------------------------------------


def main(out: Path, dry: bool, budget: float) -> int:
    # Triton reads TRITON_INTERPRET when kernels/ defines its kernels: set it before that import.
    os.environ["TRITON_INTERPRET"] = "1" if dry else "0"
    r = Report(out, budget)
    device = setup(r, dry)
    compiled_dtype = "float32" if dry else "bfloat16"  # dry: the interpreter has no bf16 dots
    steps = [
        ("kernels", lambda: check_kernels(r, device, dry)),
        ("blocks", lambda: check_blocks(r, device, dry)),
        ("encoder bf16", lambda: speed_encoder(r, device, dry, "bfloat16", compiled=False)),
        ("ops", lambda: speed_ops(r, device, dry)),
        ("training", lambda: speed_training(r, device, dry)),
        ("encoder fp32", lambda: speed_encoder(r, device, dry, "float32", compiled=False)),
        ("encoder compiled", lambda: speed_encoder(r, device, dry, compiled_dtype, True)),
        ("autotune", lambda: autotune(r, device, dry)),
    ]
    for name, step in steps:
        r.log(f"== {name} ({r.left():.0f} s left)")
        try:
            step()
        except Exception as e:  # a whole section failed to set up: recorded, the next one runs
            r.log(traceback.format_exc())
            r.add(name, dict(status=f"error: {type(e).__name__}: {e}"[:300]))
        r.save()
    r.meta["seconds"] = round(time.monotonic() - r.t0, 1)
    r.save()
    r.log(f"done in {r.meta['seconds']} s: {out}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Issue 16's GPU checks and timings, in one run.")
    p.add_argument("out", type=Path, help="folder for results.json, results.md, log.txt")
    p.add_argument("--dry", action="store_true", help="CPU rehearsal: interpreter, tiny sizes")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all sections")
    a = p.parse_args()
    sys.exit(main(a.out, a.dry, a.budget))
