"""SAM's attention with decomposed relative-position bias: a Triton kernel and two PyTorch paths.

For one window (or the whole grid, in a global block) of gh x gw tokens, per head:

    S[i, j] = scale * q_i . k_j + rel_h[i, ky(j)] + rel_w[i, kx(j)]
    rel_h[i, y] = q_i . Rh[qy(i), y]        rel_w[i, x] = q_i . Rw[qx(i), x]
    O = softmax(S) V                         (N = gh * gw tokens, key j sits at (ky(j), kx(j)))

where Rh[qy, ky] = rel_pos_h[qy - ky + gh - 1] (the block's table of 2 gh - 1 rows, as Meta's
get_rel_pos). rel_h and rel_w are small (N x gh, N x gw); the N x N bias is what the official code
materialises and what the kernel never writes: it adds the two terms per tile while it streams keys
(flash attention, online softmax).

Padded windows. A 16 x 16 grid cut into 14 x 14 windows is zero-padded to 28 x 28: 784 tokens, 256
real. The padding happens after norm1, so a padded token's q, k, v are exactly the qkv bias
(b_q, b_k, b_v). Real queries still attend to the padded keys, so they must be counted, but they
all carry the same value b_v and the same content logit scale * q_i . b_k; only their rel-pos terms
differ. Their total weight is therefore one extra key with k = b_k, v = b_v and an additive logit

    pad_logit[i] = log sum_{(y, x) padded} exp(rel_h[i, y] + rel_w[i, x])

and because the real tokens of a window are its top-left rh x rw rectangle, the padded set is
{y >= rh} u {y < rh, x >= rw}, so the sum factorises into four 1-D log-sum-exps without cancellation
(`pad_key_logit`). Padded queries are never computed: their outputs are cropped away. This is exact
math; the roundings differ from the official order only in the last bits.

Paths (chosen by kernels.attention_layer):
  reference  the official computation: pad, partition, qkv on every token, materialised bias.
  torch      real tokens only; F.scaled_dot_product_attention on 4-D q/k/v with the bias (and the
             padded key's logit) as attn_mask, which reaches PyTorch's CPU flash kernel (when no
             gradient flows into the mask; in training PyTorch takes its math path).
  triton     real tokens only; the kernels below (forward and backward), the padded key merged into
             the kernel's (out, lse) in PyTorch (`merge_extra_key`).
"""

from collections import Counter

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange

# --------------------------------------------------------------------------------------------------
# Relative-position terms (shared by every path)


def rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Rh[qy, ky] = rel_pos[qy - ky + size - 1] for a size-long grid axis: (size, size, hs).

    Meta's get_rel_pos when the table fits the grid (2 size - 1 rows), as every table of the model
    does: checkpoints trained at another size are resized once, when they are loaded."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(
            f"rel-pos table has {rel_pos.shape[0]} rows, a {size}-grid needs {2 * size - 1}"
        )
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + size - 1]  # (size, size, hs)


def rel_pos_terms(q, q_hw, rh_table, rw_table):
    """rel_h (..., N, kh) and rel_w (..., N, kw) for queries q (..., N=qh*qw, hs) on a qh x qw grid.

    rh_table (qh, kh, hs) and rw_table (qw, kw, hs) come from rel_pos_table; kh, kw may exceed the
    query grid (a partly padded window: keys span the whole window)."""
    qh, qw = q_hw
    r_q = q.unflatten(-2, (qh, qw))  # (..., qh, qw, hs)
    rel_h = torch.einsum("...yxc,ykc->...yxk", r_q, rh_table).flatten(-3, -2)  # (..., N, kh)
    rel_w = torch.einsum("...yxc,xkc->...yxk", r_q, rw_table).flatten(-3, -2)  # (..., N, kw)
    return rel_h, rel_w


def pad_key_logit(rel_h, rel_w, rh: int, rw: int):
    """log sum over the padded keys (y >= rh or x >= rw) of exp(rel_h[y] + rel_w[x]): (..., N).

    rel_h (..., N, ws_h) and rel_w (..., N, ws_w) span the whole window; the real keys are
    y < rh and x < rw. Returns None when the window has no padding."""
    ws_h, ws_w = rel_h.shape[-1], rel_w.shape[-1]
    if rh == ws_h and rw == ws_w:
        return None
    parts = []
    if rh < ws_h:  # whole padded rows: every x
        parts.append(rel_h[..., rh:].logsumexp(-1) + rel_w.logsumexp(-1))
    if rw < ws_w:  # real rows, padded columns
        parts.append(rel_h[..., :rh].logsumexp(-1) + rel_w[..., rw:].logsumexp(-1))
    return parts[0] if len(parts) == 1 else torch.logaddexp(parts[0], parts[1])


# --------------------------------------------------------------------------------------------------
# The reference core: materialised bias (what the official code computes)


def attention_reference(q, k, v, rel_h, rel_w, scale: float):
    """q, k, v (Z, nh, N, hs); rel_h (Z, nh, N, kh), rel_w (Z, nh, N, kw) with kh * kw = N.

    Returns (out (Z, nh, N, hs), lse (Z, nh, N) fp32): softmax(S) V and the log-sum-exp of S."""
    attn = (q * scale) @ k.transpose(-2, -1)  # (Z, nh, N, N)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (Z, nh, N, kh, kw)
    attn = attn + bias.flatten(-2)  # (Z, nh, N, N)
    lse = attn.float().logsumexp(-1)  # (Z, nh, N)
    return attn.softmax(-1) @ v, lse


def merge_extra_key(out, lse, q, k_e, v_e, extra_logit, scale: float):
    """Fold one more key (k_e, v_e (nh, hs), additive logit (Z, nh, N)) into a softmax result.

    (out, lse) is attention over the other keys; the result is attention over all of them. This is
    the padded windows' key; every op is differentiable, so autograd carries its gradients."""
    s_e = scale * (q.float() @ k_e.float()[..., None])[..., 0] + extra_logit.float()  # (Z, nh, N)
    lse_all = torch.logaddexp(lse, s_e)  # (Z, nh, N)
    w_main = (lse - lse_all).exp()[..., None]  # (Z, nh, N, 1)
    w_e = (s_e - lse_all).exp()[..., None]  # (Z, nh, N, 1)
    return (out.float() * w_main + w_e * v_e.float()[:, None, :]).to(out.dtype), lse_all


# --------------------------------------------------------------------------------------------------
# The fast PyTorch core: scaled_dot_product_attention with the bias as attn_mask

_MASK_ELEMENTS = 1 << 24  # queries are processed in chunks so the attn_mask stays under 64 MiB fp32


def attention_sdpa(q, k, v, rel_h, rel_w, scale: float, k_e=None, v_e=None, extra_logit=None):
    """Same math as attention_reference (+ the optional extra key); returns out (Z, nh, N, hs)."""
    Z, nh, N, hs = q.shape
    if k_e is not None:
        k = torch.cat([k, k_e[None, :, None].expand(Z, nh, 1, hs)], 2)  # (Z, nh, N+1, hs)
        v = torch.cat([v, v_e[None, :, None].expand(Z, nh, 1, hs)], 2)  # (Z, nh, N+1, hs)
    chunk = max(1, _MASK_ELEMENTS // (Z * nh * k.shape[2]))
    outs = []
    for i in range(0, N, chunk):
        rh, rw = rel_h[:, :, i : i + chunk], rel_w[:, :, i : i + chunk]
        mask = (rh[..., :, None] + rw[..., None, :]).flatten(-2)  # (Z, nh, n, N)
        if k_e is not None:
            mask = torch.cat([mask, extra_logit[:, :, i : i + chunk, None].to(mask.dtype)], -1)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, i : i + chunk], k, v, attn_mask=mask.to(q.dtype), scale=scale
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)  # (Z, nh, N, hs)


# --------------------------------------------------------------------------------------------------
# Triton kernels. Tensors are contiguous: q, k, v, o, do, dq, dk, dv (Z*nh, N, HS); rel_h, d_rel_h
# (Z*nh, N, KH); rel_w, d_rel_w (Z*nh, N, KW); lse, delta (Z*nh, N) fp32. Program axis 0 is the
# (window, head) pair, axis 1 the block of queries (forward, dq) or keys (dk, dv).


@triton.jit
def _bias_tile(rh_rows, rw_rows, offs_n, mask, KW):
    """The (BLOCK_M, BLOCK_N) tile rel_h[i, ky(j)] + rel_w[i, kx(j)], gathered from the small terms.

    rh_rows / rw_rows: pointers to the rows of rel_h / rel_w of this tile's queries (BLOCK_M, 1)."""
    ky = offs_n // KW
    kx = offs_n % KW
    bh = tl.load(rh_rows + ky[None, :], mask=mask, other=0.0)
    bw = tl.load(rw_rows + kx[None, :], mask=mask, other=0.0)
    return bh.to(tl.float32) + bw.to(tl.float32)


@triton.jit
def _scores(q, k, rh_rows, rw_rows, offs_n, mask, scale, KW, PREC: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) logits tile scale * q k^T + rel_h + rel_w, in fp32: the one place the
    forward and both backward kernels form S."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    return s + _bias_tile(rh_rows, rw_rows, offs_n, mask, KW)


@triton.jit
def _fwd_kernel(
    Q, K, V,  # (Z*nh, N, HS) queries, keys, values
    RH, RW,  # (Z*nh, N, KH) rel_h and (Z*nh, N, KW) rel_w
    O,  # (Z*nh, N, HS) output
    LSE,  # (Z*nh, N) fp32 log-sum-exp of every query's logits (kept for the backward)
    N, HS, KH, KW,  # tokens, head size, key grid height and width (N == KH * KW)
    scale,  # softmax scale, hs ** -0.5
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    zh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = offs_m < N, offs_d < HS
    base = zh * N * HS
    q_ptrs = Q + base + offs_m[:, None] * HS + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    rh_rows = RH + zh * N * KH + offs_m[:, None] * KH
    rw_rows = RW + zh * N * KW + offs_m[:, None] * KW
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        kv_ptrs = base + offs_n[:, None] * HS + offs_d[None, :]
        k = tl.load(K + kv_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + kv_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = _scores(q, k, rh_rows, rw_rows, offs_n, m_ok[:, None] & n_ok[None, :], scale, KW, PREC)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    o_ptrs = O + base + offs_m[:, None] * HS + offs_d[None, :]
    tl.store(
        o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :]
    )
    tl.store(LSE + zh * N + offs_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, RH, RW,  # as in the forward
    DO,  # (Z*nh, N, HS) gradient of the output
    LSE, DELTA,  # (Z*nh, N) fp32: forward lse, and rowsum(dO * O) - dlse
    DK, DV,  # (Z*nh, N, HS) outputs
    N, HS, KH, KW, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    zh = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok, d_ok = offs_n < N, offs_d < HS
    base = zh * N * HS
    kv_ptrs = base + offs_n[:, None] * HS + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + kv_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        q_ptrs = base + offs_m[:, None] * HS + offs_d[None, :]
        q = tl.load(Q + q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + zh * N + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + zh * N + offs_m, mask=m_ok, other=0.0)
        tile_ok = m_ok[:, None] & n_ok[None, :]
        rh_rows = RH + zh * N * KH + offs_m[:, None] * KH
        rw_rows = RW + zh * N * KW + offs_m[:, None] * KW
        s = _scores(q, k, rh_rows, rw_rows, offs_n, tile_ok, scale, KW, PREC)
        p = tl.where(tile_ok, tl.exp(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N) probabilities
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])  # dL/dS
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    tl.store(DK + kv_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, RH, RW, DO, LSE, DELTA,  # as in _bwd_dkdv_kernel
    DQ,  # (Z*nh, N, HS) output
    DRH, DRW,  # (Z*nh, N, KH) and (Z*nh, N, KW) outputs: dL/drel_h, dL/drel_w
    N, HS, KH, KW, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_KH: tl.constexpr, BLOCK_KW: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    zh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = offs_m < N, offs_d < HS
    base = zh * N * HS
    q_ptrs = base + offs_m[:, None] * HS + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(LSE + zh * N + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + zh * N + offs_m, mask=m_ok, other=0.0)
    rh_rows = RH + zh * N * KH + offs_m[:, None] * KH
    rw_rows = RW + zh * N * KW + offs_m[:, None] * KW
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    drh = tl.zeros([BLOCK_M, BLOCK_KH], tl.float32)
    drw = tl.zeros([BLOCK_M, BLOCK_KW], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        tile_ok = m_ok[:, None] & n_ok[None, :]
        kv_ptrs = base + offs_n[:, None] * HS + offs_d[None, :]
        k = tl.load(K + kv_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + kv_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = _scores(q, k, rh_rows, rw_rows, offs_n, tile_ok, scale, KW, PREC)
        p = tl.where(tile_ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N) dL/dS
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        # dL/drel_h[i, y] = sum of ds[i, j] over the keys j in row y: a matmul with a one-hot
        # (BLOCK_N, BLOCK_KH) matrix, so the segmented sum runs on the tensor cores.
        hot_h = (offs_n // KW)[:, None] == tl.arange(0, BLOCK_KH)[None, :]
        hot_w = (offs_n % KW)[:, None] == tl.arange(0, BLOCK_KW)[None, :]
        drh += tl.dot(ds, hot_h.to(tl.float32), input_precision="ieee")
        drw += tl.dot(ds, hot_w.to(tl.float32), input_precision="ieee")
    tl.store(DQ + q_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    offs_kh, offs_kw = tl.arange(0, BLOCK_KH), tl.arange(0, BLOCK_KW)
    drh_ptrs = DRH + zh * N * KH + offs_m[:, None] * KH + offs_kh[None, :]
    drw_ptrs = DRW + zh * N * KW + offs_m[:, None] * KW + offs_kw[None, :]
    tl.store(drh_ptrs, drh.to(DRH.dtype.element_ty), mask=m_ok[:, None] & (offs_kh < KH)[None, :])
    tl.store(drw_ptrs, drw.to(DRW.dtype.element_ty), mask=m_ok[:, None] & (offs_kw < KW)[None, :])


# --------------------------------------------------------------------------------------------------
# Host side: shape checks, launch, custom ops (torch.compile sees opaque ops with fake shapes)

launches: Counter = Counter()  # Triton launches by pass ("forward", "backward"), for the tests


def triton_supported(dtype: torch.dtype, head_size: int, window: int) -> bool:
    """What the kernels handle (one tile holds a head; the one-hot rel-pos gradient holds a window
    side); the dispatcher falls back to PyTorch otherwise."""
    return dtype in (torch.float32, torch.float16, torch.bfloat16) and max(head_size, window) <= 128


def _check(q, k, v, rel_h, rel_w):
    Z, nh, N, hs = q.shape
    assert k.shape == v.shape == q.shape, f"q, k, v shapes differ: {q.shape} {k.shape} {v.shape}"
    assert rel_h.shape[:3] == rel_w.shape[:3] == (Z, nh, N), (
        f"rel terms {rel_h.shape} {rel_w.shape}"
    )
    assert rel_h.shape[-1] * rel_w.shape[-1] == N, "the key grid kh x kw must hold the N tokens"
    assert q.dtype == k.dtype == v.dtype, "q, k, v must share a dtype"


def _consts(q):
    """Launch constants. Not tuned on a GPU yet (none was available while this was written): 64 x 64
    tiles, halved when fp32 tiles of a wide head (vit_h: hs 80 -> 128) would crowd shared memory."""
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 parity with the reference
    bd = max(16, triton.next_power_of_2(q.shape[-1]))
    block = 32 if q.dtype == torch.float32 and bd > 64 else 64
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=bd, PREC=prec, num_warps=4, num_stages=2)


@torch.library.custom_op("sam_med2d::rel_pos_attention", mutates_args=())
def _rel_pos_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    Z, nh, N, hs = q.shape
    o = torch.empty_like(q)  # inputs are contiguous (attention_triton), so o is too
    lse = torch.empty((Z, nh, N), device=q.device, dtype=torch.float32)
    launches["forward"] += 1
    c = _consts(q)
    grid = (Z * nh, triton.cdiv(N, c["BLOCK_M"]))
    _fwd_kernel[grid](
        q, k, v, rel_h, rel_w, o, lse, N, hs, rel_h.shape[-1], rel_w.shape[-1], scale, **c,
    )  # fmt: skip
    return o, lse


@_rel_pos_attention_op.register_fake
def _(q, k, v, rel_h, rel_w, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("sam_med2d::rel_pos_attention_backward", mutates_args=())
def _rel_pos_attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
    rel_w: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    Z, nh, N, hs = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    drh, drw = torch.empty_like(rel_h), torch.empty_like(rel_w)
    c = _consts(q)
    launches["backward"] += 1
    args = (q, k, v, rel_h, rel_w, do, lse, delta)
    _bwd_dkdv_kernel[(Z * nh, triton.cdiv(N, c["BLOCK_N"]))](
        *args, dk, dv, N, hs, kh, kw, scale, **c
    )  # fmt: skip
    bkh, bkw = max(16, triton.next_power_of_2(kh)), max(16, triton.next_power_of_2(kw))
    _bwd_dq_kernel[(Z * nh, triton.cdiv(N, c["BLOCK_M"]))](
        *args, dq, drh, drw, N, hs, kh, kw, scale, BLOCK_KH=bkh, BLOCK_KW=bkw, **c
    )  # fmt: skip
    return dq, dk, dv, drh, drw


@_rel_pos_attention_bwd_op.register_fake
def _(do, q, k, v, rel_h, rel_w, lse, delta, scale):
    return tuple(torch.empty_like(t) for t in (q, k, v, rel_h, rel_w))


def _setup_context(ctx, inputs, output):
    q, k, v, rel_h, rel_w, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, rel_h, rel_w, o, lse)
    ctx.scale = scale


def _backward(ctx, do, dlse):
    q, k, v, rel_h, rel_w, o, lse = ctx.saved_tensors
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i; a gradient reaching lse (the padded key's merge)
    # enters the same way: dS_ij = P_ij (dP_ij - delta_i + dlse_i).
    delta = (do.float() * o.float()).sum(-1)  # (Z, nh, N)
    if dlse is not None:
        delta = delta - dlse
    grads = _rel_pos_attention_bwd_op(do.contiguous(), q, k, v, rel_h, rel_w, lse, delta, ctx.scale)
    return (*grads, None)


_rel_pos_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention_triton(q, k, v, rel_h, rel_w, scale: float):
    """The Triton kernel with autograd: same signature and result as attention_reference."""
    _check(q, k, v, rel_h, rel_w)
    q, k, v, rel_h, rel_w = (t.contiguous() for t in (q, k, v, rel_h, rel_w))
    return _rel_pos_attention_op(q, k, v, rel_h, rel_w, float(scale))


# --------------------------------------------------------------------------------------------------
# The attention layer: qkv projection, windows, heads, output projection


def window_groups(H: int, W: int, wh: int, ww: int):
    """Split an H x W grid into groups of equally shaped windows (real tokens only).

    Yields (y0, y1, x0, x1, rh, rw): the region [y0:y1, x0:x1] holds windows of rh x rw real tokens.
    A 16 x 16 grid with 14 x 14 windows gives four groups: 14x14, 14x2, 2x14 and 2x2."""
    rows = [(0, H - H % wh, wh)] if H >= wh else []
    rows += [(H - H % wh, H, H % wh)] if H % wh else []
    cols = [(0, W - W % ww, ww)] if W >= ww else []
    cols += [(W - W % ww, W, W % ww)] if W % ww else []
    for y0, y1, rh in rows:
        for x0, x1, rw in cols:
            yield y0, y1, x0, x1, rh, rw


def attention_fast(x, qkv_w, qkv_b, proj_w, proj_b, rel_pos_h, rel_pos_w, num_heads, ws, core):
    """SAM's Attention (+ window partition) on the real tokens only. x (B, H, W, C) -> (B, H, W, C).

    core: "torch" (SDPA) or "triton". ws = 0 means global attention."""
    B, H, W, C = x.shape
    hs = C // num_heads
    scale = hs**-0.5
    qkv = F.linear(x, qkv_w, qkv_b)  # (B, H, W, 3C)
    bias = qkv_b if qkv_b is not None else qkv.new_zeros(3 * C)
    k_e, v_e = bias[C:].view(2, num_heads, hs).unbind(0)  # (nh, hs): a padded token's k and v
    win_h, win_w = (ws, ws) if ws > 0 else (H, W)
    rh_table = rel_pos_table(win_h, rel_pos_h).to(x.dtype)  # (win_h, win_h, hs)
    rw_table = rel_pos_table(win_w, rel_pos_w).to(x.dtype)  # (win_w, win_w, hs)
    out = x.new_empty(B, H, W, C)
    for y0, y1, x0, x1, rh, rw in window_groups(H, W, win_h, win_w):
        win = qkv[:, y0:y1, x0:x1]  # (B, ny*rh, nx*rw, 3C)
        split = "b (ny h) (nx w) (t nh hs) -> t (b ny nx) nh (h w) hs"  # windows, heads
        q, k, v = rearrange(win, split, h=rh, w=rw, t=3, nh=num_heads)  # each (Z, nh, rh*rw, hs)
        rel_h, rel_w = rel_pos_terms(q, (rh, rw), rh_table[:rh], rw_table[:rw])  # (Z,nh,N,win_h|w)
        extra = pad_key_logit(rel_h, rel_w, rh, rw)  # (Z, nh, N) or None
        rel_h, rel_w = rel_h[..., :rh], rel_w[..., :rw]  # terms of the real keys
        if core == "triton":
            o, lse = attention_triton(q, k, v, rel_h, rel_w, scale)
            if extra is not None:
                o, _ = merge_extra_key(o, lse, q, k_e, v_e, extra, scale)
        else:
            ek = (k_e, v_e, extra) if extra is not None else (None, None, None)
            o = attention_sdpa(q, k, v, rel_h, rel_w, scale, *ek)
        out[:, y0:y1, x0:x1] = rearrange(
            o, "(b ny nx) nh (h w) hs -> b (ny h) (nx w) (nh hs)", b=B, ny=(y1 - y0) // rh, h=rh
        )
    return F.linear(out, proj_w, proj_b)  # (B, H, W, C)


def attention_layer_reference(x, qkv_w, qkv_b, proj_w, proj_b, rel_pos_h, rel_pos_w, num_heads, ws):
    """The official Block + Attention: pad, partition, qkv on every token, materialised bias."""
    B, H, W, C = x.shape
    hs = C // num_heads
    if ws > 0:
        ph, pw = (ws - H % ws) % ws, (ws - W % ws) % ws
        x = F.pad(x, (0, 0, 0, pw, 0, ph))  # (B, Hp, Wp, C)
        x = rearrange(x, "b (ny h) (nx w) c -> (b ny nx) h w c", h=ws, w=ws)  # (Z, ws, ws, C)
    Z, gh, gw, _ = x.shape
    qkv = F.linear(x, qkv_w, qkv_b)  # (Z, gh, gw, 3C)
    q, k, v = rearrange(qkv, "z h w (t nh hs) -> t z nh (h w) hs", t=3, nh=num_heads)
    rh_table = rel_pos_table(gh, rel_pos_h)  # (gh, gh, hs)
    rw_table = rel_pos_table(gw, rel_pos_w)  # (gw, gw, hs)
    rel_h, rel_w = rel_pos_terms(q, (gh, gw), rh_table, rw_table)
    o, _ = attention_reference(q, k, v, rel_h, rel_w, hs**-0.5)  # (Z, nh, N, hs)
    o = rearrange(o, "z nh (h w) hs -> z h w (nh hs)", h=gh)  # (Z, gh, gw, C)
    if ws > 0:
        o = rearrange(o, "(b ny nx) h w c -> b (ny h) (nx w) c", b=B, ny=(H + ph) // ws)
    return F.linear(o[:, :H, :W], proj_w, proj_b)  # (B, H, W, C)
