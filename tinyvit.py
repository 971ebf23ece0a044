"""LiteMedSAM's image encoder (preset lite_medsam): MobileSAM's TinyViT, as LiteMedSAM changed it.

    image (B,3,S,S) --patch embed: two 1x1 convs--> (B,C0,S,S)
        --stage 0: MBConv blocks--> merge --> (B,C1,S/2,S/2)
        --stage 1: TinyViT blocks--> merge --> (B,C2,S/4,S/4)
        --stage 2: TinyViT blocks--> merge (keeps the grid) --> (B,C3,S/4,S/4)
        --stage 3: TinyViT blocks--> neck --> embedding (B,D,S/4,S/4)

Stage 0 is convolutional (MBConv: 1x1 expand, 3x3 depthwise, 1x1 project, residual); stages 1-3
are TinyViT blocks: window attention with a LayerNorm in front and a learned bias per head and per
|offset| inside the window, a depthwise 3x3 conv, then an MLP with its own LayerNorm. A
PatchMerging conv block widens the channels between stages and halves the grid, except before the
last stage, which keeps it. LiteMedSAM's patch embedding is two 1x1 convs (stride 1), so at S = 256
stage 0 runs on the full 256x256 grid and the output is 64x64 (S/4, cfg.patch_size = 4), where
SAM-Med2D's ViT gives 16x16. Every conv is followed by BatchNorm, kept at the checkpoint's running
statistics (see FrozenBatchNorm2d). Parameter names are LiteMedSAM's, so its file loads strictly.
fuse_for_inference turns a copy into the same function in fewer, cheaper steps (BatchNorms folded,
activations in place, fused attention): what precision.py's bf16 fast path runs.

This module is built from model.py's parts (SamConfig, the Adapter, LayerNorm2d, window
partitioning) and model.Sam builds it when cfg.encoder == "tinyvit". Shapes as in model.py's legend.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from model import PRESETS, Adapter, LayerNorm2d, SamConfig, window_partition, window_unpartition


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics, in train mode too.

    The image encoder is frozen when fine-tuning (SAM-Med2D's recipe), and a batch of a few
    images would give poor statistics: model.train() must not change what the encoder computes.
    """

    def forward(self, x):
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def gelu_(x):
    """GELU (exact, erf) in place: an inference copy's activations overwrite the conv output they
    come from instead of allocating a new map (autograd could not go back through it)."""
    return torch.ops.aten.gelu_(x)


class ConvBN(nn.Module):
    """Conv2d without bias + BatchNorm (TinyViT's Conv2d_BN; the names `c` and `bn` are kept)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = FrozenBatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.c(x))

    @torch.no_grad()
    def fold(self):
        """Fold the frozen BatchNorm into the conv (an inference copy's one op instead of two):
        bn(c(x)) = s (W x - mean) + beta = (s W) x + (beta - s mean), s = gamma / sqrt(var+eps)."""
        bn = self.bn
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C',)
        self.c.weight.mul_(s[:, None, None, None])
        self.c.bias = nn.Parameter(bn.bias - bn.running_mean * s)
        self.bn = nn.Identity()


class MBConv(nn.Module):
    """Stage 0's inverted-residual conv block on (B, C, H, W)."""

    inplace = False  # True in an inference copy (fuse_for_inference): GELU and add in place

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x):
        if self.inplace:  # the same ops, without three fresh full-grid maps per block
            y = gelu_(self.conv2(gelu_(self.conv1(x))))  # (B, ratio*C, H, W)
            return gelu_(self.conv3(y).add_(x))
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))  # (B, ratio*C, H, W)
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """(B, C, H, W) -> (B, C', H/stride, W/stride): 1x1 conv, 3x3 depthwise (strided), 1x1 conv."""

    inplace = False  # as MBConv's

    def __init__(self, dim: int, out: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out)
        self.conv2 = ConvBN(out, out, 3, stride, groups=out)
        self.conv3 = ConvBN(out, out)

    def forward(self, x):
        act = gelu_ if self.inplace else F.gelu
        return self.conv3(act(self.conv2(act(self.conv1(x)))))


def window_offset_index(window: int, device=None):
    """(L, L) index of each (query, key) pair's offset |dy| * window + |dx|, L = window^2.

    TinyViT learns one attention bias per head and per absolute offset; this numbering is the
    order in which its reference code first meets the offsets (all of them appear from (0, 0)).
    """
    r = torch.arange(window, device=device)
    yx = torch.stack(torch.meshgrid(r, r, indexing="ij")).flatten(1)  # (2, L)
    d = (yx[:, :, None] - yx[:, None, :]).abs()  # (2, L, L)
    return d[0] * window + d[1]  # (L, L)


class TinyViTAttention(nn.Module):
    """Attention within one window, (B, w, w, C) -> (B, w, w, C); LayerNorm applied first.

    `fused` (set in an inference copy by fuse_for_inference): the same attention through
    F.scaled_dot_product_attention with the bias as its mask, which never materialises the
    (B, nh, L, L) probabilities in memory; equal to the reference up to rounding."""

    fused = False

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)  # per head: q, k, v side by side (TinyViT's layout)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))

    def forward(self, x):
        h = x.shape[1]
        qkv = self.qkv(self.norm(x))  # (B, w, w, 3C)
        qkv = rearrange(qkv, "b y x (nh k hs) -> k b nh (y x) hs", nh=self.heads, k=3)
        q, k, v = qkv.unbind(0)  # each (B, nh, L, hs)
        bias = self.attention_biases[:, window_offset_index(self.window, x.device)]  # (nh, L, L)
        if self.fused:
            mask = bias.to(q.dtype)[None]  # (1, nh, L, L): 4-D, q's dtype: the fused CPU kernel
            out = F.scaled_dot_product_attention(q, k, v, mask, scale=self.scale)
            return self.proj(rearrange(out, "b nh (y x) hs -> b y x (nh hs)", y=h))
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias  # (B, nh, L, L)
        out = attn.softmax(dim=-1) @ v  # (B, nh, L, hs)
        return self.proj(rearrange(out, "b nh (y x) hs -> b y x (nh hs)", y=h))


class TinyMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """x += window_attn(x); x = local_conv(x); x += mlp(x) [+ adapter(mlp.norm(x))].

    With cfg.adapter, SAM-Med2D's Adapter sits beside the MLP on the MLP's normalised input, as it
    sits beside the ViT block's MLP on norm2(x).
    """

    def __init__(self, cfg: SamConfig, dim: int, heads: int, window: int):
        super().__init__()
        self.window = window
        self.attn = TinyViTAttention(dim, heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = TinyMLP(dim, int(dim * cfg.mlp_ratio))
        self.Adapter = Adapter(dim, cfg.adapter_ratio, cfg.adapter_init) if cfg.adapter else None

    def forward(self, x):  # x: (B, C, H, W)
        y = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.attn(window_partition(y, self.window))  # (B*nw, window, window, C), zero-padded
        y = window_unpartition(y, self.window, x.shape[2:])  # (B, H, W, C)
        x = self.local_conv(x + y.permute(0, 3, 1, 2))  # (B, C, H, W)
        y = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        if self.Adapter is None:
            y = y + self.mlp(y)
        else:
            y = y + self.mlp(y) + self.Adapter(self.mlp.norm(y))
        return y.permute(0, 3, 1, 2)  # (B, C, H, W)


class TinyViTStage(nn.Module):
    def __init__(self, blocks: list, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyPatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(3, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x):
        return self.seq(x)  # (B, C0, S, S): 1x1 convs, the grid is the image


class TinyViT(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        dims, n = cfg.stage_dims, len(cfg.stage_dims)
        self.patch_embed = TinyPatchEmbed(dims[0])
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.stage_depths):
            if i == 0:
                blocks = [MBConv(dims[0], cfg.mlp_ratio) for _ in range(depth)]
            else:
                args = (dims[i], cfg.stage_heads[i], cfg.stage_windows[i])
                blocks = [TinyViTBlock(cfg, *args) for _ in range(depth)]
            # Each merge halves the grid, but the last one keeps it (MobileSAM's 64x64 output).
            merge = PatchMerging(dims[i], dims[i + 1], 2 if i < n - 2 else 1) if i < n - 1 else None
            self.layers.append(TinyViTStage(blocks, merge))
        D = cfg.prompt_dim
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], D, 1, bias=False), LayerNorm2d(D),
            nn.Conv2d(D, D, 3, padding=1, bias=False), LayerNorm2d(D),
        )  # fmt: skip

    def forward(self, x):  # x: (B, 3, S, S) normalised
        x = self.patch_embed(x)  # (B, C0, S, S)
        for layer in self.layers:
            x = layer(x)  # ends (B, C3, S/4, S/4)
        return self.neck(x)  # (B, D, S/4, S/4)


FUSIONS = ("fold_batchnorm", "in_place", "sdpa")  # fuse_for_inference's steps


def fuse_for_inference(enc: TinyViT, steps=FUSIONS) -> TinyViT:
    """Turn `enc` (a copy: its weights change) into an inference-only encoder computing the same
    function: BatchNorms folded into their convs, GELUs and residual adds in place, attention
    through scaled_dot_product_attention (`steps`: all by default; fewer to measure each one).
    Equal to the original up to fp32 rounding (~1e-6 relative, tests/test_precision.py);
    precision.py runs it in bf16."""
    for m in enc.modules():
        if isinstance(m, ConvBN) and "fold_batchnorm" in steps:
            m.fold()
        elif isinstance(m, (MBConv, PatchMerging)):
            m.inplace = "in_place" in steps
        elif isinstance(m, TinyViTAttention):
            m.fused = "sdpa" in steps
    return enc.requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Recognising LiteMedSAM's layout from its tensors
# ------------------------------------------------------------------------------------------------


def check_config(cfg: SamConfig) -> None:
    """SamConfig's checks of the stage_* fields (called from its __post_init__)."""
    n = len(cfg.stage_dims)
    lengths = {len(getattr(cfg, f)) for f in ("stage_depths", "stage_heads", "stage_windows")}
    if n < 2 or lengths != {n}:
        raise ValueError("TinyViT needs stage_dims/depths/heads/windows of one length >= 2")
    if cfg.patch_size != 2 ** (n - 2):
        raise ValueError(f"{n} TinyViT stages: patch_size must be {2 ** (n - 2)}")
    if any(d % h for d, h in zip(cfg.stage_dims[1:], cfg.stage_heads[1:], strict=True)):
        raise ValueError(f"stage_dims {cfg.stage_dims} not divisible by {cfg.stage_heads}")


def config_from_state_dict(sd: dict, path) -> SamConfig:
    """LiteMedSAM's layout: stage widths and depths, heads and windows (from the attention-bias
    tables, (heads, window^2)) read off the tensors, then matched against the tinyvit presets."""
    pre = "image_encoder.layers."
    try:
        n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(pre))
        depths = [len({k.split(".")[4] for k in sd if k.startswith(f"{pre}{i}.blocks.")})
                  for i in range(n)]  # fmt: skip
        dims = [sd[f"{pre}0.blocks.0.conv1.c.weight"].shape[1]]
        dims += [sd[f"{pre}{i}.blocks.0.attn.qkv.weight"].shape[1] for i in range(1, n)]
        biases = [sd[f"{pre}{i}.blocks.0.attn.attention_biases"].shape for i in range(1, n)]
        D = sd["prompt_encoder.no_mask_embed.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"{path}: not a LiteMedSAM checkpoint: missing {e.args[0]}") from None
    heads, windows = [b[0] for b in biases], [math.isqrt(b[1]) for b in biases]
    found = dict(stage_dims=tuple(dims), stage_depths=tuple(depths))
    for name, p in PRESETS.items():
        if p.get("encoder") == "tinyvit" and all(p[k] == v for k, v in found.items()):
            if (list(p["stage_heads"][1:]), list(p["stage_windows"][1:])) == (heads, windows):
                if p.get("prompt_dim", 256) == D:
                    return SamConfig.from_name(name, adapter=any(".Adapter." in k for k in sd))
    raise ValueError(
        f"{path}: TinyViT with dims {dims}, depths {depths}, heads {heads}, windows {windows}, "
        f"prompt dim {D} matches no preset"
    )
