"""SAM-Med2D's adapter: fused Triton kernels around its two convolutions, and a fast PyTorch path.

On the block's norm2 output x (B, H, W, C), with L = H * W tokens:

    m = mean_hw(x)                    (B, C)
    g = sigmoid(W_up relu(W_down m))  (B, C)    channel gate, W_down (C/4, C), W_up (C, C/4)
    xs = relu(deconv4x4_s2(relu(conv3x3_s2(g * x))))
    adapter(x) = LayerNorm(x + xs)    (eps 1e-5; the block norms use 1e-6)

and the block adds it: out = residual + mlp + adapter(x). The convolutions carry the FLOPs (1.9
GFLOP per vit_b block at 256 px) and stay on cuDNN / oneDNN. Everything around them is memory-bound
and is fused here into two kernels, each with its backward:

  gate      one pass over x for the mean, the two tiny matvecs, a second pass writing g * x.
            Backward: dg = sum_hw dxg * x (a column reduction), then dx = g * dxg + dm / L.
  epilogue  z = x + relu(d); out = LayerNorm(z) * w + b (+ residual + mlp), one row per program.
            Backward: the LayerNorm backward per row, dd = dz * (d > 0), dw and db as per-program
            partial sums reduced on the host (Triton tutorial 05's scheme, without the locks).

On the CPU the fast path is plain PyTorch with two exact rewrites measured faster than oneDNN
here: the 3x3 stride-2 conv as F.unfold + one matmul, the 4x4 stride-2 deconvolution as one matmul
+ F.fold. Weights stored channels-last (tap-major, as precision.py's bf16 copy keeps them) take
layouts that skip the transposes: the conv gathers its 9 taps from the channels-last map, the
deconv sums its 16 taps with strided adds; weights carrying oneDNN's packed form (kernels/onednn)
run their matmuls prepacked.
"""

from collections import Counter

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import onednn

# --------------------------------------------------------------------------------------------------
# The reference: the official module's computation, op by op


def adapter_reference(x, w_down, w_up, w_conv, w_deconv, ln_w, ln_b, eps: float = 1e-5):
    """x (B, H, W, C) -> adapter(x) (B, H, W, C), as SAM-Med2D's Adapter computes it."""
    xc = x.permute(0, 3, 1, 2)  # (B, C, H, W)
    g = torch.sigmoid(F.linear(F.relu(F.linear(xc.mean((2, 3)), w_down)), w_up))  # (B, C)
    s = F.relu(F.conv2d(xc * g[:, :, None, None], w_conv, stride=2, padding=1))  # (B, C, H/2, W/2)
    s = F.relu(F.conv_transpose2d(s, w_deconv, stride=2, padding=1))  # (B, C, H, W)
    return F.layer_norm((xc + s).permute(0, 2, 3, 1), x.shape[-1:], ln_w, ln_b, eps)


# --------------------------------------------------------------------------------------------------
# The fast PyTorch path (CPU): the same math, convolutions rewritten as matmuls


def conv_matrix(w):
    """A channels-last (tap-major) conv weight (C', C, 3, 3) -> its (C', 9*C) matrix, a view:
    the layout conv3x3_s2's tap-major columns meet (and precision.py packs)."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def deconv_matrix(w):
    """A channels-last (tap-major) deconv weight (C, C', 4, 4) -> its (16*C', C) matrix in
    F.linear's layout, a view: deconv4x4_s2's taps (and what precision.py packs)."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T


def conv3x3_s2(x, w, act: str = "none"):
    """act(conv2d(x, w, stride=2, padding=1)) for channels-last x (B, H, W, C) -> rows (B*h*w, C').

    im2col and one matmul for the whole batch; the result is channels-last already. With w
    channels-last (memory (C', 3, 3, C)) the columns are tap-major, the 9 strided views of the
    padded map side by side, which needs no transposed copy (F.unfold on a channels-last map is
    a slow path); the same sums in another order."""
    B, H, W, C = x.shape
    if not w.is_contiguous(memory_format=torch.channels_last):
        cols = F.unfold(x.permute(0, 3, 1, 2), 3, padding=1, stride=2)  # (B, C*9, h*w)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B*h*w, C*9)
        return onednn.linear(rows, w.flatten(1), act=act)  # (B*h*w, C')
    xp = F.pad(x.to(w.dtype), (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, C); cast once, not 9 times
    taps = [xp[:, ky : ky + H : 2, kx : kx + W : 2] for ky in range(3) for kx in range(3)]
    rows = torch.cat(taps, dim=-1).view(-1, 9 * C)  # (B*h*w, 9*C), tap-major
    return onednn.linear(rows, conv_matrix(w), act=act, packed=getattr(w, "onednn", None))


def deconv4x4_s2(rows, w, batch: int, out_hw):
    """conv_transpose2d(x, w, stride=2, padding=1) for x as rows (B*h*w, C), w (C, C', 4, 4)
    -> (B, C', H, W). Every input pixel scatters a 4 x 4 patch: one matmul makes all the patches,
    F.fold (col2im) sums them where they overlap.

    A channels-last w (memory (C, 4, 4, C'), as precision.py's fast copy stores it) makes the
    patches tap-major instead: the 16 taps are then summed by 16 strided adds straight into a
    channels-last map (returned as a (B, C', H, W) view of it), with no transposed copy and no
    col2im; the same sums (equal to rounding), ~20% less time for the adapter in bf16 on a CPU
    (docs/precision.md)."""
    C, C2 = w.shape[:2]
    (H, W), h = out_hw, rows.shape[0] // batch
    if not w.is_contiguous(memory_format=torch.channels_last):
        cols = (rows @ w.flatten(1)).view(batch, h, -1)  # (B, h*w, C'*16)
        return F.fold(cols.transpose(1, 2), out_hw, 4, padding=1, stride=2)  # (B, C', H, W)
    taps = onednn.linear(rows, deconv_matrix(w), packed=getattr(w, "onednn", None))
    taps = taps.view(batch, H // 2, W // 2, 4, 4, C2)  # (B, h, w, ky, kx, C')
    out = taps.new_zeros(batch, H + 2, W + 2, C2)  # channels-last, with the padding ring
    for ky in range(4):
        for kx in range(4):
            out[:, ky : ky + H : 2, kx : kx + W : 2] += taps[:, :, :, ky, kx]
    return out[:, 1 : H + 1, 1 : W + 1].permute(0, 3, 1, 2)  # (B, C', H, W)


def adapter_torch(x, w_down, w_up, w_conv, w_deconv, ln_w, ln_b, eps: float = 1e-5):
    """adapter(x) with the matmul convolutions; x (B, H, W, C). Same signature as the reference."""
    B, H, W, C = x.shape
    g = torch.sigmoid(F.linear(F.relu(F.linear(x.mean((1, 2)), w_down)), w_up))  # (B, C)
    s = conv3x3_s2(x * g[:, None, None, :], w_conv, act="relu")  # (B*h*w, C)
    d = deconv4x4_s2(s, w_deconv, B, (H, W)).permute(0, 2, 3, 1)  # (B, H, W, C)
    return F.layer_norm(x + F.relu(d), (C,), ln_w, ln_b, eps)  # (B, H, W, C)


# --------------------------------------------------------------------------------------------------
# Triton kernels. Token tensors are contiguous (B, L, C) rows; vectors (B, C) or (B, C/4).


@triton.jit
def _gate_fwd_kernel(
    X,  # (B, L, C) adapter input
    W_DOWN,  # (CR, C) first gate linear
    W_UP,  # (C, CR) second gate linear
    XG,  # (B, L, C) output g * x
    G, MEAN,  # (B, C) fp32 outputs: the gate and the token mean (kept for the backward)
    HID,  # (B, CR) fp32 output: relu(W_down m) (kept for the backward)
    L, C, CR, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # one program per image: the gate needs every token first
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    x_img = X + b * L * C
    total = tl.zeros([BLOCK_C], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask = (offs_l < L)[:, None] & c_ok[None, :]
        xt = tl.load(x_img + offs_l[:, None] * C + offs_c[None, :], mask, 0.0).to(tl.float32)
        total += tl.sum(xt, 0)  # fp32 sums whatever the input dtype
    mean = total / L
    # Both matvecs in one sweep over the hidden units: each slice of h = relu(W_down m) is used
    # as soon as it is made.
    logit = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(0, CR, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = (offs_r < CR)[:, None] & c_ok[None, :]
        w1 = tl.load(W_DOWN + offs_r[:, None] * C + offs_c[None, :], mask, 0.0).to(tl.float32)
        h = tl.maximum(tl.sum(w1 * mean[None, :], 1), 0.0)  # (BLOCK_R,)
        tl.store(HID + b * CR + offs_r, h, mask=offs_r < CR)
        w2 = tl.load(W_UP + offs_c[None, :] * CR + offs_r[:, None], mask, 0.0).to(tl.float32)
        logit += tl.sum(w2 * h[:, None], 0)
    g = tl.sigmoid(logit)
    tl.store(G + b * C + offs_c, g, mask=c_ok)
    tl.store(MEAN + b * C + offs_c, mean, mask=c_ok)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask = (offs_l < L)[:, None] & c_ok[None, :]
        ptrs = offs_l[:, None] * C + offs_c[None, :]
        xt = tl.load(x_img + ptrs, mask, 0.0)
        tl.store(XG + b * L * C + ptrs, (xt * g[None, :]).to(XG.dtype.element_ty), mask)


@triton.jit
def _gate_bwd_reduce_kernel(
    DXG, X,  # (B, L, C) gradient of g * x, and x
    DG,  # (B, C) fp32 output: sum over tokens of dxg * x
    L, C, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc = tl.zeros([BLOCK_C], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask = (offs_l < L)[:, None] & c_ok[None, :]
        ptrs = b * L * C + offs_l[:, None] * C + offs_c[None, :]
        dxg = tl.load(DXG + ptrs, mask, 0.0).to(tl.float32)
        acc += tl.sum(dxg * tl.load(X + ptrs, mask, 0.0).to(tl.float32), 0)
    tl.store(DG + b * C + offs_c, acc, mask=c_ok)


@triton.jit
def _gate_bwd_dx_kernel(
    DXG,  # (B, L, C) gradient of g * x
    G, DMEAN,  # (B, C) fp32: the gate, and dL/dmean
    DX,  # (B, L, C) output: g * dxg + dmean / L
    L, C, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_l < L)[:, None] & (offs_c < C)[None, :]
    g = tl.load(G + b * C + offs_c, offs_c < C, 0.0)
    dm = tl.load(DMEAN + b * C + offs_c, offs_c < C, 0.0) / L
    ptrs = b * L * C + offs_l[:, None] * C + offs_c[None, :]
    dxg = tl.load(DXG + ptrs, mask, 0.0).to(tl.float32)
    tl.store(DX + ptrs, (dxg * g[None, :] + dm[None, :]).to(DX.dtype.element_ty), mask)


@triton.jit
def _epilogue_fwd_kernel(
    X, D,  # (R, C) rows: the adapter input and the deconvolution output (before its ReLU)
    RES, MLP,  # (R, C) rows added to the result (when HAS_RES / HAS_MLP)
    LN_W, LN_B,  # (C,) LayerNorm affine
    OUT,  # (R, C) output
    MEAN, RSTD,  # (R,) fp32 outputs: LayerNorm statistics of each row
    C, eps, HAS_RES: tl.constexpr, HAS_MLP: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < C
    x = tl.load(X + row * C + offs, ok, 0.0).to(tl.float32)
    d = tl.load(D + row * C + offs, ok, 0.0).to(tl.float32)
    z = x + tl.maximum(d, 0.0)
    mean = tl.sum(z, 0) / C
    zc = tl.where(ok, z - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, 0) / C + eps)
    w = tl.load(LN_W + offs, ok, 0.0).to(tl.float32)
    y = zc * rstd * w + tl.load(LN_B + offs, ok, 0.0).to(tl.float32)
    if HAS_RES:
        y += tl.load(RES + row * C + offs, ok, 0.0).to(tl.float32)
    if HAS_MLP:
        y += tl.load(MLP + row * C + offs, ok, 0.0).to(tl.float32)
    tl.store(OUT + row * C + offs, y.to(OUT.dtype.element_ty), ok)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _epilogue_bwd_kernel(
    DOUT, X, D,  # (R, C) rows: output gradient, adapter input, deconvolution output
    LN_W,  # (C,)
    MEAN, RSTD,  # (R,) fp32 forward statistics
    DX, DD,  # (R, C) outputs: dL/dx (LayerNorm path only) and dL/dd
    DW_PART, DB_PART,  # (programs, C) fp32 outputs: this program's share of dL/dw, dL/db
    R, C, eps, rows_per_program, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < C
    w = tl.load(LN_W + offs, ok, 0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], tl.float32)
    db = tl.zeros([BLOCK_C], tl.float32)
    for i in range(0, rows_per_program):
        row = pid.to(tl.int64) * rows_per_program + i
        mask = ok & ((offs * 0 + row) < R)  # a (BLOCK_C,) mask: the last program's rows may run out
        x = tl.load(X + row * C + offs, mask, 0.0).to(tl.float32)
        d = tl.load(D + row * C + offs, mask, 0.0).to(tl.float32)
        dy = tl.load(DOUT + row * C + offs, mask, 0.0).to(tl.float32)
        mean = tl.load(MEAN + row, row < R, 0.0)
        rstd = tl.load(RSTD + row, row < R, 0.0)
        zhat = tl.where(mask, (x + tl.maximum(d, 0.0) - mean) * rstd, 0.0)
        dw += dy * zhat
        db += dy
        wdy = w * dy
        dz = (wdy - zhat * (tl.sum(zhat * wdy, 0) / C) - tl.sum(wdy, 0) / C) * rstd
        tl.store(DX + row * C + offs, dz.to(DX.dtype.element_ty), mask)
        tl.store(DD + row * C + offs, tl.where(d > 0, dz, 0.0).to(DD.dtype.element_ty), mask)
    tl.store(DW_PART + pid * C + offs, dw, ok)
    tl.store(DB_PART + pid * C + offs, db, ok)


# --------------------------------------------------------------------------------------------------
# Host side: custom ops with fake shapes and autograd (so torch.compile treats them as opaque ops)


launches: Counter = Counter()  # Triton launches by kernel family and pass, for the tests


def launch_config(C: int) -> dict:
    """Block sizes and warps of each adapter kernel for C channels: the only place they are chosen,
    read by the launches below and by `python kernels/bench.py --aot` (which compiles every one
    for the H100/H200 and prints registers and spills). A program holds whole rows of C channels;
    the gate reads 8 tokens (or 8 hidden units) of a row at a time, the reduction 32 x 128."""
    bc = triton.next_power_of_2(C)
    return dict(
        gate_fwd=dict(BLOCK_L=8, BLOCK_C=bc, BLOCK_R=8, num_warps=8),
        gate_bwd_reduce=dict(BLOCK_L=32, BLOCK_C=128),
        gate_bwd_dx=dict(BLOCK_L=8, BLOCK_C=bc),
        epilogue_fwd=dict(BLOCK_C=bc),
        epilogue_bwd=dict(BLOCK_C=bc, rows_per_program=32),
    )


@torch.library.custom_op("sam_med2d::adapter_gate", mutates_args=())
def _gate_op(
    x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, C = x.shape
    CR = w_down.shape[0]
    xg = torch.empty_like(x)
    g, mean = (torch.empty(B, C, device=x.device, dtype=torch.float32) for _ in range(2))
    hid = torch.empty(B, CR, device=x.device, dtype=torch.float32)
    launches["gate_forward"] += 1
    _gate_fwd_kernel[(B,)](
        x, w_down, w_up, xg, g, mean, hid, L, C, CR, **launch_config(C)["gate_fwd"]
    )
    return xg, g, mean, hid


@_gate_op.register_fake
def _(x, w_down, w_up):
    B, L, C = x.shape
    vec = lambda n: x.new_empty(B, n, dtype=torch.float32)
    return torch.empty_like(x), vec(C), vec(C), vec(w_down.shape[0])


@torch.library.custom_op("sam_med2d::adapter_gate_backward", mutates_args=())
def _gate_bwd_op(
    dxg: torch.Tensor, x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, hid: torch.Tensor,
    w_down: torch.Tensor, w_up: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    B, L, C = x.shape
    dg = torch.empty(B, C, device=x.device, dtype=torch.float32)
    launches["gate_backward"] += 1
    c = launch_config(C)
    grid = (B, triton.cdiv(C, c["gate_bwd_reduce"]["BLOCK_C"]))
    _gate_bwd_reduce_kernel[grid](dxg, x, dg, L, C, **c["gate_bwd_reduce"])
    # The gate's little MLP, backwards (B x C and C x C/4 sized: plain PyTorch).
    da = dg * g * (1 - g)  # (B, C) through the sigmoid
    dw_up = da.T @ hid  # (C, CR)
    dh = (da @ w_up.float()) * (hid > 0)  # (B, CR) through the ReLU
    dw_down = dh.T @ mean  # (CR, C)
    dmean = dh @ w_down.float()  # (B, C)
    dx = torch.empty_like(x)
    grid = (B, triton.cdiv(L, c["gate_bwd_dx"]["BLOCK_L"]))
    _gate_bwd_dx_kernel[grid](dxg, g, dmean, dx, L, C, **c["gate_bwd_dx"])
    return dx, dw_down.to(w_down.dtype), dw_up.to(w_up.dtype)


@_gate_bwd_op.register_fake
def _(dxg, x, g, mean, hid, w_down, w_up):
    return torch.empty_like(x), torch.empty_like(w_down), torch.empty_like(w_up)


def _gate_setup(ctx, inputs, output):
    x, w_down, w_up = inputs
    _, g, mean, hid = output
    ctx.save_for_backward(x, g, mean, hid, w_down, w_up)
    ctx.mark_non_differentiable(g, mean, hid)


def _gate_backward(ctx, dxg, *_):
    x, g, mean, hid, w_down, w_up = ctx.saved_tensors
    return _gate_bwd_op(dxg.contiguous(), x, g, mean, hid, w_down, w_up)


_gate_op.register_autograd(_gate_backward, setup_context=_gate_setup)


@torch.library.custom_op("sam_med2d::adapter_epilogue", mutates_args=())
def _epilogue_op(
    x: torch.Tensor, d: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor,
    res: torch.Tensor | None, mlp: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    R, C = x.shape
    out = torch.empty_like(x)
    launches["epilogue_forward"] += 1
    mean, rstd = (torch.empty(R, device=x.device, dtype=torch.float32) for _ in range(2))
    _epilogue_fwd_kernel[(R,)](
        x, d, res if res is not None else x, mlp if mlp is not None else x, ln_w, ln_b, out, mean,
        rstd, C, eps, HAS_RES=res is not None, HAS_MLP=mlp is not None,
        **launch_config(C)["epilogue_fwd"],
    )  # fmt: skip
    return out, mean, rstd


@_epilogue_op.register_fake
def _(x, d, ln_w, ln_b, res, mlp, eps):
    stat = lambda: x.new_empty(x.shape[0], dtype=torch.float32)
    return torch.empty_like(x), stat(), stat()


@torch.library.custom_op("sam_med2d::adapter_epilogue_backward", mutates_args=())
def _epilogue_bwd_op(
    dout: torch.Tensor, x: torch.Tensor, d: torch.Tensor, ln_w: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    R, C = x.shape
    c = dict(launch_config(C)["epilogue_bwd"])
    rows = c.pop("rows_per_program")
    progs = triton.cdiv(R, rows)
    dx, dd = torch.empty_like(x), torch.empty_like(d)
    launches["epilogue_backward"] += 1
    parts = torch.empty(2, progs, C, device=x.device, dtype=torch.float32)
    _epilogue_bwd_kernel[(progs,)](
        dout, x, d, ln_w, mean, rstd, dx, dd, parts[0], parts[1], R, C, eps, rows, **c
    )  # fmt: skip
    dw, db = parts[0].sum(0), parts[1].sum(0)  # (C,) each
    return dx, dd, dw.to(ln_w.dtype), db.to(ln_w.dtype)


@_epilogue_bwd_op.register_fake
def _(dout, x, d, ln_w, mean, rstd, eps):
    return torch.empty_like(x), torch.empty_like(d), torch.empty_like(ln_w), torch.empty_like(ln_w)


def _epilogue_setup(ctx, inputs, output):
    x, d, ln_w, ln_b, res, mlp, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, d, ln_w, mean, rstd)
    ctx.eps, ctx.has = eps, (res is not None, mlp is not None)
    ctx.mark_non_differentiable(mean, rstd)


def _epilogue_backward(ctx, dout, *_):
    x, d, ln_w, mean, rstd = ctx.saved_tensors
    dout = dout.contiguous()
    dx, dd, dw, db = _epilogue_bwd_op(dout, x, d, ln_w, mean, rstd, ctx.eps)
    # out = residual + mlp + LayerNorm(x + relu(d)): residual and mlp receive dout unchanged.
    return dx, dd, dw, db, *(dout if has else None for has in ctx.has), None


_epilogue_op.register_autograd(_epilogue_backward, setup_context=_epilogue_setup)


def adapter_triton(
    x, w_down, w_up, w_conv, w_deconv, ln_w, ln_b, eps=1e-5, residual=None, mlp=None
):
    """adapter(x) (+ residual + mlp): gate and epilogue in Triton, convolutions on cuDNN."""
    B, H, W, C = x.shape
    x = x.contiguous()
    rows = lambda t: t.reshape(B * H * W, C).contiguous() if t is not None else None
    xg = _gate_op(x.view(B, H * W, C), w_down.contiguous(), w_up.contiguous())[0]  # (B, L, C)
    # Channels-last views: cuDNN keeps that layout, so the deconv output is already (B, H, W, C).
    s = F.relu(F.conv2d(xg.view(B, H, W, C).permute(0, 3, 1, 2), w_conv, stride=2, padding=1))
    d = F.conv_transpose2d(s, w_deconv, stride=2, padding=1).permute(0, 2, 3, 1)  # (B, H, W, C)
    out = _epilogue_op(rows(x), rows(d), ln_w, ln_b, rows(residual), rows(mlp), float(eps))[0]
    return out.view(B, H, W, C)


def triton_supported(x) -> bool:
    """Shapes and dtypes the adapter kernels handle (the whole row of C channels in one block)."""
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.shape[-1] <= 4096
