"""The image encoder's two hot spots, behind one dispatcher: attention and the SAM-Med2D adapter.

model.py calls `attention_layer(...)` and `adapter_layer(...)`; each call picks a path:

  "auto"       Triton when the tensors are on CUDA and the kernel handles their shape and dtype,
               otherwise the fast PyTorch path (the CPU default).
  "torch"      the fast PyTorch path: real tokens only, SDPA with the bias as attn_mask,
               convolutions as matmuls. Exact: the same math as the reference (fp32 results agree
               to ~1e-6).
  "triton"     the Triton kernels; on a CPU only under TRITON_INTERPRET=1 (tests).
  "reference"  the official computation, op by op (padded windows, materialised bias): what every
               other path is tested against and measured against.

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


def _choose(op: str, impl: str, x: torch.Tensor, supported: bool) -> str:
    if impl not in IMPLS:
        raise ValueError(f"kernels.{op}_layer: impl must be one of {IMPLS}, got {impl!r}")
    path = impl
    if impl == "auto":
        path = "triton" if x.is_cuda and supported else "torch"
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
    path = _choose("attention", impl, x, attention_kernels.triton_supported(x.dtype, hs, win))
    args = (x, qkv_weight, qkv_bias, proj_weight, proj_bias, rel_pos_h, rel_pos_w, num_heads)
    if path == "reference":
        return attention_kernels.attention_layer_reference(*args, window_size)
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
    fn = adapter_kernels.adapter_torch if path == "torch" else adapter_kernels.adapter_reference
    out = fn(*weights)
    for extra in (residual, mlp):
        out = out + extra if extra is not None else out
    return out
