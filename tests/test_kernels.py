"""kernels/ against independent references: the Triton kernels (forward and backward) against the
materialised PyTorch math in float64, every path of the attention layer against Meta's
segment_anything, the fast CPU path against the reference at full vit_b@256 shapes (gradients
included), the dispatcher's choices, and torch.compile over the custom ops.

On a CPU the Triton kernels run through Triton's interpreter: TRITON_INTERPRET=1 must be set before
`kernels` is imported, which tests/conftest.py does when no GPU is present. On a CUDA machine the
same tests run compiled, at full sizes, with bf16 added (the interpreter's bf16 tl.dot is broken,
triton-lang/triton#11584).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
import model
from kernels import adapter as ad
from kernels import attention as at
from kernels import onednn

ON_GPU = torch.cuda.is_available() and not kernels.INTERPRET
DEVICE = "cuda" if ON_GPU else "cpu"
F64 = torch.float64
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def rand(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def leaves(*ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Attention kernel: (Z windows, nh heads, kh x kw key grid, hs head size)
# ---------------------------------------------------------------------------------------------

# Key blocks are whole key-grid rows padded to a power of two (see kernels/attention.py): the odd
# grids check that padding columns, rows past the grid and one-row blocks are masked right.
SLOW = pytest.mark.slow  # big grids in the interpreter, vit_b-sized layers, torch.compile
ATTN_SHAPES = (
    [(1, 2, 14, 14, 16), pytest.param((1, 2, 16, 16, 64), marks=SLOW), (2, 1, 5, 7, 16)]
    + [(1, 1, 14, 2, 16), (1, 1, 2, 33, 16)]
    if not ON_GPU
    else [(32, 12, 14, 14, 64), (8, 12, 16, 16, 64), (1, 16, 64, 64, 80), (3, 5, 9, 11, 48)]
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_kernel_forward_backward(shape, dtype):
    if not ON_GPU and dtype == torch.float16 and shape[4] == 64:
        pytest.skip("fp16 at hs=64 adds interpreter time without new coverage on CPU")
    Z, nh, kh, kw, hs = shape
    N, g = kh * kw, torch.Generator().manual_seed(0)
    q, k, v = (rand(g, Z, nh, N, hs, dtype=dtype) for _ in range(3))
    rel_h, rel_w = rand(g, Z, nh, N, kh, dtype=dtype), rand(g, Z, nh, N, kw, dtype=dtype)
    d_out, d_lse = rand(g, Z, nh, N, hs), rand(g, Z, nh, N)
    before = dict(at.launches)

    ins = leaves(q, k, v, rel_h, rel_w)
    out, lse = at.attention_triton(*ins, hs**-0.5)
    grads = torch.autograd.grad((out.float() * d_out).sum() + (lse * d_lse).sum(), ins)
    ref_ins = leaves(q, k, v, rel_h, rel_w, dtype=F64)
    ref_out, ref_lse = at.attention_reference(*ref_ins, hs**-0.5)
    ref_grads = torch.autograd.grad((ref_out * d_out).sum() + (ref_lse * d_lse).sum(), ref_ins)

    assert at.launches["forward"] == before.get("forward", 0) + 1  # the Triton kernels ran
    assert at.launches["backward"] == before.get("backward", 0) + 1
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert max_err(out, ref_out) <= TOL[dtype]
    assert max_err(lse, ref_lse) <= TOL[dtype]
    for name, a, b in zip(("dq", "dk", "dv", "drel_h", "drel_w"), grads, ref_grads, strict=True):
        scale = max(1.0, b.abs().max().item())
        assert max_err(a, b) <= TOL[dtype] * scale, name


def test_pad_key_logit_is_the_log_sum_over_padded_keys():
    """The padded keys' total weight, against a brute-force sum over an explicit mask."""
    g = torch.Generator().manual_seed(3)
    rel_h, rel_w = torch.randn(5, 6, 14, generator=g, dtype=F64), torch.randn(5, 6, 14, dtype=F64)
    for rh, rw in [(14, 2), (2, 14), (2, 2), (5, 9)]:
        y, x = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
        padded = ((y >= rh) | (x >= rw)).flatten()  # (196,)
        logits = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)  # (5, 6, 196)
        expected = logits[..., padded].logsumexp(-1)
        assert max_err(at.pad_key_logit(rel_h, rel_w, rh, rw), expected) < 1e-12
    assert at.pad_key_logit(rel_h, rel_w, 14, 14) is None


# ---------------------------------------------------------------------------------------------
# The attention layer (qkv, windows, padding, proj): every path against Meta's code
# ---------------------------------------------------------------------------------------------


def meta_attention_layer(sa, x, params, heads, window):
    """Meta's window_partition -> Attention -> window_unpartition with our weights."""
    ie = sa.modeling.image_encoder
    B, H, W, C = x.shape
    size = (window, window) if window else (H, W)
    attn = ie.Attention(C, heads, qkv_bias=True, use_rel_pos=True, input_size=size).to(x)
    names = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rel_pos_h", "rel_pos_w")
    run = lambda t: torch.func.functional_call(attn, dict(zip(names, params, strict=True)), (t,))
    if not window:
        return run(x)
    y, pad_hw = ie.window_partition(x, window)
    return ie.window_unpartition(run(y), window, pad_hw, (H, W))


LAYERS = [(1, 16, 16, 32, 2, 14), pytest.param((2, 16, 16, 32, 2, 0), marks=SLOW)]
LAYERS += [(1, 6, 6, 32, 2, 0), (1, 9, 11, 32, 2, 4)]
if ON_GPU:
    LAYERS += [(4, 16, 16, 768, 12, 14), (1, 64, 64, 1280, 16, 14), (1, 64, 64, 1280, 16, 0)]


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda s: "B{}_{}x{}_C{}_nh{}_win{}".format(*s))
def test_attention_layer_matches_meta(segment_anything, layer, impl):
    """model.Attention on every path (its own reference computation, or kernels/ through the
    dispatcher) against Meta's code, outputs and gradients, on the same weights."""
    B, H, W, C, heads, window = layer
    hs, g = C // heads, torch.Generator().manual_seed(1)
    table = 2 * (window or H) - 1
    x = rand(g, B, H, W, C)
    params = [rand(g, 3 * C, C, scale=C**-0.5), rand(g, 3 * C), rand(g, C, C, scale=C**-0.5)]
    params += [rand(g, C), rand(g, table, hs, scale=0.5), rand(g, 2 * (window or W) - 1, hs)]
    ours_in, meta_in = leaves(x, *params), leaves(x, *params)
    d_out = rand(g, B, H, W, C)

    attn = model.Attention(C, heads, window or H, window).to(DEVICE)
    names = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rel_pos_h", "rel_pos_w")
    calls_before = sum(kernels.calls.values())
    weights = dict(zip(names, ours_in[1:], strict=True))
    out = torch.func.functional_call(attn, weights, (ours_in[0], impl))
    if impl == "reference":  # model.py's own computation: kernels/ is not called
        assert sum(kernels.calls.values()) == calls_before
    else:
        assert kernels.last_path["attention"] == impl
    ref = meta_attention_layer(segment_anything, meta_in[0], meta_in[1:], heads, window)
    assert max_err(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())
    grads = torch.autograd.grad((out * d_out).sum(), ours_in)
    ref_grads = torch.autograd.grad((ref * d_out).sum(), meta_in)
    for a, b in zip(grads, ref_grads, strict=True):
        assert max_err(a, b) <= 1e-4 * max(1.0, b.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Adapter kernels
# ---------------------------------------------------------------------------------------------

ADAPTERS = [(2, 8, 8, 32), (1, 6, 4, 48)] if not ON_GPU else [(8, 16, 16, 768), (2, 64, 64, 1280)]


def adapter_inputs(B, H, W, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = rand(g, B, H, W, C, dtype=dtype)
    w = [rand(g, C // 4, C, scale=C**-0.5), rand(g, C, C // 4, scale=2 * C**-0.5)]
    w += [rand(g, C, C, 3, 3, scale=(9 * C) ** -0.5), rand(g, C, C, 4, 4, scale=(4 * C) ** -0.5)]
    w += [1 + rand(g, C, scale=0.2), rand(g, C, scale=0.2)]
    res, mlp = rand(g, B, H, W, C, dtype=dtype), rand(g, B, H, W, C, dtype=dtype)
    return [x, *(t.to(dtype) for t in w), res, mlp], rand(g, B, H, W, C)


@pytest.mark.parametrize("shape", ADAPTERS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_adapter_layer_forward_backward(shape, impl):
    ins, d_out = adapter_inputs(*shape, torch.float32)
    before = dict(ad.launches)
    ours = leaves(*ins)
    out = kernels.adapter_layer(*ours[:7], 1e-5, residual=ours[7], mlp=ours[8], impl=impl)
    assert kernels.last_path["adapter"] == impl
    grads = torch.autograd.grad((out * d_out).sum(), ours)
    ref = leaves(*ins, dtype=F64)
    ref_out = ad.adapter_reference(*ref[:7], 1e-5) + ref[7] + ref[8]
    ref_grads = torch.autograd.grad((ref_out * d_out).sum(), ref)

    if impl == "triton":
        for name in ("gate_forward", "gate_backward", "epilogue_forward", "epilogue_backward"):
            assert ad.launches[name] == before.get(name, 0) + 1, name
    assert max_err(out, ref_out) <= 1e-4 * max(1.0, ref_out.abs().max().item())
    names = ("x", "w_down", "w_up", "w_conv", "w_deconv", "ln_w", "ln_b", "residual", "mlp")
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert max_err(a, b) <= 1e-4 * max(1.0, b.abs().max().item()), name


def gate_reference(x, w_down, w_up):  # x (B, L, C) -> g * x
    return x * torch.sigmoid(torch.relu(x.mean(1) @ w_down.T) @ w_up.T)[:, None, :]


def epilogue_reference(x, d, ln_w, ln_b, res):  # rows (R, C)
    return torch.nn.functional.layer_norm(x + torch.relu(d), x.shape[-1:], ln_w, ln_b, 1e-5) + res


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADAPTERS, ids=lambda s: "x".join(map(str, s)))
def test_adapter_fused_ops_in_every_dtype(shape, dtype):
    """The two fused ops on identical inputs (in fp16 a whole-adapter comparison is dominated by
    ReLUs whose input rounds to the other side of zero: the paths would differ, not be wrong)."""
    ins, _ = adapter_inputs(*shape, dtype)
    B, H, W, C = shape
    x, w_down, w_up, ln_w, ln_b = ins[0].reshape(B, H * W, C), ins[1], ins[2], ins[5], ins[6]
    g = torch.Generator().manual_seed(9)
    rows, d, res = x.reshape(-1, C), ins[7].reshape(-1, C), ins[8].reshape(-1, C)
    cases = [
        (lambda *t: ad._gate_op(*t)[0], gate_reference, (x, w_down, w_up)),
        (lambda *t: ad._epilogue_op(*t[:4], t[4], None, 1e-5)[0], epilogue_reference,
         (rows, d, ln_w, ln_b, res)),
    ]  # fmt: skip
    for op, reference, args in cases:
        ours, ref = leaves(*args), leaves(*args, dtype=F64)
        out, ref_out = op(*ours), reference(*ref)
        d_out = rand(g, *out.shape)
        grads = torch.autograd.grad((out.float() * d_out).sum(), ours)
        ref_grads = torch.autograd.grad((ref_out * d_out).sum(), ref)
        assert out.dtype == dtype
        assert max_err(out, ref_out) <= TOL[dtype] * max(1.0, ref_out.abs().max().item())
        for a, b in zip(grads, ref_grads, strict=True):
            assert max_err(a, b) <= TOL[dtype] * max(1.0, b.abs().max().item())


@SLOW
def test_matmul_convolutions_equal_oneDNN():
    """The CPU path's two rewrites, against the convolutions they replace, at vit_b's shapes."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 16, 768, generator=g, dtype=F64)
    w_conv = torch.randn(768, 768, 3, 3, generator=g, dtype=F64)
    w_deconv = torch.randn(768, 768, 4, 4, generator=g, dtype=F64)
    conv = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), w_conv, stride=2, padding=1)
    rows = ad.conv3x3_s2(x, w_conv)  # (B*8*8, C)
    assert max_err(rows.view(2, 8, 8, 768), conv.permute(0, 2, 3, 1)) < 1e-9
    deconv = torch.nn.functional.conv_transpose2d(conv, w_deconv, stride=2, padding=1)
    assert max_err(ad.deconv4x4_s2(rows, w_deconv, 2, (16, 16)), deconv) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_bias_from_the_selector_matmul_is_the_broadcast_sum(dtype):
    """On a CPU attention_sdpa builds the bias rel_h[y] + rel_w[x] as a matmul with a 0/1 selector:
    the same values, bit for bit, as the broadcast sum (SDPA called with that mask)."""
    g = torch.Generator().manual_seed(6)
    Z, nh, kh, kw, hs = 2, 3, 5, 7, 16
    q, k, v = (torch.randn(Z, nh, kh * kw, hs, generator=g).to(dtype) for _ in range(3))
    rel_h, rel_w = (torch.randn(Z, nh, kh * kw, n, generator=g).to(dtype) for n in (kh, kw))
    mask = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
    assert torch.equal(at.attention_sdpa(q, k, v, rel_h, rel_w, 0.25), ref)


def test_tap_major_deconvolution_equals_the_transposed_conv():
    """deconv4x4_s2 with a channels-last (tap-major) weight: 16 strided adds instead of col2im,
    the same function as conv_transpose2d and as the col2im route (small shapes, float64)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 4, 8, generator=g, dtype=F64)  # (B, h, w, C): output 12x8
    w = torch.randn(8, 5, 4, 4, generator=g, dtype=F64)  # (C, C', 4, 4)
    ref = torch.nn.functional.conv_transpose2d(x.permute(0, 3, 1, 2), w, stride=2, padding=1)
    rows = x.reshape(-1, 8)
    taps = ad.deconv4x4_s2(rows, w.contiguous(memory_format=torch.channels_last), 2, (12, 8))
    assert taps.shape == ref.shape == (2, 5, 12, 8)
    assert max_err(taps, ref) < 1e-12
    assert max_err(taps, ad.deconv4x4_s2(rows, w, 2, (12, 8))) < 1e-12


def test_tap_major_convolution_equals_conv2d():
    """conv3x3_s2 with a channels-last (tap-major) weight gathers its 9 taps from the
    channels-last map: the same function as conv2d and as the F.unfold route, ReLU fused or not
    (odd sides, float64)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 7, 10, 6, generator=g, dtype=F64)  # (B, H, W, C): output 4x5
    w = torch.randn(5, 6, 3, 3, generator=g, dtype=F64)  # (C', C, 3, 3)
    ref = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), w, stride=2, padding=1)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 5)  # rows (B*h*w, C')
    w_cl = w.contiguous(memory_format=torch.channels_last)
    assert max_err(ad.conv3x3_s2(x, w_cl), ref) < 1e-12
    assert max_err(ad.conv3x3_s2(x, w), ref) < 1e-12
    assert torch.equal(ad.conv3x3_s2(x, w_cl, act="relu"), ad.conv3x3_s2(x, w_cl).relu())


@pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("act", ["none", "gelu", "relu"])
def test_packed_linear_matches_f_linear(act):
    """onednn.linear on a packed bf16 weight against the unfused fp32 computation of the same bf16
    values: act(x @ w.T + b). The packed matmul accumulates in fp32 and rounds once to bf16, so
    it agrees to bf16's rounding (2**-8 relative per value); unpacked F.linear in bf16 (which
    also rounds before the activation) is held to the same bound. Shapes: vit_b's MLP, a batch
    of rows other than the packing hint, a 3-D input."""
    g = torch.Generator().manual_seed(8)
    bf = torch.bfloat16
    x = torch.randn(3, 37, 64, generator=g).to(bf)
    w, b = torch.randn(96, 64, generator=g).to(bf), torch.randn(96, generator=g).to(bf)
    f = {"none": lambda t: t, "gelu": torch.nn.functional.gelu, "relu": torch.relu}[act]
    exact = f(torch.addmm(b.float(), x.reshape(-1, 64).float(), w.float().T)).view(3, 37, 96)
    plain = onednn.linear(x, w, b, act=act)  # no packed form: F.linear
    packed_w = w.clone()
    onednn.pack(packed_w, rows=256)
    before = onednn.calls[act]
    out = onednn.linear(x, packed_w, b, act=act)
    assert onednn.calls[act] == before + 1  # the packed op ran
    assert out.dtype == bf and out.shape == (3, 37, 96)
    bound = 2**-8 * exact.abs().max().item()
    assert max_err(out, exact) <= bound
    assert max_err(plain, exact) <= bound
    assert max_err(onednn.linear(x[0].float(), packed_w, b, act=act), out[0]) == 0  # cast in
    with pytest.raises(ValueError, match="2-D bf16"):
        onednn.pack(w.float())
    xg = x.clone().requires_grad_()  # a gradient wanted: F.linear, which has a backward
    onednn.linear(xg, packed_w, b, act=act).float().sum().backward()
    assert onednn.calls[act] == before + 2 and xg.grad is not None


@pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("groups", [1, 6])
def test_conv_with_fused_gelu_matches_conv_then_gelu(groups):
    """onednn.conv2d with its GELU fused (TinyViT's 1x1 and depthwise 3x3 convs, bf16,
    channels-last) against GELU of the fp32 conv of the same bf16 values, to bf16 rounding."""
    g = torch.Generator().manual_seed(9)
    bf, cl = torch.bfloat16, torch.channels_last
    x = torch.randn(2, 6, 9, 11, generator=g).to(bf).contiguous(memory_format=cl)
    conv = torch.nn.Conv2d(6, 12, 3 if groups > 1 else 1, 2, 1 if groups > 1 else 0, groups=groups)
    conv = conv.to(bf).to(memory_format=cl).requires_grad_(False)
    exact = torch.nn.functional.gelu(
        torch.nn.functional.conv2d(x.float(), conv.weight.float(), conv.bias.float(),
                                   conv.stride, conv.padding, groups=groups)
    )  # fmt: skip
    before = onednn.calls["conv_gelu"]
    out = onednn.conv2d(x.float(), conv, "gelu")  # cast to the conv's bf16 inside
    assert onednn.calls["conv_gelu"] == before + 1
    assert out.dtype == bf and out.shape == exact.shape
    assert max_err(out, exact) <= 2**-8 * exact.abs().max().item()


# ---------------------------------------------------------------------------------------------
# The model's blocks: the fast path against the reference at vit_b@256 shapes, with gradients
# ---------------------------------------------------------------------------------------------


@SLOW
@pytest.mark.parametrize("index", [0, 2], ids=["windowed", "global"])
def test_vit_b_block_fast_path_matches_reference(index):
    """A whole vit_b@256 block with its adapter: "auto" against "reference" on the same weights.

    Gradients are compared in float64: in fp32 the adapter's ReLUs make them ill-conditioned (a
    pre-activation within ~1e-6 of zero lands on either side depending on the summation order,
    and one such flip moves dx by ~1e-2; checked: it is then the fp32 *reference* that disagrees
    with the float64 one)."""
    cfg = model.SamConfig.from_name("vit_b", image_size=256, adapter=True)
    block = model.Block(cfg, index).to(DEVICE)
    g = torch.Generator().manual_seed(index)
    with torch.no_grad():
        for name, p in block.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(DEVICE)
            fan_in = p[0].numel() if p.ndim > 1 else 1
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + noise * (fan_in**-0.5 if p.ndim > 1 else 0.2))
    x = torch.randn(2, 16, 16, 768, generator=g).to(DEVICE)
    outs = {}
    with torch.no_grad():
        for impl in ("reference", "auto"):
            block.kernels = impl
            outs[impl] = block(x)
    # fp32: on a GPU the adapter takes Triton, attention PyTorch's SDPA (its fp32 kernels are for
    # parity checks only, see kernels/__init__.py).
    assert kernels.last_path["attention"] == "torch"
    assert kernels.last_path["adapter"] == ("triton" if ON_GPU else "torch")
    assert max_err(outs["auto"], outs["reference"]) <= 1e-5 * outs["reference"].abs().max().item()

    block.double()
    x64, d_out = x[:1].double(), torch.randn(1, 16, 16, 768, generator=g, dtype=F64).to(DEVICE)
    grads = {}
    for impl in ("reference", "auto"):
        block.kernels = impl
        xi = x64.clone().requires_grad_()
        out = block(xi)
        grads[impl] = torch.autograd.grad((out * d_out).sum(), [xi, *block.parameters()])
    assert kernels.last_path["adapter"] == "torch"  # float64 is the PyTorch path everywhere
    for a, b in zip(grads["auto"], grads["reference"], strict=True):
        assert max_err(a, b) <= 1e-10 * max(1.0, b.abs().max().item())


def test_encoder_reference_path_matches_meta(segment_anything):
    """cfg.kernels == "reference" keeps the official computation (test_model.py checks "auto")."""
    cfg = model.SamConfig(
        image_size=256, encoder_dim=64, encoder_depth=2, encoder_heads=2, global_attn=(1,),
        adapter=False, kernels="reference",
    )  # fmt: skip
    ours = model.Sam(cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ours.image_encoder.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.2)
            )
    meta = segment_anything.modeling.ImageEncoderViT(
        img_size=256, embed_dim=64, depth=2, num_heads=2, out_chans=cfg.prompt_dim, qkv_bias=True,
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6), use_rel_pos=True,
        global_attn_indexes=(1,), window_size=14,
    ).eval()  # fmt: skip
    meta.load_state_dict(ours.image_encoder.state_dict())
    x = torch.randn(1, 3, 256, 256, generator=g)
    calls_before = sum(kernels.calls.values())
    with torch.no_grad():
        assert max_err(ours.encode(x), meta(x)) <= 1e-5
    assert sum(kernels.calls.values()) == calls_before  # kernels/ was never called


# ---------------------------------------------------------------------------------------------
# Dispatcher and torch.compile
# ---------------------------------------------------------------------------------------------


def test_dispatcher_choices_and_errors():
    ins, _ = adapter_inputs(1, 4, 4, 16, torch.float32)
    kernels.adapter_layer(*ins[:7])
    assert kernels.last_path["adapter"] == ("triton" if ON_GPU else "torch")
    with pytest.raises(ValueError, match="reference path is model.py's"):
        kernels.adapter_layer(*ins[:7], impl="reference")
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.adapter_layer(*ins[:7], impl="fast")
    with pytest.raises(ValueError, match="does not handle"):
        kernels.adapter_layer(*(t.double() for t in ins[:7]), impl="triton")
    with pytest.raises(ValueError, match="even sides"):
        kernels.adapter_layer(ins[0][:, :3], *ins[1:7])
    x = torch.zeros(1, 4, 4, 30)
    with pytest.raises(ValueError, match="do not split into 4 heads"):
        kernels.attention_layer(x, *ins[1:7], 4, 0)
    with pytest.raises(ValueError, match="kernels path must be one of"):
        model.use_kernels(torch.nn.Linear(1, 1), "fast")


def test_custom_ops_pass_opcheck():
    """Schemas, fake (meta) implementations and autograd registrations are consistent."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (rand(g, 1, 2, 12, 16) for _ in range(3))
    rel_h, rel_w = rand(g, 1, 2, 12, 3), rand(g, 1, 2, 12, 4)
    torch.library.opcheck(at._rel_pos_attention_op, (q, k, v, rel_h, rel_w, 0.25))
    ins, _ = adapter_inputs(2, 4, 4, 16, torch.float32)
    x = ins[0].reshape(2, 16, 16)
    torch.library.opcheck(ad._gate_op, (x, ins[1], ins[2]))
    rows = ins[0].reshape(32, 16)
    torch.library.opcheck(
        ad._epilogue_op, (rows, rows * 0.5 - 0.1, ins[5], ins[6], rows, None, 1e-5)
    )


@SLOW
def test_torch_compile_traces_the_triton_path():
    g = torch.Generator().manual_seed(7)
    C, heads = 32, 2
    x = rand(g, 1, 16, 16, C)
    params = [rand(g, 3 * C, C, scale=C**-0.5), rand(g, 3 * C), rand(g, C, C, scale=C**-0.5)]
    params += [rand(g, C), rand(g, 27, C // heads), rand(g, 27, C // heads)]
    ada, _ = adapter_inputs(1, 16, 16, C, torch.float32)

    def block(x):
        y = kernels.attention_layer(x, *params, heads, 14, impl="triton")
        return kernels.adapter_layer(y, *ada[1:7], 1e-5, residual=x, impl="triton")

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    xc, xe = leaves(x, x)
    out, expected = compiled(xc), block(xe)
    assert max_err(out, expected) < 1e-5
    dc, de = (torch.autograd.grad(o.square().sum(), i)[0] for o, i in ((out, xc), (expected, xe)))
    assert max_err(dc, de) < 1e-4


# ---------------------------------------------------------------------------------------------
# Compiled for the H100/H200 without one: registers and spills (issue 18)
# ---------------------------------------------------------------------------------------------

AOT_LINE = re.compile(
    r"^(\w+) (float32|float16|bfloat16) (\S+) regs=(\d+) spill=(\d+) smem=(\d+) "
    r"mma=(wgmma|mma|none)( +FAIL)?$"
)


def run_aot(*flags):
    """kernels/bench.py --aot in a subprocess: the kernels must be compiled, not interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "kernels" / "bench.py"), "--aot", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=3000)


def check_aot(proc, arch, mma):
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith(f"{arch}: ") and lines[-1].endswith(
        " 0 failing (bf16/fp16 spills or smem)"
    ), proc.stdout
    rows = [AOT_LINE.match(line) for line in lines[:-1]]
    assert all(rows), proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for m in rows:
        if m[2] != "float32":
            assert int(m[5]) == 0, m[0]  # no bf16/fp16 spills
    names = {m[1] for m in rows}
    assert {"attn_fwd", "attn_dkdv", "attn_dq", "gate_fwd", "epilogue_bwd"} <= names
    assert all(m[7] in mma for m in rows if m[1].startswith("attn")), "attention off tensor cores"
    return rows


def test_aot_quick_sweep_has_no_spills():
    """The vit_b bf16 configurations compiled for sm_90: every one without spills, on wgmma."""
    check_aot(run_aot("sm_90", "--quick"), "sm_90", mma=("wgmma",))


@SLOW
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_aot_full_sweep_has_no_bf16_fp16_spills(arch):
    """Every configuration launch_config can choose for arch compiles without bf16/fp16 spills
    (sm_80's own smaller tiles: launch_config's capability)."""
    # Edge windows (14x2: 32-key blocks) and fp32's 16-query tiles are under wgmma's 64 rows.
    rows = check_aot(run_aot(arch), arch, mma=("wgmma", "mma") if arch == "sm_90" else ("mma",))
    assert {m[2] for m in rows} == {"float32", "float16", "bfloat16"}


# ---------------------------------------------------------------------------------------------
# The GPU run's script, rehearsed on the CPU (issue 16)
# ---------------------------------------------------------------------------------------------


@SLOW
def test_gpu_check_dry_run_writes_its_results(tmp_path):
    """kernels/gpu_check.py --dry: every section runs (interpreter, tiny sizes), the correctness
    rows pass, and the three files the GPU run returns are written."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(root / "kernels" / "gpu_check.py"), str(tmp_path), "--dry"]
    proc = subprocess.run(cmd + ["--budget", "1200"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["meta"]["dry"] and not doc["meta"]["nibabel_imported"]
    sections = doc["sections"]
    assert {"kernels", "blocks", "encoder", "ops", "training", "autotune"} <= set(sections)
    checked = [row for row in sections["kernels"] + sections["blocks"] if row["status"] == "ok"]
    assert len(checked) >= 4 and all(row["passed"] for row in checked)
    for name in ("encoder", "ops", "training", "autotune"):  # timed, nothing failed
        assert all(not row["status"].startswith("error") for row in sections[name]), name
        assert any(row["status"] == "ok" for row in sections[name]), name
    md = (tmp_path / "results.md").read_text()
    assert "## kernels" in md and "| dtype | shape |" in md
    assert "== autotune" in (tmp_path / "log.txt").read_text()
