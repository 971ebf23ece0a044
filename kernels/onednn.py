"""Prepacked bf16 matmuls for the CPU fast path (precision.py): oneDNN's inner product on weights
reordered once into its blocked layout.

A bf16 F.linear on a CPU goes to oneDNN, which reorders the weight into the blocked layout its
AMX / AVX-512 BF16 kernels read on every call; for the encoder's matmuls (a few hundred rows
against a 768 x 3072 weight) that reorder is a large part of the call. `pack` does it once, when
precision.fast_encoder builds its inference copy, and hangs the result on the weight tensor
(`weight.onednn`); `linear` then calls oneDNN's prepacked inner product (the op torch.compile's
CPU backend uses for frozen weights), with an optional GELU or ReLU applied to the fp32
accumulator before the one rounding to bf16 (so the fused activation is, if anything, closer to
fp32 than F.gelu of a bf16 result). Weights without `onednn` take F.linear: every other path,
fp32 and autograd included, never comes near this.

The packed result equals F.linear's bf16 result to rounding (the same kernels; tested in
tests/test_precision.py). `calls` counts the packed calls, so a test can assert that the fast
path ran them.
"""

import functools
from collections import Counter

import torch
import torch.nn.functional as F

ACTS = {"none": None, "gelu": F.gelu, "relu": F.relu}  # activation -> the unfused equivalent
calls: Counter = Counter()  # (act,) -> packed calls made


@functools.cache
def available() -> bool:
    """True where torch has oneDNN's prepacked bf16 linear and it runs here (x86 builds; on other
    CPUs the op may exist without a bf16 kernel): one tiny call, checked against F.linear."""
    ops = torch.ops.mkldnn
    if not torch.backends.mkldnn.is_available() or not all(
        hasattr(ops, op) for op in ("_reorder_linear_weight", "_linear_pointwise")
    ):
        return False
    w = torch.arange(64.0).view(8, 8).div(64).to(torch.bfloat16)  # exact in bf16
    try:
        y = ops._linear_pointwise(w[:2], ops._reorder_linear_weight(w, 2), None, "none", [], "")
    except RuntimeError:
        return False
    return torch.allclose(y.float(), F.linear(w[:2], w).float(), rtol=1e-2)


def pack(weight: torch.Tensor, matrix: torch.Tensor | None = None, rows: int = 256) -> None:
    """Hang the packed form of `matrix` ((N, K) bf16, F.linear's layout; `weight` itself if None)
    on `weight` as `weight.onednn` (a conv's weight carries its matrix's: kernels/adapter.py).
    rows: the number of input rows expected (oneDNN's blocking hint; any row count computes
    correctly)."""
    matrix = weight if matrix is None else matrix
    if matrix.dim() != 2 or matrix.dtype != torch.bfloat16:
        shape = tuple(matrix.shape)
        raise ValueError(f"onednn.pack: a 2-D bf16 matrix, not {shape} {matrix.dtype}")
    weight.onednn = torch.ops.mkldnn._reorder_linear_weight(matrix.detach().contiguous(), rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None, act: str = "none", packed=None):
    """act(F.linear(x, weight, bias)): x (..., K), weight (N, K) -> (..., N), through `packed` (by
    default the packed form `weight` carries, if any; then in bf16: x is cast as autocast would),
    else F.linear (also where a gradient is wanted: oneDNN's op has no backward)."""
    packed = getattr(weight, "onednn", None) if packed is None else packed
    if packed is None or (x.requires_grad and torch.is_grad_enabled()):
        y = F.linear(x, weight, bias)
        return y if ACTS[act] is None else ACTS[act](y)
    N, K = weight.shape
    algorithm = "none" if act == "gelu" else ""  # GELU's exact (erf) form, as nn.GELU()
    rows = x.to(torch.bfloat16).reshape(-1, K)
    calls[act] += 1
    y = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, act, [], algorithm)
    return y.view(*x.shape[:-1], N)


def conv2d(x: torch.Tensor, conv: torch.nn.Conv2d, act: str = "none") -> torch.Tensor:
    """act(conv(x)) in one oneDNN convolution, the activation applied to each output before it is
    stored (a separate GELU over a 256-channel 256x256 map costs as much as the conv itself).
    x is cast to the conv's dtype (autocast's job for F.conv2d; oneDNN's op is not autocast's)."""
    algorithm = "none" if act == "gelu" else ""
    w = conv.weight
    calls["conv_" + act] += 1
    return torch.ops.mkldnn._convolution_pointwise(
        x.to(w.dtype), w, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups,
        act, [], algorithm,
    )  # fmt: skip


def packed_forward(module: torch.nn.Linear, act: str = "none"):
    """A forward for nn.Linear `module` through `linear` (precision.py sets it on its copies)."""
    return lambda x: linear(x, module.weight, module.bias, act)
