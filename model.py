"""SAM-Med2D: the Segment Anything Model with adapters for 2D medical images, in one file.

The structure follows the paper's figure and Meta's `segment_anything`, whose parameter names every
SAM and SAM-Med2D checkpoint uses (so they are kept here and loaded strictly). One image, vit_b at
S = 256 (SAM-Med2D's setting):

    image (B,3,256,256), normalised by data.preprocess
      --ImageEncoder: 16x16 patches + pos_embed       --> tokens (B,16,16,768)
        12 x Block: x += attn(norm1 x)                    windowed 14x14, or global in 2, 5, 8, 11;
                    x += mlp(norm2 x) + Adapter(norm2 x)  SAM-Med2D's adapter beside every MLP
        neck: 1x1 conv, 3x3 conv                      --> embedding (B,256,16,16)
    points (P,N,2) + labels (P,N), boxes (P,4), previous mask (P,1,64,64) as probabilities
      --PromptEncoder--> sparse tokens (P,T,256) + dense map (P,256,16,16)
    embedding (shared by the prompts of its image) + dense map, tokens
      --MaskDecoder: two-way transformer, hypernetwork MLPs--> logits (P,3,64,64) + IoU (P,3)
      --select_best--> the mask with the highest predicted IoU (P,1,64,64)

Shape legend: B images, P prompts (a multiple of B: each image serves P/B prompts), N points per
prompt, T prompt tokens, S image size, h/w token grid (S/16; S/4 for LiteMedSAM's TinyViT), C
encoder channels, D prompt/decoder channels, nh heads, hs head size, L tokens in an attention call.

Sections: config | image encoder | prompt encoder | mask decoder | Sam | checkpoints (which layout,
which keys, resize). Beside this file: kernels/ (the encoder's fast attention and adapter paths,
checked against the reference math here), tinyvit.py (LiteMedSAM's encoder, the lite_medsam
preset), checkpoints.py (reading checkpoint files safely, downloads), model_cli.py (the command
line: convert, info, bench, export-onnx; docs/model.md).
"""

import math
import sys
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import checkpoints
import kernels
from cli import main_guard
from kernels import use_kernels  # noqa: F401  (model.use_kernels: switch a model's path)
from kernels.attention import rel_pos_table

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

# Encoder presets as data. Decoder dims are SAM's for every real preset; `tiny` shrinks everything
# so tests run in seconds on a CPU, keeping the structure (windows with padding, global blocks).
PRESETS = {
    "vit_b": dict(encoder_dim=768, encoder_depth=12, encoder_heads=12, global_attn=(2, 5, 8, 11)),
    "vit_l": dict(encoder_dim=1024, encoder_depth=24, encoder_heads=16,
                  global_attn=(5, 11, 17, 23)),
    "vit_h": dict(encoder_dim=1280, encoder_depth=32, encoder_heads=16,
                  global_attn=(7, 15, 23, 31)),
    "tiny": dict(
        encoder_dim=64, encoder_depth=4, encoder_heads=2, global_attn=(1, 3),
        prompt_dim=32, decoder_heads=2, decoder_mlp_dim=64,
    ),
    # LiteMedSAM (MedSAM distilled into MobileSAM's TinyViT): a 64x64 embedding from a 256 image;
    # MedSAM's preprocessing: longest side to 256, per-image min-max to [0, 1], pad bottom/right.
    "lite_medsam": dict(
        encoder="tinyvit", patch_size=4, stage_dims=(64, 128, 160, 320),
        stage_depths=(2, 2, 6, 2), stage_heads=(2, 4, 5, 10), stage_windows=(7, 7, 14, 7),
        global_attn=(), adapter=False, resize_mode="longest", intensity="min_max",
    ),
}  # fmt: skip

# The settings that take one of a few values (and which: checked in SamConfig.__post_init__).
CHOICES = dict(
    channel_order=("RGB", "BGR"), resize_mode=("stretch", "longest"),
    intensity=("mean_std", "min_max"), encoder=("vit", "tinyvit"), kernels=("auto", "reference"),
    adapter_init=("official", "torch"),
)  # fmt: skip


@dataclass
class SamConfig:
    name: str = "vit_b"  # preset name, kept so a checkpoint names its architecture
    image_size: int = 256  # S: SAM-Med2D works at 256, the original SAM at 1024
    patch_size: int = 16  # encoder stride: ViT patch (grid S/16); TinyViT: 2**(stages-2) = 4
    encoder: str = "vit"  # "vit" (SAM's, the encoder_* fields) or "tinyvit" (the stage_* fields)
    encoder_dim: int = 768  # C
    encoder_depth: int = 12  # transformer blocks
    encoder_heads: int = 12
    global_attn: tuple = (2, 5, 8, 11)  # blocks with global attention; all others use windows
    window_size: int = 14  # windowed blocks attend within 14x14 token windows (grid padded to fit)
    mlp_ratio: float = 4.0  # also TinyViT's MBConv expansion
    stage_dims: tuple = ()  # TinyViT: channels per stage; stage 0 is convolutional
    stage_depths: tuple = ()  # TinyViT: blocks per stage
    stage_heads: tuple = ()  # TinyViT: heads per stage (unused by stage 0)
    stage_windows: tuple = ()  # TinyViT: attention window per stage (unused by stage 0)
    adapter: bool = True  # SAM-Med2D's adapter in every block
    adapter_ratio: float = 0.25  # the adapter's channel gate squeezes C -> C/4
    adapter_init: str = "official"  # new adapters: kaiming fan_out; "torch": Linears keep torch's
    prompt_dim: int = 256  # D: prompt tokens, image embedding and decoder width
    decoder_depth: int = 2  # two-way transformer blocks
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask: int = 3  # masks predicted besides the single-mask output
    single_mask: bool = False  # trained on the single-mask output (train.py --no-multimask)
    pixel_mean: tuple = (123.675, 116.28, 103.53)  # SAM's RGB statistics on 0-255 pixels
    pixel_std: tuple = (58.395, 57.12, 57.375)
    channel_order: str = "RGB"  # order the weights expect; SAM-Med2D's were trained on BGR (OpenCV)
    resize_mode: str = "stretch"  # "stretch" (SAM-Med2D) or "longest" side + pad (SAM): see data.py
    intensity: str = "mean_std"  # "mean_std": pixel_mean/std; "min_max": MedSAM's per-image [0, 1]
    mask_threshold: float = 0.0  # on logits
    kernels: str = "auto"  # "auto": fastest exact path per call; "reference": the official math
    embed_size: int = field(init=False)  # h = w = S / patch_size
    low_res_size: int = field(init=False)  # decoder output: 4 x the embedding grid = S/4

    def __post_init__(self):
        self.global_attn = tuple(self.global_attn)
        for f in ("stage_dims", "stage_depths", "stage_heads", "stage_windows"):
            setattr(self, f, tuple(getattr(self, f)))
        self.pixel_mean, self.pixel_std = tuple(self.pixel_mean), tuple(self.pixel_std)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {self.patch_size}")
        for name, allowed in CHOICES.items():
            if (value := getattr(self, name)) not in allowed:
                raise ValueError(f"{name} must be {' or '.join(allowed)}, not {value!r}")
        if self.encoder == "tinyvit":
            import tinyvit  # noqa: PLC0415  (it imports model, so it is imported when needed)

            tinyvit.check_config(self)
        if any(not 0 <= i < self.encoder_depth for i in self.global_attn):
            raise ValueError(f"global_attn {self.global_attn} outside 0..{self.encoder_depth - 1}")
        self.embed_size = self.image_size // self.patch_size
        self.low_res_size = 4 * self.embed_size

    @classmethod
    def from_name(cls, name: str, **overrides) -> "SamConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(name=name, **{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


# ------------------------------------------------------------------------------------------------
# Image encoder: SAM's ViT (windowed attention with decomposed relative positions) + adapters
# ------------------------------------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)  # (B, 1, H, W)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, act=nn.GELU):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x)))


def window_partition(x, window: int):
    """(B, H, W, C) -> (B * nw, window, window, C), zero-padding H and W to multiples of window."""
    _, H, W, _ = x.shape
    pad_h, pad_w = (window - H % window) % window, (window - W % window) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
    return rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) wh ww c", wh=window, ww=window)


def window_unpartition(x, window: int, hw: tuple):
    """Inverse of window_partition: (B * nw, window, window, C) -> (B, H, W, C), padding dropped."""
    H, W = hw
    Hp, Wp = H + (window - H % window) % window, W + (window - W % window) % window
    x = rearrange(x, "(b nh nw) wh ww c -> b (nh wh) (nw ww) c", nh=Hp // window, nw=Wp // window)
    return x[:, :H, :W, :]  # (B, H, W, C)


def add_rel_pos(attn, q, rel_pos_h, rel_pos_w, hw: tuple):
    """attn (B, L, L) + SAM's decomposed relative-position bias, L = h*w tokens:

    attn[(qy,qx), (ky,kx)] += q[qy,qx] . Rh[qy-ky] + q[qy,qx] . Rw[qx-kx]  (q unscaled).
    The two terms are added one after the other, as Meta's add_decomposed_rel_pos does: in that
    order the reference path's results are bit for bit the official ones.
    """
    h, w = hw
    Rh, Rw = rel_pos_table(h, rel_pos_h), rel_pos_table(w, rel_pos_w)  # (h, h, hs), (w, w, hs)
    r_q = q.reshape(q.shape[0], h, w, q.shape[-1])  # (B, h, w, hs)
    rel_h = torch.einsum("byxc,ykc->byxk", r_q, Rh)  # (B, h, w, h): one term per key row
    rel_w = torch.einsum("byxc,xkc->byxk", r_q, Rw)  # (B, h, w, w): one term per key column
    attn = attn.view(-1, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return attn.view(-1, h * w, h * w)  # (B, L, L)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, h, w, C) grid with decomposed relative positions,
    within window x window tiles (window > 0) or over the whole grid (window = 0, global)."""

    def __init__(self, dim: int, heads: int, grid: int, window: int = 0):
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # Zero at initialisation, as in SAM; checkpoints fill them.
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, dim // heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, dim // heads))

    def forward(self, x, impl: str = "reference"):  # x: (B, h, w, C), the whole unpadded grid
        if impl != "reference":  # kernels/: real tokens only, bias never materialised; same math
            return kernels.attention_layer(
                x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias,
                self.rel_pos_h, self.rel_pos_w, self.heads, self.window, impl=impl,
            )  # fmt: skip
        y = window_partition(x, self.window) if self.window else x  # (B*nw, window, window, C)
        y = self.attend(y)
        return window_unpartition(y, self.window, x.shape[1:3]) if self.window else y

    def attend(self, x):
        """The official computation on (B', h', w', C) tiles: every token, materialised bias."""
        B, h, w, C = x.shape
        qkv = rearrange(self.qkv(x), "b y x (k nh hs) -> k (b nh) (y x) hs", k=3, nh=self.heads)
        q, k, v = qkv.unbind(0)  # each (B*nh, L, hs)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nh, L, L)
        attn = add_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w))  # (B*nh, L, L)
        out = attn.softmax(dim=-1) @ v  # (B*nh, L, hs)
        out = rearrange(out, "(b nh) (y x) hs -> b y x (nh hs)", nh=self.heads, y=h)
        return self.proj(out)  # (B, h, w, C)


class Adapter(nn.Module):
    """SAM-Med2D's adapter: a channel gate, then a spatial 3x3 conv (stride 2) / 4x4 deconv branch.

    adapter(x) = LayerNorm(x + relu(deconv(relu(conv(g * x))))),
    g = sigmoid(W2 relu(W1 mean_hw(x))). Its LayerNorm keeps PyTorch's default eps (1e-5), unlike
    the block norms (1e-6), as the official code does.
    """

    def __init__(self, dim: int, ratio: float = 0.25, init: str = "official"):
        super().__init__()
        hidden = int(dim * ratio)
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False),
            nn.Sigmoid(),
        )  # fmt: skip
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, 3, stride=2, padding=1, bias=False), nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1, bias=False), nn.ReLU(),
        )  # fmt: skip
        self.norm = nn.LayerNorm(dim)
        # The official init, in its order (so one seed gives the official weights): std =
        # sqrt(2 / fan_out), fan_out = out channels x kernel area (dim 0 for all four weights).
        for m in (self.channel[0], self.channel[2], self.spatial[0], self.spatial[2]):
            if init == "official" or not isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):  # x: (B, h, w, C) -> (B, h, w, C); the official computation
        gate = self.channel(x.mean(dim=(1, 2)))  # (B, C)
        xc = (x * gate[:, None, None, :]).permute(0, 3, 1, 2)  # (B, C, h, w)
        xs = self.spatial(xc).permute(0, 2, 3, 1)  # (B, h, w, C); the deconv restores h and w
        return self.norm(x + xs)

    def fused(self, x, residual, mlp, impl: str = "auto"):
        """residual + mlp + adapter(x) through kernels/ (fused gate and epilogue, faster convs)."""
        ch, sp = self.channel, self.spatial
        return kernels.adapter_layer(
            x, ch[0].weight, ch[2].weight, sp[0].weight, sp[2].weight, self.norm.weight,
            self.norm.bias, self.norm.eps, residual=residual, mlp=mlp, impl=impl,
        )  # fmt: skip


class Block(nn.Module):
    """Pre-norm ViT block: x += attn(norm1(x)); x += mlp(norm2(x)) [+ adapter(norm2(x))].

    `kernels` ("auto" from the config, or "reference", "torch", "triton"; see kernels/) picks the
    attention and adapter path on every call; `use_kernels(model, impl)` switches a whole model."""

    def __init__(self, cfg: SamConfig, index: int):
        super().__init__()
        dim, is_global = cfg.encoder_dim, index in cfg.global_attn
        self.window = 0 if is_global else cfg.window_size
        self.kernels = cfg.kernels
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        grid = cfg.embed_size if is_global else self.window
        self.attn = Attention(dim, cfg.encoder_heads, grid, self.window)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio))
        self.Adapter = Adapter(dim, cfg.adapter_ratio, cfg.adapter_init) if cfg.adapter else None

    def forward(self, x):  # x: (B, h, w, C)
        x = x + self.attn(self.norm1(x), self.kernels)
        y = self.norm2(x)
        if self.Adapter is None:
            return x + self.mlp(y)
        if self.kernels == "reference":
            return x + self.mlp(y) + self.Adapter(y)
        return self.Adapter.fused(y, residual=x, mlp=self.mlp(y), impl=self.kernels)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)  # (B, h, w, C)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        C, g, D = cfg.encoder_dim, cfg.embed_size, cfg.prompt_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, C)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, C))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.encoder_depth))
        self.neck = nn.Sequential(
            nn.Conv2d(C, D, 1, bias=False), LayerNorm2d(D),
            nn.Conv2d(D, D, 3, padding=1, bias=False), LayerNorm2d(D),
        )  # fmt: skip

    def forward(self, x):  # x: (B, 3, S, S) normalised
        x = self.patch_embed(x) + self.pos_embed  # (B, h, w, C)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))  # (B, D, h, w)


# ------------------------------------------------------------------------------------------------
# Prompt encoder: points and box corners as random-Fourier positions + learned type embeddings;
# a previous mask as a dense map through a small conv downscaler
# ------------------------------------------------------------------------------------------------


class PositionEmbeddingRandom(nn.Module):
    """Positions in [0, 1]^2 -> [sin, cos](2 pi (2p - 1) G), with a fixed random Gaussian G."""

    def __init__(self, num_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))

    def encode(self, coords):  # coords (..., 2) in [0, 1], x then y
        coords = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)  # (..., D)

    def grid(self, h: int, w: int):
        """The dense encoding of every token centre of an h x w grid: (D, h, w)."""
        m = self.positional_encoding_gaussian_matrix
        y = (torch.arange(h, device=m.device, dtype=m.dtype) + 0.5) / h
        x = (torch.arange(w, device=m.device, dtype=m.dtype) + 0.5) / w
        xy = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # (h, w, 2)
        return self.encode(xy).permute(2, 0, 1)  # (D, h, w)

    def points(self, coords, image_size: int):
        """Pixel coordinates (..., 2) in the S x S model space -> (..., D)."""
        return self.encode(coords / image_size)


class PromptEncoder(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        D, self.image_size, self.grid_size = cfg.prompt_dim, cfg.image_size, cfg.embed_size
        self.pe_layer = PositionEmbeddingRandom(D // 2)
        # Type embeddings: 0 negative point, 1 positive point, 2 box top-left, 3 box bottom-right.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, D) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, D)  # padding points (label -1)
        self.mask_downscaling = nn.Sequential(  # (P, 1, 4h, 4w) -> (P, D, h, w); 4 and 16 as SAM
            nn.Conv2d(1, 4, 2, stride=2), LayerNorm2d(4), nn.GELU(),
            nn.Conv2d(4, 16, 2, stride=2), LayerNorm2d(16), nn.GELU(),
            nn.Conv2d(16, D, 1),
        )  # fmt: skip
        self.no_mask_embed = nn.Embedding(1, D)

    def dense_pe(self):
        return self.pe_layer.grid(self.grid_size, self.grid_size)[None]  # (1, D, h, w)

    def embed_points(self, coords, labels, pad: bool):
        if pad:  # without a box, SAM appends one padding point
            coords = F.pad(coords, (0, 0, 0, 1))  # (P, N+1, 2)
            labels = F.pad(labels, (0, 1), value=-1)  # (P, N+1)
        emb = self.pe_layer.points(coords + 0.5, self.image_size)  # (P, N, D); +0.5: pixel centres
        labels = labels[..., None]
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        emb = emb + (labels == 0) * self.point_embeddings[0].weight
        return emb + (labels == 1) * self.point_embeddings[1].weight

    def embed_boxes(self, boxes):
        corners = self.pe_layer.points(boxes.reshape(-1, 2, 2) + 0.5, self.image_size)  # (P, 2, D)
        types = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return corners + types  # (P, 2, D)

    def forward(self, points=None, boxes=None, masks=None):
        """-> sparse (P, T, D) tokens and dense (P, D, h, w) map."""
        given = [t for t in (points[0] if points else None, boxes, masks) if t is not None]
        P = given[0].shape[0] if given else 1
        W = self.no_mask_embed.weight
        sparse = [W.new_zeros(P, 0, W.shape[1])]
        if points is not None:
            sparse.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.mask_downscaling(masks)  # (P, D, h, w)
        else:
            dense = W.reshape(1, -1, 1, 1).expand(P, -1, self.grid_size, self.grid_size)
        return torch.cat(sparse, dim=1), dense


# ------------------------------------------------------------------------------------------------
# Mask decoder: a two-way transformer between the prompt tokens and the image embedding, then
# hypernetwork MLPs that turn each mask token into weights for a dot product with upscaled features
# ------------------------------------------------------------------------------------------------


class DecoderAttention(nn.Module):
    """Attention with separate q/k/v projections, optionally to a narrower inner width."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner, self.heads = dim // downsample, heads
        self.q_proj, self.k_proj = nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.v_proj, self.out_proj = nn.Linear(dim, inner), nn.Linear(inner, dim)

    def forward(self, q, k, v):
        split = lambda t: rearrange(t, "p l (nh hs) -> p nh l hs", nh=self.heads)
        q, k, v = split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (P, nh, Lq, Lk)
        out = rearrange(attn.softmax(dim=-1) @ v, "p nh l hs -> p l (nh hs)")
        return self.out_proj(out)


class TwoWayBlock(nn.Module):
    """Tokens attend to themselves, tokens -> image, MLP on tokens, image -> tokens (post-norm)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, skip_first_pe: bool):
        super().__init__()
        self.self_attn = DecoderAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = DecoderAttention(dim, heads, downsample=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = DecoderAttention(dim, heads, downsample=2)
        self.skip_first_pe = skip_first_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_pe:  # the first block replaces the tokens by their self-attention
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayBlock(dim, heads, mlp_dim, skip_first_pe=i == 0) for i in range(depth)
        )
        self.final_attn_token_to_image = DecoderAttention(dim, heads, downsample=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image, image_pe, tokens):
        """image, image_pe (P, D, h, w); tokens (P, T, D) -> tokens (P, T, D), image (P, h*w, D)."""
        keys, key_pe = image.flatten(2).transpose(1, 2), image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=tokens, key_pe=key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MLP(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int, depth: int):
        super().__init__()
        dims = [dim_in] + [hidden] * (depth - 1) + [dim_out]
        pairs = zip(dims[:-1], dims[1:], strict=True)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        D, n = cfg.prompt_dim, cfg.num_multimask + 1
        self.num_mask_tokens = n
        self.transformer = TwoWayTransformer(
            D, cfg.decoder_depth, cfg.decoder_heads, cfg.decoder_mlp_dim
        )
        self.iou_token = nn.Embedding(1, D)
        self.mask_tokens = nn.Embedding(n, D)  # token 0: single-mask output; 1..3: multimask
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(D, D // 4, 2, stride=2), LayerNorm2d(D // 4), nn.GELU(),
            nn.ConvTranspose2d(D // 4, D // 8, 2, stride=2), nn.GELU(),
        )  # fmt: skip
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(D, D, D // 8, 3) for _ in range(n))
        self.iou_prediction_head = MLP(D, D, n, 3)

    def forward(self, image, image_pe, sparse, dense, multimask: bool):
        """image (P, D, h, w) already one per prompt -> logits (P, K, 4h, 4w), iou (P, K)."""
        P = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])  # (1+n, D)
        tokens = torch.cat([out_tokens.expand(P, -1, -1), sparse], dim=1)  # (P, 1+n+T, D)
        src = image + dense  # (P, D, h, w)
        hs, src = self.transformer(src, image_pe.expand(P, -1, -1, -1), tokens)
        iou_out, mask_out = hs[:, 0], hs[:, 1 : 1 + self.num_mask_tokens]  # (P, D), (P, n, D)
        h = image.shape[2]
        up = self.output_upscaling(rearrange(src, "p (y x) d -> p d y x", y=h))  # (P, D/8, 4h, 4w)
        hyper = torch.stack(
            [mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (P, n, D/8)
        masks = torch.einsum("pnc,pcyx->pnyx", hyper, up)  # (P, n, 4h, 4w)
        iou = self.iou_prediction_head(iou_out)  # (P, n)
        keep = slice(1, None) if multimask else slice(0, 1)
        return masks[:, keep], iou[:, keep]


# ------------------------------------------------------------------------------------------------
# Sam: the three parts together
# ------------------------------------------------------------------------------------------------


class Sam(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.encoder == "tinyvit":  # LiteMedSAM's encoder, built from this file's parts
            import tinyvit  # noqa: PLC0415  (it imports model, so it is imported when needed)

            self.image_encoder = tinyvit.TinyViT(cfg)
        else:
            self.image_encoder = ImageEncoder(cfg)
        self.prompt_encoder = PromptEncoder(cfg)
        self.mask_decoder = MaskDecoder(cfg)

    def encode(self, x):
        """x (B, 3, S, S), normalised as data.preprocess does -> embeddings (B, D, h, w)."""
        S = self.cfg.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, S, S):
            raise ValueError(f"encode expects (B, 3, {S}, {S}) images, got {tuple(x.shape)}")
        return self.image_encoder(x)

    def decode(self, emb, points=None, boxes=None, mask_input=None, multimask: bool = True):
        """Prompts in S x S model pixels -> low-res logits (P, K, S/4, S/4), predicted IoU (P, K).

        points: (coords (P, N, 2) x-then-y, labels (P, N): 1 fg, 0 bg, -1 pad); boxes (P, 4)
        x0 y0 x1 y1; mask_input (P, 1, S/4, S/4) sigmoid probabilities of a previous prediction.
        P is a multiple of emb's B; image b serves prompts b*M .. (b+1)*M - 1.
        """
        sparse, dense = self.prompt_encoder(points, boxes, mask_input)
        P, B = sparse.shape[0], emb.shape[0]
        if P % B:
            raise ValueError(f"{P} prompts cannot be shared evenly by {B} images")
        image = emb.repeat_interleave(P // B, dim=0) if P != B else emb  # (P, D, h, w)
        pe = self.prompt_encoder.dense_pe()  # (1, D, h, w)
        return self.mask_decoder(image, pe, sparse, dense, multimask)


def select_best(logits, iou, multimask: bool = True):
    """The mask with the highest predicted IoU: (P, K, h, w), (P, K) -> (P, 1, h, w), (P,); with
    multimask False the decoder's single-mask output (K = 1), as it is."""
    if not multimask:
        return logits, iou[:, 0]
    best = iou.argmax(dim=1)  # (P,)
    rows = torch.arange(iou.shape[0], device=iou.device)
    return logits[rows, best][:, None], iou[rows, best]


# ------------------------------------------------------------------------------------------------
# Checkpoints: which layout, which keys, resize. checkpoints.py reads the files (Meta's SAM,
# SAM-Med2D's, LiteMedSAM's, ours) safely; this section builds the model they describe, strictly.
# ------------------------------------------------------------------------------------------------


def config_from_state_dict(sd: dict, path, layout: str) -> SamConfig:
    """Recognise the preset from tensor shapes (never from the file name)."""
    if layout == "lite_medsam":
        import tinyvit  # noqa: PLC0415  (see Sam)

        return tinyvit.config_from_state_dict(sd, path)
    try:
        dim = sd["image_encoder.patch_embed.proj.weight"].shape[0]
        grid = sd["image_encoder.pos_embed"].shape[1]
        D = sd["prompt_encoder.no_mask_embed.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"{path}: not a SAM checkpoint: missing {e.args[0]}") from None
    depth = len({k.split(".")[2] for k in sd if k.startswith("image_encoder.blocks.")})
    sizes = {n: (p.get("encoder_dim"), p.get("encoder_depth")) for n, p in PRESETS.items()}
    names = [n for n, size in sizes.items() if size == (dim, depth)]
    if not names or PRESETS[names[0]].get("prompt_dim", 256) != D:
        raise ValueError(
            f"{path}: encoder width {dim}, depth {depth}, prompt dim {D} match no preset"
        )
    bgr = layout == "sam-med2d"  # the official SAM-Med2D code feeds OpenCV's BGR images
    return SamConfig.from_name(
        names[0], image_size=grid * 16, adapter=any(".Adapter." in k for k in sd),
        channel_order="BGR" if bgr else "RGB",
        resize_mode="stretch" if bgr or grid != 64 else "longest",
    )  # fmt: skip


def resize_state_dict(sd: dict, cfg: SamConfig, image_size: int) -> list:
    """Resample what depends on the token grid for another image size, in place -> report lines:
    pos_embed and the rel-pos tables of the *global* blocks (chosen by index from the preset).
    Windowed blocks (fixed 14x14 windows) and the decoder keep theirs."""
    if cfg.encoder == "tinyvit":  # windows and 1x1 patch convs: no weight depends on the grid
        return [f"TinyViT at {image_size} px: no weights depend on the image size"]
    tables = [f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in cfg.global_attn for a in "hw"]
    g = image_size // cfg.patch_size
    return checkpoints.resample_grid(sd, "image_encoder.pos_embed", tables, g)


# What the official build_sam.py (load_from, inherited from SAMed) leaves out of a SAM file when
# it builds SAM-Med2D at another size, so that they start afresh: the default here too.
DECODER_HEADS = ("mask_decoder.mask_tokens.", "mask_decoder.output_hypernetworks_mlps.",
                 "mask_decoder.iou_prediction_head.")  # fmt: skip


def load_checkpoint(path, image_size=None, adapter=None, device="cpu", name=None, verbose=True,
                    conventions="sam-med2d", decoder_heads="reinit", adapter_init=None,
                    seed=None):  # fmt: skip
    """Build the model a checkpoint describes and load it strictly.

    image_size: resample to another input size (e.g. SAM's 1024 -> SAM-Med2D's 256). adapter: add
    freshly initialised adapters (True) or drop the file's (False); None keeps what the file has.
    name: the preset the caller expects; a file of another architecture is an error.
    Building SAM-Med2D from SAM (a SAM file at another size, adapters added) follows the official
    code: conventions "sam-med2d" gives SAM-Med2D's input conventions (BGR, stretch), "checkpoint"
    keeps SAM's (RGB, longest side); decoder_heads "reinit" starts DECODER_HEADS afresh, "keep"
    keeps SAM's. adapter_init: new adapters' (None: the config's); seed: of the fresh tensors.
    The model is in eval mode; `sam.load_report` says what was resized or initialised and
    `sam.new_keys` names the fresh (untrained) tensors: fine to train, not to segment with."""
    if conventions not in ("sam-med2d", "checkpoint") or decoder_heads not in ("reinit", "keep"):
        raise ValueError(f"conventions must be sam-med2d or checkpoint (not {conventions!r}), "
                         f"decoder_heads reinit or keep (not {decoder_heads!r})")  # fmt: skip
    sd, layout, meta = checkpoints.read_checkpoint(path)  # fresh, finite tensors the model can own
    if meta is None:  # official files: the architecture is read off the tensors
        cfg = config_from_state_dict(sd, path, layout)
    else:
        try:
            cfg = SamConfig(**meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: its config metadata is not a SamConfig: {e}") from None
    if name is not None and name != cfg.name:
        raise ValueError(f"{path}: holds a {cfg.name} model, but {name} was requested")
    report = [f"{path}: {layout} checkpoint, {cfg.name} at {cfg.image_size} px"]
    file_cfg = cfg
    if image_size is not None and image_size != cfg.image_size:
        report += resize_state_dict(sd, cfg, image_size)
        cfg = replace(cfg, image_size=image_size)
    if adapter is not None and adapter != cfg.adapter:
        cfg = replace(cfg, adapter=adapter)
        if not adapter:
            report.append(f"dropped the file's {sum('.Adapter.' in k for k in sd)} adapter tensors")
            sd = {k: v for k, v in sd.items() if ".Adapter." not in k}
    cfg = replace(cfg, adapter_init=adapter_init or cfg.adapter_init)
    to_med2d = (layout == "sam" and cfg.image_size != file_cfg.image_size and cfg.adapter
                and not file_cfg.adapter)  # fmt: skip
    if to_med2d and conventions == "sam-med2d":
        cfg = replace(cfg, channel_order="BGR", resize_mode="stretch")
        report.append("SAM-Med2D's input conventions: BGR, stretch (conventions='checkpoint': "
                      f"{file_cfg.channel_order}, {file_cfg.resize_mode})")  # fmt: skip
    with torch.device("meta"):
        expected = Sam(cfg).state_dict()
    new_keys = []  # tensors the model gets from its init, not from the file
    if adapter and not any(".Adapter." in k for k in sd):
        new_keys = [k for k in expected if ".Adapter." in k]
        report.append(f"initialised {len(new_keys)} new adapter tensors ({cfg.adapter_init})")
    if to_med2d and decoder_heads == "reinit":
        heads = [k for k in expected if k.startswith(DECODER_HEADS)]
        sd = {k: v for k, v in sd.items() if k not in heads}
        new_keys += heads
        report.append(f"re-initialised the {len(heads)} decoder head tensors, as the official code")
    checkpoints.check_keys(sd, expected, path, allow_missing=new_keys)
    if new_keys:  # real init for the new tensors, then the file's weights over the rest
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            sam = Sam(cfg)
        sam.load_state_dict({**sam.state_dict(), **sd}, strict=True)
    else:
        with torch.device("meta"):
            sam = Sam(cfg)
        sam.load_state_dict(sd, strict=True, assign=True)
    sam.load_report, sam.new_keys = report, new_keys
    if verbose:
        print("\n".join(report), file=sys.stderr)
    return sam.to(device).eval()


def save_checkpoint(sam: Sam, path) -> None:
    """Weights as safetensors with the config as JSON metadata (written atomically)."""
    checkpoints.write_safetensors(path, sam.state_dict(), sam.cfg.to_dict())


# ------------------------------------------------------------------------------------------------
# Command line: model_cli.py (convert, info; bench and export-onnx hand over to bench.py and
# onnx_export.py, which sit above the stages)
# ------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    import model_cli  # it imports this module: the command line sits above the stage

    main_guard(model_cli.main, model_cli.parse_args(), "model.py")
