"""Reduced-precision CPU inference: the image encoder's matmuls and convolutions in bfloat16.

Encoding the image is nearly all of inference's arithmetic (LiteMedSAM: TinyViT's first stage runs
on the full 256x256 grid; vit_b: twelve 768-wide blocks), and a CPU with AVX-512 BF16 or AMX runs
a bf16 matmul several times faster than an fp32 one. The fast path, "bfloat16-mixed", runs the
image encoder under torch.autocast(bfloat16): Linear, conv and matmul take bf16 inputs and
accumulate in fp32; everything autocast keeps in fp32 stays there, and bf16 activations that meet
LayerNorm, softmax or GELU are computed with fp32 accumulators by those kernels. Two parts stay
fully fp32, chosen by measuring each part's effect on the embedding and on the final masks with
LiteMedSAM's weights on MNI152 slices (docs/precision.md has the figures):

- the patch embedding, which sees the normalised image itself: in bf16 (8 significant bits) it
  alone caused two thirds of the whole encoder's embedding error, for ~1% of its arithmetic;
- everything after the encoder: the embedding is handed on in fp32, and the prompt encoder, the
  mask decoder (its upsampling and the final logits) never see bf16.

The weights stay fp32 in memory (autocast casts them per call; the checkpoint is untouched), so
the fp32 path is the same model object computing exactly as before. Precisions:

    float32          everything fp32 (exact; what the tests compare with the official code)
    bfloat16-mixed   the fast path above (CPU)
    bfloat16/float16 the whole model cast (weights and activations), as --dtype did before
    auto             bfloat16-mixed on a CPU whose bf16 matmuls are native, else float32

Whether the CPU has native bf16 is asked of torch (torch.cpu's capability checks and oneDNN),
never guessed from a model or CPU name.
"""

import functools

import torch

FAST = "bfloat16-mixed"
CAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # the whole model cast
PRECISIONS = ("float32", FAST, *CAST)
KEEP_FP32 = ("patch_embed",)  # encoder parts that stay fp32 on the fast path (see above)


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
    """Set `sam` (a model.Sam, in place) up to run at `precision` (a resolved one); returns it."""
    if precision in CAST:
        return sam.to(dtype=CAST[precision])
    if precision == FAST and not getattr(sam, "precision", None) == FAST:
        enc = sam.image_encoder
        device_type = next(sam.parameters()).device.type
        enc.forward = _autocast(enc.forward, device_type, enabled=True)
        for name in KEEP_FP32:
            part = enc.get_submodule(name)
            part.forward = _autocast(part.forward, device_type, enabled=False)
    elif precision not in (FAST, "float32"):
        raise ValueError(f"precision is one of {', '.join(PRECISIONS)}, not {precision!r}")
    sam.precision = precision
    return sam


def _autocast(forward, device_type: str, enabled: bool):
    """`forward` run with bf16 autocast on (enabled) or off; the output is always fp32. Set as
    the module's own `forward`, so its parameters and state_dict keys are unchanged."""

    @functools.wraps(forward)
    def run(x):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled):
            return forward(x if enabled else x.float()).float()

    return run
