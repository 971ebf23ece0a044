"""Reduced-precision CPU inference: the image encoder's matmuls and convolutions in bfloat16.

Encoding the image is nearly all of inference's arithmetic (LiteMedSAM: TinyViT's first stage runs
on the full 256x256 grid; vit_b: twelve 768-wide blocks), and a CPU with AVX-512 BF16 or AMX runs
a bf16 matmul several times faster than an fp32 one. The fast path, "bfloat16-mixed", runs an
inference copy of the image encoder (fast_encoder) under torch.autocast(bfloat16): Linear, conv
and matmul take bf16 inputs and accumulate in fp32; LayerNorm, softmax and GELU on bf16 tensors
compute their statistics in fp32 inside the kernel. Two parts stay fully fp32, chosen by
measuring each part's effect on the embedding and on the final masks with LiteMedSAM's weights
on MNI152 slices (docs/precision.md has the figures):

- the patch embedding, which sees the normalised image itself: in bf16 (8 significant bits) it
  alone caused two thirds of the whole encoder's embedding error, for ~1% of its arithmetic;
- everything after the encoder: the embedding is handed on in fp32, and the prompt encoder, the
  mask decoder (its upsampling and the final logits) never see bf16.

What makes bf16 pay on a CPU is less the arithmetic than the memory traffic around it; each of
these was measured (docs/precision.md): the copy's weights are cast to bf16 once (autocast casts
fp32 weights again on every call), TinyViT's maps are channels-last (oneDNN reorders NCHW bf16
maps to its blocked layout on every conv), its BatchNorms are folded into the convs and its
GELUs and residual adds run in place (a fresh 256x256x256 map costs more in page faults than the
GELU itself), and its window attention runs in SDPA's fused CPU kernel; the matmul weights are
packed once into oneDNN's blocked layout (kernels/onednn.py: a bf16 F.linear reorders its weight
on every call), the MLPs' GELUs fused into their first matmul, and the ViT adapters' convolutions
take tap-major layouts that need no im2col or col2im.

The model's own weights stay fp32 (the copy is separate, outside the state_dict), so the fp32
path is the same model object computing exactly as before. Precisions:

    float32          everything fp32 (exact; what the tests compare with the official code)
    bfloat16-mixed   the fast path above (CPU)
    bfloat16/float16 the whole model cast (weights and activations), as --dtype did before
    auto             bfloat16-mixed on a CPU whose bf16 matmuls are native, else float32

Whether the CPU has native bf16 is asked of torch (torch.cpu's capability checks and oneDNN),
never guessed from a model or CPU name.
"""

import copy
import functools

import torch
from torch import nn

import model
import tinyvit
from kernels import adapter, onednn

FAST = "bfloat16-mixed"
CAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # the whole model cast
PRECISIONS = ("float32", FAST, *CAST)
KEEP_FP32 = ("patch_embed",)  # encoder parts that stay fp32 on the fast path (see above)
WEIGHTED = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)  # the layers whose weights go to bf16
# What fast_encoder does beside autocast (docs/precision.md measures each): weights cast to bf16
# once, TinyViT's maps channels-last, the ViT adapters' deconv and conv tap-major, the matmul
# weights packed for oneDNN (with the GELUs fused), and tinyvit.fuse_for_inference's steps
STEPS = ("bf16_weights", "channels_last", "deconv_taps", "conv_taps", "onednn_packed",
         *tinyvit.FUSIONS)  # fmt: skip


def cpu_has_bf16() -> bool:
    """True when torch reports native bf16 matmuls on this CPU (AVX-512 BF16 or AMX tiles) and
    oneDNN, which runs them, is built in. Emulated bf16 (AVX2 only) is slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    native = any(getattr(torch.cpu, c, lambda: False)() for c in checks)
    return native and torch.backends.mkldnn.is_available()


def resolve(requested: str, device) -> str:
    """The precision that will run: `requested` itself, or for "auto" the fast path on a CPU that
    has native bf16 and float32 anywhere else (the fast path is measured on CPUs only)."""
    if requested == "auto":
        on_cpu = torch.device(device).type == "cpu"
        return FAST if on_cpu and cpu_has_bf16() else "float32"
    if requested not in PRECISIONS:
        raise ValueError(f"precision is auto or one of {', '.join(PRECISIONS)}, not {requested!r}")
    return requested


def apply(sam, precision: str):
    """Set `sam` (a model.Sam, in place) up to run at `precision` (a resolved one); returns it.
    The fast path's encoder is a copy made here (fast_encoder) and again by every later
    load_state_dict; make it after moving the model to its device (the copy does not follow)."""
    if precision in CAST:
        return sam.to(dtype=CAST[precision])
    if precision == FAST and not getattr(sam, "precision", None) == FAST:
        _set_fast(sam)
        # Weights loaded later (load_state_dict) reach the fast copy too: it is made again.
        sam.register_load_state_dict_post_hook(lambda sam, _: _set_fast(sam))
    elif precision not in (FAST, "float32"):
        raise ValueError(f"precision is one of {', '.join(PRECISIONS)}, not {precision!r}")
    sam.precision = precision
    return sam


def fast_variant(sam, steps):
    """The fast path's encoder forward with only `steps` of STEPS (the model is not changed):
    for bench.py precision --ablate."""
    enc = sam.image_encoder
    device_type = next(enc.parameters()).device.type
    return _run_fast(fast_encoder(enc, steps), device_type, "channels_last" in steps)


def _set_fast(sam) -> None:
    enc = sam.image_encoder
    enc.forward = _run_fast(fast_encoder(enc), next(enc.parameters()).device.type)


def fast_encoder(enc: nn.Module, steps=STEPS) -> nn.Module:
    """The fast path's inference copy of an image encoder (`steps`: all of STEPS by default;
    fewer to measure what each one earns, bench.py precision --ablate): TinyViT fused
    (tinyvit.fuse_for_inference: BatchNorms folded, GELUs in place, attention through SDPA),
    conv/Linear weights cast to bf16 once (autocast would cast every weight again on every call),
    and TinyViT's 4-D weights channels-last (oneDNN's bf16 convs reorder NCHW maps to a blocked
    layout on every call, channels-last ones they take as they are; the ViT's tokens are
    channels-last already), the ViT adapters' conv and deconv weights tap-major (channels-last),
    which sends kernels/adapter's convolutions through a tap gather and strided adds instead of
    im2col and col2im, and every bf16 matmul weight packed once for oneDNN (_pack). The
    KEEP_FP32 parts keep fp32 weights and run with autocast off."""
    fast = copy.deepcopy(enc).eval().requires_grad_(False)
    fast.__dict__.pop("forward", None)  # the class's forward, not a fast path set on enc
    is_tinyvit = isinstance(fast, tinyvit.TinyViT)
    if is_tinyvit:
        tinyvit.fuse_for_inference(fast, [s for s in steps if s in tinyvit.FUSIONS])
    for name, m in fast.named_modules():
        if isinstance(m, WEIGHTED) and not name.startswith(KEEP_FP32) and "bf16_weights" in steps:
            m.to(torch.bfloat16)
    for name in KEEP_FP32:
        part = fast.get_submodule(name)
        part.forward = _fp32(part.forward)
    channels_last = torch.channels_last
    if is_tinyvit and "channels_last" in steps:
        fast.to(memory_format=channels_last)
    for m in fast.modules():  # the ViT's adapters' convs tap-major: kernels/adapter's layouts
        if isinstance(m, model.Adapter):
            for conv, step in ((m.spatial[0], "conv_taps"), (m.spatial[2], "deconv_taps")):
                if step in steps:
                    conv.weight.data = conv.weight.data.contiguous(memory_format=channels_last)
    on_cpu = next(fast.parameters()).device.type == "cpu"
    if "onednn_packed" in steps and "bf16_weights" in steps and on_cpu and onednn.available():
        _pack(fast)
    return fast


def _pack(fast: nn.Module) -> None:
    """Every bf16 matmul weight of `fast` packed once for oneDNN (kernels/onednn.py): its Linear
    layers run through onednn.linear, the MLPs' GELU fused into their first matmul (an exact-erf
    GELU on the fp32 accumulator), and the ViT adapters' tap-major conv and deconv matrices (the
    layouts kernels/adapter reads) packed for its fast path."""
    for m in fast.modules():
        if isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16:
            onednn.pack(m.weight)
            m.forward = onednn.packed_forward(m)
        elif isinstance(m, model.MLPBlock) and isinstance(m.act, nn.GELU):
            if m.act.approximate == "none" and m.lin1.weight.dtype == torch.bfloat16:
                m.forward = _gelu_fused(m.lin1, m.lin2)
        elif isinstance(m, tinyvit.TinyMLP) and m.fc1.weight.dtype == torch.bfloat16:
            m.forward = _gelu_fused(m.fc1, m.fc2, m.norm)
        elif isinstance(m, (tinyvit.MBConv, tinyvit.PatchMerging)) and m.inplace:
            if isinstance(m.conv1.bn, nn.Identity) and m.conv1.c.weight.dtype == torch.bfloat16:
                m.forward = _conv_gelu_fused(m)
        elif isinstance(m, model.Adapter):  # rows: vit_b's 8x8 map at 256 px
            for w, matrix in ((m.spatial[0].weight, adapter.conv_matrix),
                              (m.spatial[2].weight, adapter.deconv_matrix)):  # fmt: skip
                tap_major = w.is_contiguous(memory_format=torch.channels_last)
                if w.dtype == torch.bfloat16 and tap_major:
                    onednn.pack(w, matrix(w), rows=64)


def _gelu_fused(first: nn.Linear, second: nn.Linear, norm=None):
    """An MLP's forward, [norm ->] first -> GELU -> second (model.MLPBlock, tinyvit.TinyMLP),
    with the GELU fused into first's packed matmul."""

    def forward(x):
        x = x if norm is None else norm(x)
        return second(onednn.linear(x, first.weight, first.bias, act="gelu"))

    return forward


def _conv_gelu_fused(block):
    """tinyvit.MBConv's or PatchMerging's forward (BatchNorms folded, in place) with the GELUs
    after its first two convs fused into those convs (kernels/onednn.conv2d)."""
    c1, c2, residual = block.conv1.c, block.conv2.c, isinstance(block, tinyvit.MBConv)

    def forward(x):
        y = onednn.conv2d(onednn.conv2d(x, c1, "gelu"), c2, "gelu")
        return tinyvit.gelu_(block.conv3(y).add_(x)) if residual else block.conv3(y)

    return forward


def _run_fast(fast: nn.Module, device_type: str, channels_last: bool = True):
    """The encoder's forward on the fast path: `fast` under bf16 autocast (which keeps the ops it
    lists as fp32 there, and lets bf16 and fp32 tensors meet), the embedding handed on in fp32."""

    def run(x):  # x: (B, 3, S, S) fp32
        with torch.autocast(device_type, dtype=torch.bfloat16):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            return fast(x.contiguous(memory_format=fmt)).float()

    run.fast_encoder = fast  # for tests and benchmarks: what runs
    return run


def _fp32(forward):
    """`forward` with autocast off: fp32 in and throughout, its result handed on in bf16 (the
    next layer's bf16 matmul would round it to bf16 anyway; TinyViT's stage 0 then adds its
    residuals in bf16 instead of mixing dtypes, a slow path)."""

    @functools.wraps(forward)
    def run(x):
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float()).to(torch.bfloat16)

    return run
