"""Fine-tune SAM-Med2D: the paper's recipe with simulated interactive clicks, in one file.

    python train.py --data DATA_DIR --out runs/exp1          # from LiteMedSAM (infer's default)
    python train.py --data DATA_DIR --checkpoint sam-med2d_b.pth --out runs/exp1
    torchrun --nproc_per_node 4 train.py --data DATA_DIR --checkpoint ... --batch-size 16
    python train.py --resume runs/exp1                       # continue exactly where it stopped
    python train.py --bench                                  # one step vs the official (bench.py)

The recipe is the official one by default (docs/train.md has the table of each knob, the
official file:line and the flag for our variant). The original image-encoder weights stay
frozen; the adapters, the prompt encoder and the mask decoder train. A step takes B images x M
masks (drawn with replacement):

    images (B, 3, S, S) --encode, once per image--> emb (B, D, S/16, S/16), shared by its M masks
    step 1:  all masks of the batch get a jittered box, or all one point (50/50 per batch)
             --decode, 3 candidates, keep the best by predicted IoU--> logits (B*M, 1, S/4, S/4)
             --upsample to S, loss--> backward through decoder, prompt encoder and adapters;
             one optimizer step
    then iter_points (8) click iterations on the detached embedding, each an optimizer step of
    the mask decoder alone, as in the official code: new clicks (1, 3, 5 or 9 per mask) in the
    error region of the previous prediction, plus the previous logits fed back as sigmoid
    probabilities; at one random iteration and at the last the mask is the only prompt. A mask
    predicted perfectly gets padding points (label -1), as the official.

    loss = 20 * focal + dice + (predicted IoU - soft IoU)^2, pooled over the batch's masks.

Sections: config | losses | the training step | the loop | plumbing (setup, the trainer). Beside
this file: runs.py (the starting weights, DDP, the data order, the run directory: state.pt, resume,
log.jsonl), train_cli.py (the flags), bench.py (one step against the official one, official.py).
"""

import functools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import infer
import model
import runs
from runs import batches, build_model, mean_over_processes, plan_run, setup_distributed  # plumbing

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    data: str = ""  # dataset root in the SA-Med2D-20M layout (image2label_train.json, ...)
    val_data: str | None = None  # root whose "val" split validates; None: the --data root
    out: str = "runs/sam_med2d"  # run directory: checkpoints, training state, log.jsonl
    checkpoint: str | None = None  # file/name; omitted: LiteMedSAM (infer.py's); none: random init
    model: str | None = None  # preset for --checkpoint none (a checkpoint names its own)
    image_size: int = 256  # S; an official SAM checkpoint (1024) is resampled to it
    adapter: bool = True  # SAM-Med2D's adapters (added freshly if the checkpoint has none)
    input_conventions: str = "sam-med2d"  # from a SAM file: SAM-Med2D's BGR, stretch; "checkpoint"
    decoder_heads: str = "reinit"  # from a SAM file: fresh decoder heads (official); "keep" SAM's
    batch_size: int = 2  # B: images per optimizer step over all processes and accumulation steps
    masks_per_image: int = 5  # M: masks per image
    # The official recipe by default; each alternative is ours (docs/train.md has the table)
    mask_sampling: str = "with"  # with replacement (official) | without: each once, then repeats
    box_rule: str = "official"  # official: largest component, box shift | ours: whole mask, corners
    prompt_choice: str = "batch"  # step 1 box or point: one draw per batch (official) | per image
    no_error_click: str = "pad"  # perfect mask: points labelled -1 (official) | confirm: one click
    loss: str = "official"  # official: pooled, soft IoU target | per-mask: per mask, hard IoU
    freeze_point_embeddings: bool = False  # freeze what the official bug froze (point, padding)
    multimask: bool = True  # best of 3 by predicted IoU (official) | no: token 0 (MedSAM's)
    grad_accum: int = 1  # split each process's share of the batch into this many micro-batches
    epochs: int = 15  # used when steps is not given (official: 15)
    steps: int | None = None  # total steps (each 1 + iter_points optimizer steps)
    stop_after: int | None = None  # stop this run after so many steps (state saved; resume later)
    iter_points: int = 8  # decoder-only click iterations after step 1 (official: 8)
    point_choices: tuple[int, ...] = (1, 3, 5, 9)  # clicks per iteration, drawn uniformly
    lr: float = 1e-4  # Adam
    schedule: str = "constant"  # constant | cosine | step; by step, after warmup
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    min_lr: float = 0.0  # cosine floor
    milestones: tuple[int, ...] = ()  # step schedule: multiply lr by gamma at each of these steps
    gamma: float = 0.5  # step schedule factor
    grad_clip: float = 0.0  # max global grad norm; 0: off (official)
    focal_weight: float = 20.0  # loss = focal_weight * focal + dice + MSE(pred IoU, IoU)
    amp: str = "off"  # off | bf16 | fp16 (fp16 with a GradScaler)
    compile: bool = False  # torch.compile the image encoder (fixed shapes; the decoder stays eager)
    device: str = "auto"  # auto: cuda when available, else cpu
    seed: int = 0  # model init, data order, prompts: everything random derives from it
    workers: int = 0  # DataLoader worker processes
    val_every: int = 500  # validate (rank 0) every this many steps and at the end; 0: never
    val_limit: int | None = None  # validate on the first N images of the val split only
    log_every: int = 10  # JSONL + progress bar update interval, in steps
    progress: bool = True  # tqdm bar on rank 0
    resume: str | None = None  # a run directory to continue exactly
    force: bool = False  # start over in a non-empty --out (removes the earlier run's files)

    def __post_init__(self):
        self.point_choices, self.milestones = tuple(self.point_choices), tuple(self.milestones)
        checks = {
            "batch_size, masks_per_image, grad_accum, epochs must be >= 1": min(
                self.batch_size, self.masks_per_image, self.grad_accum, self.epochs) >= 1,
            "steps and stop_after must be >= 1": all(
                v is None or v >= 1 for v in (self.steps, self.stop_after)),
            "iter_points, warmup_steps, val_every, workers must be >= 0": min(
                self.iter_points, self.warmup_steps, self.val_every, self.workers) >= 0,
            "point_choices must be positive": all(n >= 1 for n in self.point_choices) and bool(
                self.point_choices),
            "lr must be > 0 and grad_clip >= 0": self.lr > 0 and self.grad_clip >= 0,
            "image_size must be a multiple of 16": self.image_size % 16 == 0,
            "log_every must be >= 1": self.log_every >= 1,
        }  # fmt: skip
        for name, allowed in CHOICES.items():
            checks[f"{name} must be one of {', '.join(allowed)}"] = getattr(self, name) in allowed
        if self.checkpoint == "none":
            checks["--checkpoint none (random init) needs --model"] = self.model is not None
        else:
            checks["--model is for --checkpoint none (a checkpoint names its own)"] = not self.model
        bad = [what for what, ok in checks.items() if not ok]
        if bad:
            raise ValueError("; ".join(bad))
        if not self.data and not self.resume:
            raise ValueError("--data is required (a dataset root built by data.py)")


SCHEDULES = ("constant", "cosine", "step")
AMPS = ("off", "bf16", "fp16")
CHOICES = dict(amp=AMPS, schedule=SCHEDULES, mask_sampling=("with", "without"),
               box_rule=("official", "ours"), prompt_choice=("batch", "image"),
               no_error_click=("pad", "confirm"), loss=("official", "per-mask"),
               input_conventions=("sam-med2d", "checkpoint"),
               decoder_heads=("reinit", "keep"))  # fmt: skip
# What a resumed run may change: everything else must match the run it continues.
RESUME_OVERRIDES = ("resume", "steps", "epochs", "stop_after", "workers", "progress", "val_every",
                    "val_limit", "log_every", "device", "val_data")  # fmt: skip


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """The learning rate of a step: linear warmup, then constant, cosine to min_lr, or steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(step >= m for m in cfg.milestones)
    return cfg.lr


# ------------------------------------------------------------------------------------------------
# Losses. The official loss pools every term over the batch's masks (so a large mask drowns out a
# small one) and regresses the IoU head on the soft IoU, differentiated; --loss per-mask computes
# each term per mask, against the IoU of the thresholded prediction, then averages.
# ------------------------------------------------------------------------------------------------


def pooled_loss(logits, gt, iou_pred, focal_weight: float = 20.0) -> tuple:
    """logits (P, 1, S, S), gt (P, 1, S, S) 0/1, iou_pred (P,) -> (loss, {term: ()}): the official
    FocalDiceloss_IoULoss (utils.py:270-358), its epsilons included, in float32:
    focal_weight * focal + dice + mean((iou_pred - IoU)^2), each term summed over all P*S*S pixels;
    p = sigmoid(logits), focal the alpha-balanced (0.25) focal loss with gamma 2, mean over pixels;
    dice = 1 - (2 sum(p gt) + 1) / (sum p + sum gt + 1); IoU the soft one, pooled, not detached."""
    p, y = torch.sigmoid(logits.float()), gt.float()  # (P, 1, S, S)
    pos = 0.25 * y * (1 - p) ** 2 * torch.log(p + 1e-12)  # (P, 1, S, S)
    neg = 0.75 * (1 - y) * p**2 * torch.log(1 - p + 1e-12)  # (P, 1, S, S)
    focal = -(pos.sum() + neg.sum()) / (y.numel() + 1e-12)
    inter, total = (p * y).sum(), p.sum() + y.sum()
    dice = 1 - (2 * inter + 1) / (total + 1)
    iou = (inter + 1e-7) / (total - inter + 1e-7)
    terms = dict(focal=focal, dice=dice, iou=((iou - iou_pred.float()) ** 2).mean())
    return focal_weight * focal + dice + terms["iou"], terms


def mask_iou(logits, gt):
    """(P, L) -> (P,): IoU of the thresholded prediction (logits > 0) with the target; two empty
    masks count as 1. This is the target of the IoU head, so it carries no gradient."""
    pred, gt = logits.detach() > 0, gt > 0.5
    inter, union = (pred & gt).sum(1).float(), (pred | gt).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@functools.lru_cache(maxsize=8)
def _linear_resize_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear resizing (align_corners=False): F.interpolate applied to
    the identity."""
    eye = torch.eye(n_in, dtype=torch.float64)[None]  # (1, n_in, n_in): one basis vector per row
    return (
        F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.float().to(device)
    )


def upsample(low, size: int):
    """(P, 1, h, w) -> (P, 1, size, size), exactly F.interpolate(mode="bilinear",
    align_corners=False): bilinear resizing is separable, so it is A_h @ low @ A_w^T, two small
    matmuls whose backward is ~10x faster on a CPU than upsample_bilinear2d's."""
    a_h = _linear_resize_matrix(low.shape[-2], size, low.device)  # (size, h)
    a_w = _linear_resize_matrix(low.shape[-1], size, low.device)  # (size, w)
    return a_h @ low @ a_w.T  # (P, 1, size, size)


def sam_loss(logits, gt, iou_pred, focal_weight: float = 20.0) -> tuple:
    """--loss per-mask: logits (P, 1, S, S), gt (P, 1, S, S) 0/1, iou_pred (P,) -> (loss,
    {term: (P,)}).

    loss = mean over masks of focal_weight * focal + dice + (iou_pred - IoU)^2, in float32."""
    x, y = logits.float().flatten(1), gt.float().flatten(1)  # (P, S*S)
    p = torch.sigmoid(x)
    # focal: -0.25 (1-p)^2 log p on the mask, -0.75 p^2 log(1-p) off it, log terms as the
    # (stable, fused) binary cross-entropy; mean over pixels. Dice smoothed by 1 (official).
    weight = torch.where(y > 0.5, 0.25 * (1 - p) ** 2, 0.75 * p**2)
    focal = (weight * F.binary_cross_entropy_with_logits(x, y, reduction="none")).mean(1)
    dice = 1 - (2 * (p * y).sum(1) + 1) / (p.sum(1) + y.sum(1) + 1)
    terms = dict(focal=focal, dice=dice, iou=(iou_pred.float() - mask_iou(x, y)) ** 2)
    per_mask = focal_weight * terms["focal"] + terms["dice"] + terms["iou"]  # (P,)
    return per_mask.mean(), terms


# ------------------------------------------------------------------------------------------------
# The training step: encode the images, decode the step-1 prompts, loss, optimizer step;
# then the click iterations on the detached embedding (decoder-only optimizer steps).
# ------------------------------------------------------------------------------------------------


# What the official code never trains, through a bug: its prompt encoder re-wraps these in new
# nn.Parameters on every forward (prompt_encoder.py:92-94), so its optimizer never sees them.
POINT_EMBEDDINGS = ("prompt_encoder.not_a_point_embed.weight",
                    "prompt_encoder.point_embeddings.0.weight",
                    "prompt_encoder.point_embeddings.1.weight")  # fmt: skip


def select_trainable(sam: model.Sam, verbose: bool = True, freeze_points: bool = False) -> list:
    """Freeze the original image-encoder weights; train the adapters, the prompt encoder and the
    mask decoder (freeze_points: except POINT_EMBEDDINGS). Decided once, before the optimizer is
    built. -> the trainable parameters."""
    named = list(sam.named_parameters())
    trainable, frozen = {}, 0
    for name, p in named:
        p.requires_grad_((not name.startswith("image_encoder.") or ".Adapter." in name)
                         and not (freeze_points and name in POINT_EMBEDDINGS))  # fmt: skip
        if p.requires_grad:
            part = "adapters" if ".Adapter." in name else name.split(".")[0]
            trainable[part] = trainable.get(part, 0) + p.numel()
        else:
            frozen += p.numel()
    if verbose:
        parts = ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in trainable.items())
        total = sum(trainable.values())
        what = "image encoder" + ", point embeddings" * freeze_points
        print(f"trainable {total / 1e6:.3f}M ({parts}); frozen {what} {frozen / 1e6:.3f}M")
    return [p for _, p in named if p.requires_grad]


@dataclass
class Micro:
    """One micro-batch as it goes through the 1 + iter_points sub-steps."""

    images: torch.Tensor  # (b, 3, S, S)
    gt: torch.Tensor  # (P, 1, S, S) float 0/1, P = b*M
    boxes: torch.Tensor  # (P, 4) jittered, model pixels
    points: tuple  # coords (P, 1, 2), labels (P, 1): one foreground point per mask
    gens: list  # one torch.Generator per image, seeded by (seed, step, dataset index)
    use_box: torch.Tensor  # (b,) bool: this image's masks get a box in step 1, else a point
    no_error: str = "pad"  # a perfect prediction's clicks: pad (label -1) | confirm
    emb: torch.Tensor | None = None  # (b, D, h, w), detached after step 1
    low: torch.Tensor | None = None  # (P, 1, S/4, S/4) previous logits
    pred: torch.Tensor | None = None  # (P, S, S) bool previous prediction


def make_micro(batch: dict, step: int, seed: int, device, box=None, no_error="pad") -> Micro:
    """A micro-batch on the device, with its per-image generators. box: True/False gives every
    image that step-1 prompt (one draw per batch); None, each image draws its own."""
    images = batch["image"].to(device, non_blocking=True)  # (b, 3, S, S)
    b, M, S, _ = batch["masks"].shape
    gt = batch["masks"].to(device).reshape(b * M, 1, S, S)  # (P, 1, S, S)
    gens, use_box = [], []
    for index in batch["index"].tolist():  # per image, so the draws never depend on the split
        # 0x5A17 keeps this stream apart from the dataset's, seeded by (seed, epoch, index)
        seq = np.random.SeedSequence([seed, 0x5A17, step, index]).generate_state(1)[0]
        g = torch.Generator(device).manual_seed(int(seq))
        use_box.append(bool(torch.rand(1, generator=g, device=device) < 0.5))
        gens.append(g)
    points = (batch["point_coords"].to(device).reshape(b * M, -1, 2),
              batch["point_labels"].to(device).reshape(b * M, -1))  # fmt: skip
    boxes = batch["boxes"].to(device).reshape(b * M, 4)
    use_box = torch.tensor(use_box if box is None else [box] * b, device=device)  # (b,)
    return Micro(images, gt, boxes, points, gens, use_box, no_error)


class Forward(nn.Module):
    """The differentiable part of a sub-step, as one module call so DDP can wrap it: encode the
    images (step 1 only) and decode groups of masks with their prompts.

    groups: [(rows (k,), points or None, boxes or None, mask_input or None)], rows indexing the
    batch's P = B*M masks (image-major: image b owns rows b*M .. b*M+M-1) and the prompts of those
    rows. Returns emb (B, D, h, w), logits of the best mask (P, 1, S/4, S/4) and its predicted
    IoU (P,), rows in image-major order."""

    def __init__(self, sam: model.Sam, multimask: bool = True):
        super().__init__()
        self.sam, self.multimask = sam, multimask
        self.encoder_trains = any(p.requires_grad for p in sam.image_encoder.parameters())

    def forward(self, groups: list, images=None, emb=None, prompt_grad: bool = True):
        if emb is None:
            with torch.set_grad_enabled(self.encoder_trains and torch.is_grad_enabled()):
                emb = self.sam.encode(images)  # (B, D, h, w)
        M = sum(len(rows) for rows, *_ in groups) // emb.shape[0]
        per_mask = emb.repeat_interleave(M, dim=0)  # (P, D, h, w): each image serves its M masks
        pe = self.sam.prompt_encoder.dense_pe()  # (1, D, h, w)
        lows, ious = [], []
        for rows, points, boxes, mask_input in groups:
            # The official iterations run the prompt encoder without gradient: decoder-only steps.
            with torch.set_grad_enabled(prompt_grad and torch.is_grad_enabled()):
                sparse, dense = self.sam.prompt_encoder(points, boxes, mask_input)
            low, iou = self.sam.mask_decoder(per_mask[rows], pe, sparse, dense, self.multimask)
            # the best of 3, or the single-mask output (token 0: MedSAM/LiteMedSAM's training)
            low, iou = model.select_best(low, iou, self.multimask)  # (k, 1, S/4, S/4), (k,)
            lows.append(low)
            ious.append(iou)
        order = torch.cat([rows for rows, *_ in groups]).argsort()  # back to image-major order
        return emb, torch.cat(lows)[order], torch.cat(ious)[order]


def first_groups(mb: Micro) -> list:
    """Step 1 prompts: the masks of images drawn as "box" get their boxes, the others one point."""
    box = mb.use_box.repeat_interleave(mb.gt.shape[0] // len(mb.gens))  # (P,): each mask's kind
    groups = []
    if box.any():
        rows = box.nonzero()[:, 0]  # (k,)
        groups.append((rows, None, mb.boxes[rows], None))
    if not box.all():
        rows = (~box).nonzero()[:, 0]  # (P-k,)
        groups.append((rows, (mb.points[0][rows], mb.points[1][rows]), None, None))
    return groups


@dataclass
class Trainer:
    """What a step needs: the model, its (maybe DDP-wrapped) forward, optimizer, AMP state."""

    cfg: TrainConfig
    sam: model.Sam
    forward: nn.Module  # Forward, or DistributedDataParallel(Forward)
    params: list
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gen: torch.Generator  # step-level draws (clicks per iteration, the mask-only iteration)
    device: torch.device
    rank: int = 0  # this process; rank 0 logs, validates and saves
    world: int = 1  # processes

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.amp)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def optimizer_step(self) -> None:
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.opt)  # clip the true gradients, not the fp16-scaled ones
            nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)


def sub_step(tr: Trainer, micros: list, clicks: int | None) -> torch.Tensor:
    """One optimizer step over all micro-batches (clicks None: step 1). -> the batch's loss."""
    total, S = 0.0, tr.sam.cfg.image_size
    for j, mb in enumerate(micros):
        sync = j == len(micros) - 1 or not isinstance(tr.forward, DistributedDataParallel)
        with nullcontext() if sync else tr.forward.no_sync():
            with tr.autocast():
                if clicks is None:
                    emb, low, iou = tr.forward(first_groups(mb), images=mb.images)
                else:
                    emb, low, iou = tr.forward(click_groups(mb, clicks), emb=mb.emb,
                                               prompt_grad=False)  # fmt: skip
            up = upsample(low.float(), S)  # (P, 1, S, S): the loss compares at the input size
            loss_fn = pooled_loss if tr.cfg.loss == "official" else sam_loss  # pooled per micro
            loss, _ = loss_fn(up, mb.gt, iou, tr.cfg.focal_weight)
            tr.scaler.scale(loss / len(micros)).backward()
        # sigmoid > 0.5 as the official (utils.py:195), not logits > 0: they differ below ~6e-8
        mb.emb, mb.low, mb.pred = emb.detach(), low.detach(), torch.sigmoid(up.detach()[:, 0]) > 0.5
        total = total + loss.detach() / len(micros)  # no .item(): no device sync per sub-step
    tr.optimizer_step()
    return total


def click_groups(mb: Micro, n_clicks: int) -> list:
    """An iteration's prompts: the previous mask as probabilities, and n new error-region clicks
    per mask (n_clicks 0: the mask alone)."""
    mask_input = torch.sigmoid(mb.low.float())  # (P, 1, S/4, S/4): what the weights expect
    rows = torch.arange(mb.gt.shape[0], device=mb.gt.device)  # (P,): every mask
    if n_clicks == 0:
        return [(rows, None, None, mask_input)]
    M, gt = mb.gt.shape[0] // len(mb.gens), mb.gt[:, 0] > 0.5  # (P, S, S)
    clicks = [data.error_clicks(mb.pred[i * M : (i + 1) * M], gt[i * M : (i + 1) * M],
                                n_clicks, g, no_error=mb.no_error)
              for i, g in enumerate(mb.gens)]  # fmt: skip
    coords = torch.cat([c for c, _ in clicks]).float()  # (P, n, 2)
    labels = torch.cat([lab for _, lab in clicks]).long()  # (P, n)
    return [(rows, (coords, labels), None, mask_input)]


def draw_prompts(cfg: TrainConfig, gen: torch.Generator) -> tuple:
    """A step's step-level draws: the step-1 prompt kind, box (True) or point, one for the batch
    as the official train.py:112 (None with prompt_choice image: each image draws its own), then
    the clicks per iteration. -> (box, plan)."""
    box = bool(torch.rand(1, generator=gen) > 0.5) if cfg.prompt_choice == "batch" else None
    return box, plan_iterations(cfg, gen)


def plan_iterations(cfg: TrainConfig, gen: torch.Generator) -> list:
    """Clicks per iteration; 0 at the mask-only iterations (a random one, as the official
    randint(1, iter_points - 1), and the last)."""
    n = cfg.iter_points
    pick = torch.randint(len(cfg.point_choices), (n,), generator=gen).tolist()
    plan = [cfg.point_choices[i] for i in pick]
    if n >= 3:
        plan[int(torch.randint(1, n - 1, (1,), generator=gen))] = 0
    if plan:
        plan[-1] = 0
    return plan


def train_step(tr: Trainer, batches: list, step: int) -> dict:
    """Step 1 plus the click iterations on the micro-batches of one global batch."""
    box, plan = draw_prompts(tr.cfg, tr.gen)
    micros = [make_micro(b, step, tr.cfg.seed, tr.device, box, tr.cfg.no_error_click)
              for b in batches]  # fmt: skip
    losses = [sub_step(tr, micros, None)]
    for clicks in plan:
        losses.append(sub_step(tr, micros, clicks))
    losses = torch.stack(losses).tolist()
    return dict(loss=float(np.mean(losses)), loss_first=losses[0], loss_last=losses[-1])


# ------------------------------------------------------------------------------------------------
# The loop: lr -> validate/save -> step -> log
# ------------------------------------------------------------------------------------------------


def main(args: dict) -> dict:
    """Train with the given settings (TrainConfig field names; only those given on the command
    line, so a resumed run can tell what changed). -> the best score and its step, the last log
    record."""
    tr, state = setup(args)
    cfg, out = tr.cfg, Path(tr.cfg.out)
    ds, spe, total, start, end, best = plan_run(tr, state)
    bar = tqdm(total=end, initial=start, disable=tr.rank != 0 or not cfg.progress, unit="step")
    data_it, record, t0, seen = None, {}, time.perf_counter(), 0
    for step in range(start, end + 1):  # `step` steps are done
        lr = lr_at(step, cfg, total)
        # validate and save every val_every steps, at the end, and before a fresh run's first
        # step (the starting weights compete for best.safetensors too)
        if (step > start or state is None) and (
            (cfg.val_every and step % cfg.val_every == 0) or step == end
        ):
            best = runs.checkpoint(tr, step, best, spe, record, validate)
            t0 = time.perf_counter()  # images/s counts training only
        if step == end:
            break
        # one training step: step 1 and the click iterations, on this process's share
        if data_it is None or step % spe == 0:
            data_it = batches(ds, cfg, tr.rank, tr.world, step, spe)
        for g in tr.opt.param_groups:
            g["lr"] = lr
        losses = mean_over_processes(tr, train_step(tr, next(data_it), step))
        # log: one line per log_every steps
        seen, done = seen + cfg.batch_size, step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == end:
            record = dict(step=done, epoch=step // spe, lr=lr, **losses,
                          images_per_s=seen / (time.perf_counter() - t0),
                          memory_mb=runs.memory_mb(tr.device))  # fmt: skip
            if tr.rank == 0:
                runs.log_line(out / "log.jsonl", record)
                bar.set_postfix(loss=f"{losses['loss']:.4f}", img_s=f"{record['images_per_s']:.2f}")
            t0, seen = time.perf_counter(), 0
    bar.close()
    if tr.rank == 0:
        runs.print_summary(out, start, end, total, best)
    if tr.world > 1:
        dist.destroy_process_group()
    return dict(best=best[0], best_step=best[1], last=record, step=end)


def validate(sam: model.Sam, cfg: TrainConfig) -> dict:
    """Dice for box, 1, 3 and 5 points on the val split; "score", their mean, decides
    best.safetensors."""
    res = infer.evaluate(sam, cfg.val_data or cfg.data, prompt_modes=("box", 1, 3, 5),
                         seed=cfg.seed, limit=cfg.val_limit, split="val",
                         multimask=cfg.multimask)  # fmt: skip
    dice = {k: float(v) for k, v in res["dice"].items()}
    return dict(dice=dice, score=float(np.mean(list(dice.values()))), n_masks=res["n_masks"])


# ------------------------------------------------------------------------------------------------
# Plumbing: setup and the trainer. runs.py has the rest: the starting weights (build_model), the
# run's plan, processes (DDP), the data order, the run directory (training state, resume, log).
# ------------------------------------------------------------------------------------------------


def setup(args: dict) -> tuple:
    """Everything before the first step: config, data and run-directory checks, processes, model,
    optimizer. -> (Trainer, the saved state of a resumed run or None)."""
    cfg, state = runs.resolve_config(args, TrainConfig, RESUME_OVERRIDES)
    runs.check_data(cfg)
    out = Path(cfg.out)
    rank, world, device = setup_distributed(cfg.device)
    runs.prepare_dir(out, state, cfg.force, rank)  # before rank 0 writes anything (DDP syncs)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch size {cfg.batch_size} does not split into {world} processes x "
                         f"{cfg.grad_accum} accumulation steps")  # fmt: skip
    sam = (model.load_checkpoint(out / "last.safetensors", device=device, verbose=rank == 0)
           if state else build_model(cfg, device))  # fmt: skip
    tr = make_trainer(sam, cfg, device, rank, world)
    if state is not None:
        runs.restore(tr.sam, tr.opt, tr.scaler, tr.gen, state)
    return tr, state


def make_trainer(sam: model.Sam, cfg: TrainConfig, device, rank=0, world=1, verbose=True):
    """The trainable set (decided once, before the optimizer), the forward (DDP-wrapped across
    processes), Adam, the fp16 GradScaler and the step-level generator."""
    params = select_trainable(sam, verbose and rank == 0, cfg.freeze_point_embeddings)
    sam.cfg.single_mask = not cfg.multimask  # saved with the weights: infer.py's default output
    fwd = Forward(sam, cfg.multimask)
    if cfg.compile:  # the encoder only: the decoder's prompt shapes change every iteration
        sam.image_encoder.compile()
    if world > 1:
        fwd = DistributedDataParallel(fwd, find_unused_parameters=True)
    # The fused Adam updates all tensors in one pass: on a CPU ~7x faster than the default
    # per-tensor loop over vit_b's 185M trainable weights (mostly adapter convolutions).
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=device.type in ("cpu", "cuda") or None)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    gen = torch.Generator().manual_seed(cfg.seed)
    return Trainer(cfg, sam.train(), fwd, params, opt, scaler, gen, device, rank, world)


def cpu_trainer(sam: model.Sam, cfg: TrainConfig) -> Trainer:
    """A single-process CPU Trainer around sam (tests, bench.py)."""
    return make_trainer(sam, cfg, torch.device("cpu"), verbose=False)


# ------------------------------------------------------------------------------------------------
# Command line: train_cli.py (one flag per TrainConfig field, help = the field's comment; --bench)
# ------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    import train_cli  # it imports this module: the command line sits above the stage

    train_cli.main(train_cli.parse_args())
