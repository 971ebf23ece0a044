"""The image encoder's two hot spots, behind one dispatcher: attention and the SAM-Med2D adapter.

model.py calls `attention_layer(...)` and `adapter_layer(...)`; each call picks a path:

  "auto"       Triton when the tensors are on CUDA and the kernel handles their shape and dtype
               (attention: bf16 and fp16; its fp32 kernels exist for parity checks), otherwise
               the fast PyTorch path (the CPU default).
  "torch"      the fast PyTorch path: real tokens only, SDPA with the bias as attn_mask,
               convolutions as matmuls. Exact: the same math as the reference (fp32 results agree
               to ~1e-6).
  "triton"     the Triton kernels; on a CPU only under TRITON_INTERPRET=1 (tests).

The official computation ("reference": padded windows, materialised bias), which every path is
tested and timed against, is model.py's own (Attention and Adapter with kernels="reference"): it
never comes here. Each op's spec sits beside its kernel at the op level instead
(attention.attention_reference, adapter.adapter_reference), as in Triton's tutorials.

The choice is made per call (never from an environment variable read at import), and it is
recorded: `last_path[op]` is the path of the latest call of op ("attention" or "adapter") and
`calls[(op, path)]` counts them, so a test can assert which path ran.
"""

import os
from collections import Counter

import torch

from . import adapter as adapter_kernels
from . import attention as attention_kernels

IMPLS = ("auto", "torch", "triton", "reference")
# Triton reads this when it defines the kernels (at import); it only decides whether "triton" can
# run on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

last_path: dict[str, str] = {}
calls: Counter = Counter()


def _choose(op: str, impl: str, x: torch.Tensor, supported: bool, preferred: bool = True) -> str:
    if impl not in IMPLS:
        raise ValueError(f"kernels.{op}_layer: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        raise ValueError(
            f"kernels.{op}_layer: the reference path is model.py's (kernels='reference'), "
            "not the dispatcher's"
        )
    path = impl
    if impl == "auto":
        path = "triton" if x.is_cuda and supported and preferred else "torch"
    elif impl == "triton" and not supported:
        raise ValueError(
            f"kernels.{op}_layer: the Triton kernel does not handle {tuple(x.shape)} {x.dtype}"
        )
    elif impl == "triton" and not (x.is_cuda or INTERPRET):
        raise RuntimeError(
            f"kernels.{op}_layer: Triton on {x.device} needs TRITON_INTERPRET=1 at import"
        )
    last_path[op] = path
    calls[op, path] += 1
    return path


def use_kernels(module: torch.nn.Module, impl: str) -> torch.nn.Module:
    """Switch every encoder block of module (each has a `kernels` attribute: model.Block) to a path
    ("auto", "reference", "torch", "triton"), e.g. to time or check the fast path against the
    reference on the same weights."""
    if impl not in IMPLS:
        raise ValueError(f"kernels path must be one of {IMPLS}, not {impl!r}")
    for m in module.modules():
        if isinstance(getattr(m, "kernels", None), str):
            m.kernels = impl
    return module


def attention_layer(
    x, qkv_weight, qkv_bias, proj_weight, proj_bias, rel_pos_h, rel_pos_w, num_heads: int,
    window_size: int, impl: str = "auto",
):  # fmt: skip
    """SAM's attention layer with decomposed rel-pos bias, windowed (window_size > 0) or global (0).

    x (B, H, W, C): the block's norm1 output, unpadded. Returns proj(attention) (B, H, W, C): what
    the official window_partition -> Attention -> window_unpartition computes."""
    B, H, W, C = x.shape
    if C % num_heads:
        raise ValueError(
            f"kernels.attention_layer: {C} channels do not split into {num_heads} heads"
        )
    hs = C // num_heads
    win = window_size if window_size > 0 else max(H, W)
    supported = attention_kernels.triton_supported(x.dtype, hs, win)
    path = _choose("attention", impl, x, supported, preferred=x.dtype != torch.float32)
    args = (x, qkv_weight, qkv_bias, proj_weight, proj_bias, rel_pos_h, rel_pos_w, num_heads)
    return attention_kernels.attention_fast(*args, window_size, core=path)


def adapter_layer(
    x, w_down, w_up, w_conv, w_deconv, ln_weight, ln_bias, eps: float = 1e-5, residual=None,
    mlp=None, impl: str = "auto",
):  # fmt: skip
    """SAM-Med2D's adapter on x (B, H, W, C) (the block's norm2 output), plus residual and mlp.

    Returns residual + mlp + LayerNorm(x + relu(deconv(relu(conv(gate(x) * x))))) (the sums only
    for the tensors given): the block's `x + mlp(norm2(x)) + adapter(norm2(x))` in one call. H and W
    must be even (the official module needs that too: its stride-2 conv and deconv round-trip)."""
    B, H, W, C = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"kernels.adapter_layer: the token grid {H}x{W} must have even sides")
    path = _choose("adapter", impl, x, adapter_kernels.triton_supported(x))
    weights = (x, w_down, w_up, w_conv, w_deconv, ln_weight, ln_bias, eps)
    if path == "triton":  # the sums happen inside the fused epilogue
        return adapter_kernels.adapter_triton(*weights, residual=residual, mlp=mlp)
    out = adapter_kernels.adapter_torch(*weights)
    for extra in (residual, mlp):
        out = out + extra if extra is not None else out
    return out
