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

Paths (chosen by kernels.attention_layer; the official computation, which pads, partitions and
materialises the bias, is model.py's Attention with kernels="reference"):
  torch      real tokens only; F.scaled_dot_product_attention on 4-D q/k/v with the bias (and the
             padded key's logit) as attn_mask, which reaches PyTorch's CPU flash kernel (when no
             gradient flows into the mask; in training PyTorch takes its math path).
  triton     real tokens only; the kernels below (forward and backward), the padded key merged into
             the kernel's (out, lse) in PyTorch (`merge_extra_key`).
"""

from collections import Counter
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange

from . import onednn

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
# The op's spec: the bias materialised (the kernels' tests run it in float64)


def attention_reference(q, k, v, rel_h, rel_w, scale: float):
    """q, k, v (Z, nh, N, hs); rel_h (Z, nh, N, kh), rel_w (Z, nh, N, kw) with kh * kw = N.

    Returns (out (Z, nh, N, hs), lse (Z, nh, N) fp32): softmax(S) V and the log-sum-exp of S.
    Same signature and result as attention_triton, which must match it."""
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
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    # On a CPU, bias[(y, x)] = rel_h[y] + rel_w[x] is one matmul with a 0/1 selector: exactly the
    # broadcast sum (two nonzero terms, one rounding), which for bf16 runs ~5x slower (on a GPU a
    # TF32 matmul would round the terms, so the sum stays a broadcast add there)
    select = None
    if rel_h.device.type == "cpu":
        eye = partial(torch.eye, dtype=rel_h.dtype, device=rel_h.device)
        select = torch.cat([eye(kh).repeat_interleave(kw, 1), eye(kw).repeat(1, kh)])  # (kh+kw, N)
    outs = []
    for i in range(0, N, chunk):
        rh, rw = rel_h[:, :, i : i + chunk], rel_w[:, :, i : i + chunk]
        if select is not None:
            mask = torch.cat([rh, rw], -1) @ select  # (Z, nh, n, N)
        else:
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
# (window, head) pair, axis 1 the block of queries (forward, dq) or of key rows (dk, dv).
#
# Register budget. The bias tile must never be gathered element by element: a (BLOCK_M, BLOCK_N)
# tensor of 64-bit pointers per term is what made the first version of these kernels spill (see
# docs/kernels.md). Instead a block of keys is ROWS whole rows of the key grid, each padded to
# BLOCK_KW = next_pow2(KW) columns, so key j of the block sits at row y0 + j // BLOCK_KW, column
# j % BLOCK_KW (compile-time shifts), and the bias is a broadcast sum of two small blocks:
#
#     bias[i, (r, c)] = rel_h[i, y0 + r] + rel_w[i, c]     (BLOCK_M, ROWS) and (BLOCK_M, BLOCK_KW)
#
# The same layout turns dq's rel-pos gradients into plain reductions of the dS tile: a key row
# holds all keys with one y, so d_rel_h[i, y0 + r] = sum_c dS[i, (r, c)] is final when its block is
# done (stored at once), and d_rel_w[i, c] = sum over every block and r of dS[i, (r, c)] is one
# (BLOCK_M, BLOCK_KW) accumulator.


@triton.jit
def _key_rows(y0, KH, KW, ROWS: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Token indices (BLOCK_N,) of the key block starting at key row y0, and which of them exist
    (the block's last rows may run past KH; columns past KW are padding)."""
    j = tl.arange(0, ROWS * BLOCK_KW)
    ky, kx = y0 + j // BLOCK_KW, j % BLOCK_KW
    return ky * KW + kx, (ky < KH) & (kx < KW)


@triton.jit
def _bias(rel_h, rel_w, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_KW: tl.constexpr):
    """The (BLOCK_M, ROWS * BLOCK_KW) bias tile from rel_h (BLOCK_M, ROWS) and rel_w (BLOCK_M,
    BLOCK_KW): a broadcast add, reshaped row-major (as the key block is laid out)."""
    b = rel_h[:, :, None] + rel_w[:, None, :]  # (BLOCK_M, ROWS, BLOCK_KW)
    return tl.reshape(b, (BLOCK_M, ROWS * BLOCK_KW))


@triton.jit
def _fwd_kernel(
    Q, K, V,  # (Z*nh, N, HS) queries, keys, values
    RH, RW,  # (Z*nh, N, KH) rel_h and (Z*nh, N, KW) rel_w
    O,  # (Z*nh, N, HS) output
    LSE,  # (Z*nh, N) fp32 log-sum-exp of every query's logits (kept for the backward)
    N, HS, KH, KW,  # tokens, head size, key grid height and width (N == KH * KW)
    scale,  # softmax scale, hs ** -0.5
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    zh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_r, offs_c = tl.arange(0, BLOCK_D), tl.arange(0, ROWS), tl.arange(0, BLOCK_KW)
    m_ok, d_ok = offs_m < N, offs_d < HS
    Q, K, V, O = Q + zh * N * HS, K + zh * N * HS, V + zh * N * HS, O + zh * N * HS
    RH, RW = RH + zh * N * KH + offs_m[:, None] * KH, RW + zh * N * KW + offs_m[:, None] * KW
    q = tl.load(Q + offs_m[:, None] * HS + offs_d[None, :], m_ok[:, None] & d_ok[None, :], 0.0)
    rel_w = tl.load(RW + offs_c[None, :], m_ok[:, None] & (offs_c < KW)[None, :], 0.0)
    rel_w = rel_w.to(tl.float32)  # (BLOCK_M, BLOCK_KW), the same for every key block
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for y0 in range(0, KH, ROWS):
        offs_n, n_ok = _key_rows(y0, KH, KW, ROWS, BLOCK_KW)
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * HS + offs_d[None, :], kv_ok, 0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + offs_n[:, None] * HS + offs_d[None, :], kv_ok, 0.0)
        rh_ok = m_ok[:, None] & (y0 + offs_r < KH)[None, :]
        rel_h = tl.load(RH + y0 + offs_r[None, :], rh_ok, 0.0).to(tl.float32)  # (BLOCK_M, ROWS)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s += _bias(rel_h, rel_w, BLOCK_M, ROWS, BLOCK_KW)
        s = tl.where(n_ok[None, :], s, float("-inf"))  # (BLOCK_M, BLOCK_N) logits
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    o = (acc / l_i[:, None]).to(O.dtype.element_ty)
    tl.store(O + offs_m[:, None] * HS + offs_d[None, :], o, m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + zh * N + offs_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, RH, RW,  # as in the forward
    DO,  # (Z*nh, N, HS) gradient of the output
    LSE, DELTA,  # (Z*nh, N) fp32: forward lse, and rowsum(dO * O) - dlse
    DK, DV,  # (Z*nh, N, HS) outputs
    N, HS, KH, KW, scale,  # as in the forward
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    # Transposed tiles, keys first (Triton tutorial 06's dk/dv loop): S^T = K Q^T is (BLOCK_N,
    # BLOCK_M), so every product here has the key block as its M side and BLOCK_M (the streamed
    # queries) can be small without leaving Hopper's 64-row wgmma.
    zh = tl.program_id(0).to(tl.int64)
    y0 = tl.program_id(1) * ROWS  # this program's key rows
    offs_n, n_ok = _key_rows(y0, KH, KW, ROWS, BLOCK_KW)
    offs_d, offs_r, offs_c = tl.arange(0, BLOCK_D), tl.arange(0, ROWS), tl.arange(0, BLOCK_KW)
    d_ok = offs_d < HS
    base = zh * N * HS
    kv_ptrs = base + offs_n[:, None] * HS + offs_d[None, :]
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kv_ptrs, kv_ok, 0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + kv_ptrs, kv_ok, 0.0)
    dk = tl.zeros([ROWS * BLOCK_KW, BLOCK_D], tl.float32)
    dv = tl.zeros([ROWS * BLOCK_KW, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        q_ptrs = base + offs_m[:, None] * HS + offs_d[None, :]
        q = tl.load(Q + q_ptrs, m_ok[:, None] & d_ok[None, :], 0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DO + q_ptrs, m_ok[:, None] & d_ok[None, :], 0.0)
        lse = tl.load(LSE + zh * N + offs_m, m_ok, 0.0)
        delta = tl.load(DELTA + zh * N + offs_m, m_ok, 0.0)
        rh_ptrs = RH + zh * N * KH + offs_m[None, :] * KH + y0 + offs_r[:, None]
        rel_h = tl.load(rh_ptrs, m_ok[None, :] & (y0 + offs_r < KH)[:, None], 0.0)
        rw_ptrs = RW + zh * N * KW + offs_m[None, :] * KW + offs_c[:, None]
        rel_w = tl.load(rw_ptrs, m_ok[None, :] & (offs_c < KW)[:, None], 0.0)
        bias = rel_h.to(tl.float32)[:, None, :] + rel_w.to(tl.float32)[None, :, :]  # (R, KW, M)
        s = tl.dot(k, tl.trans(q), input_precision=PREC) * scale  # (BLOCK_N, BLOCK_M) S^T
        s += tl.reshape(bias, (ROWS * BLOCK_KW, BLOCK_M))
        p = tl.where(n_ok[:, None] & m_ok[None, :], tl.exp(s - lse[None, :]), 0.0)  # P^T
        dv += tl.dot(p.to(do.dtype), do, input_precision=PREC)
        dp = tl.dot(v, tl.trans(do), input_precision=PREC)  # dP^T
        ds = p * (dp - delta[None, :])  # dL/dS^T
        dk += tl.dot(ds.to(q.dtype), q, input_precision=PREC)
    tl.store(DK + kv_ptrs, (dk * scale).to(DK.dtype.element_ty), kv_ok)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), kv_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, RH, RW, DO, LSE, DELTA,  # as in _bwd_dkdv_kernel
    DQ,  # (Z*nh, N, HS) output
    DRH, DRW,  # (Z*nh, N, KH) and (Z*nh, N, KW) outputs: dL/drel_h, dL/drel_w
    N, HS, KH, KW, scale,  # as in the forward
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    zh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_r, offs_c = tl.arange(0, BLOCK_D), tl.arange(0, ROWS), tl.arange(0, BLOCK_KW)
    m_ok, d_ok = offs_m < N, offs_d < HS
    base = zh * N * HS
    q_ptrs = base + offs_m[:, None] * HS + offs_d[None, :]
    q = tl.load(Q + q_ptrs, m_ok[:, None] & d_ok[None, :], 0.0)
    do = tl.load(DO + q_ptrs, m_ok[:, None] & d_ok[None, :], 0.0)
    lse = tl.load(LSE + zh * N + offs_m, m_ok, 0.0)
    delta = tl.load(DELTA + zh * N + offs_m, m_ok, 0.0)
    rh_rows = zh * N * KH + offs_m[:, None] * KH  # (BLOCK_M, 1) offsets of rel_h and d_rel_h
    rw_ptrs = zh * N * KW + offs_m[:, None] * KW + offs_c[None, :]
    rw_ok = m_ok[:, None] & (offs_c < KW)[None, :]
    rel_w = tl.load(RW + rw_ptrs, rw_ok, 0.0).to(tl.float32)  # (BLOCK_M, BLOCK_KW)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    drw = tl.zeros([BLOCK_M, BLOCK_KW], tl.float32)
    for y0 in range(0, KH, ROWS):
        offs_n, n_ok = _key_rows(y0, KH, KW, ROWS, BLOCK_KW)
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + base + offs_n[:, None] * HS + offs_d[None, :], kv_ok, 0.0)
        v = tl.load(V + base + offs_n[:, None] * HS + offs_d[None, :], kv_ok, 0.0)
        rh_ok = m_ok[:, None] & (y0 + offs_r < KH)[None, :]
        rel_h = tl.load(RH + rh_rows + y0 + offs_r[None, :], rh_ok, 0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s += _bias(rel_h, rel_w, BLOCK_M, ROWS, BLOCK_KW)
        p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N) dL/dS
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        ds = tl.reshape(ds, (BLOCK_M, ROWS, BLOCK_KW))  # keys by (row, column) of the key grid
        drh = tl.sum(ds, 2)  # (BLOCK_M, ROWS): these rows' keys are all in this block
        tl.store(DRH + rh_rows + y0 + offs_r[None, :], drh.to(DRH.dtype.element_ty), rh_ok)
        drw += tl.sum(ds, 1)  # (BLOCK_M, BLOCK_KW)
    tl.store(DQ + q_ptrs, (dq * scale).to(DQ.dtype.element_ty), m_ok[:, None] & d_ok[None, :])
    tl.store(DRW + rw_ptrs, drw.to(DRW.dtype.element_ty), rw_ok)


# --------------------------------------------------------------------------------------------------
# Host side: launch configurations, shape checks, custom ops (torch.compile sees opaque ops)

launches: Counter = Counter()  # Triton launches by pass ("forward", "backward"), for the tests
MAX_SIDE = 128  # the widest key-grid row a block holds (BLOCK_KW); the dispatcher falls back above


def triton_supported(dtype: torch.dtype, head_size: int, window: int) -> bool:
    """What the kernels handle (one tile holds a head; a key block holds whole key-grid rows);
    the dispatcher falls back to PyTorch otherwise."""
    fits = head_size <= 128 and window <= MAX_SIDE
    return dtype in (torch.float32, torch.float16, torch.bfloat16) and fits


def launch_config(dtype: torch.dtype, hs: int, kh: int, kw: int, capability: int = 90) -> dict:
    """Block sizes, dot precision, warps and stages of each kernel ("forward", "dkdv", "dq") for
    one shape: the only place they are chosen, read by the launches below and by
    `python kernels/bench.py --aot`, which compiles every configuration this can return for the
    H100/H200 and prints registers and spills (docs/kernels.md has the tables).

    A key block is ROWS key-grid rows of BLOCK_KW columns: about 64 keys, at least 16 (tl.dot's
    minimum). The numbers are the largest tiles that compile without spilling in bf16/fp16, not
    yet timed on a GPU (none was available): a head of 80 is padded to BLOCK_D 128, whose fp32
    accumulators need 8 warps in both backward kernels (and the dk/dv kernel's query blocks
    halved, as for every head size: its tiles are transposed, keys first).

    fp32 is for parity checks only (the dispatcher's "auto" sends fp32 to PyTorch's SDPA): its dots
    run as "tf32x3" (three tf32 products per fp32 one, fp32 accuracy on the tensor cores) with
    16-query blocks; it still spills a little at head size 80 (docs/kernels.md). Full "ieee" fp32
    dots run on the FMA units and spill far more at any useful tile size.

    capability: the GPU's (80 for the A100, 90 for the H100/H200; `capability_of`). Before sm_90
    the dots are mma.sync, each warp holding its share of the accumulators, so the bf16/fp16
    tiles above spill on sm_8x; there the forward runs on 8 warps, dk/dv on 16-query blocks and
    dq on 32-query blocks of 4 warps (the sm_80 sweep's largest tiles without spills)."""
    bd, bkw = max(16, triton.next_power_of_2(hs)), triton.next_power_of_2(kw)
    fp32, wide = dtype == torch.float32, bd > 64
    rows = max(1, min(64 // bkw, triton.next_power_of_2(kh)), triton.cdiv(16, bkw))
    common = dict(ROWS=rows, BLOCK_KW=bkw, BLOCK_D=bd, PREC="tf32x3" if fp32 else "tf32")
    forward = dict(common, BLOCK_M=16 if fp32 else 64, num_warps=4, num_stages=2)
    dkdv = dict(common, BLOCK_M=16 if fp32 else 32, num_warps=8 if wide else 4, num_stages=2)
    dq = dict(forward, num_warps=8 if wide and not fp32 else 4)
    if capability < 90 and not fp32:  # mma.sync: smaller tiles per warp (docs/kernels.md)
        forward, dkdv = dict(forward, num_warps=8), dict(dkdv, BLOCK_M=16)
        dq = dict(dq, BLOCK_M=32, num_warps=4)
    return dict(forward=forward, dkdv=dkdv, dq=dq)


def capability_of(t: torch.Tensor) -> int:
    """launch_config's capability for the device of t: major * 10 + minor on CUDA; 90 elsewhere
    (the interpreter runs any configuration)."""
    if not t.is_cuda:
        return 90
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _check(q, k, v, rel_h, rel_w):
    Z, nh, N, hs = q.shape
    assert k.shape == v.shape == q.shape, f"q, k, v shapes differ: {q.shape} {k.shape} {v.shape}"
    assert rel_h.shape[:3] == rel_w.shape[:3] == (Z, nh, N), (
        f"rel terms {rel_h.shape} {rel_w.shape}"
    )
    assert rel_h.shape[-1] * rel_w.shape[-1] == N, "the key grid kh x kw must hold the N tokens"
    assert q.dtype == k.dtype == v.dtype, "q, k, v must share a dtype"
    assert rel_w.shape[-1] <= MAX_SIDE, f"key-grid rows of {rel_w.shape[-1]} > {MAX_SIDE}"


@torch.library.custom_op("sam_med2d::rel_pos_attention", mutates_args=())
def _rel_pos_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    Z, nh, N, hs = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    o = torch.empty_like(q)  # inputs are contiguous (attention_triton), so o is too
    lse = torch.empty((Z, nh, N), device=q.device, dtype=torch.float32)
    launches["forward"] += 1
    c = launch_config(q.dtype, hs, kh, kw, capability_of(q))["forward"]
    grid = (Z * nh, triton.cdiv(N, c["BLOCK_M"]))
    _fwd_kernel[grid](q, k, v, rel_h, rel_w, o, lse, N, hs, kh, kw, scale, **c)
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
    c = launch_config(q.dtype, hs, kh, kw, capability_of(q))
    launches["backward"] += 1
    args = (q, k, v, rel_h, rel_w, do, lse, delta)
    dkdv, dq_c = c["dkdv"], c["dq"]
    grid = (Z * nh, triton.cdiv(kh, dkdv["ROWS"]))
    _bwd_dkdv_kernel[grid](*args, dk, dv, N, hs, kh, kw, scale, **dkdv)
    grid = (Z * nh, triton.cdiv(N, dq_c["BLOCK_M"]))
    _bwd_dq_kernel[grid](*args, dq, drh, drw, N, hs, kh, kw, scale, **dq_c)
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
    qkv = onednn.linear(x, qkv_w, qkv_b)  # (B, H, W, 3C); packed on the bf16 fast path
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
    return onednn.linear(out, proj_w, proj_b)  # (B, H, W, C)
