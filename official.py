"""Line-by-line ports of the official SAM-Med2D code, the references our stages are timed against.

Each function follows one piece of github.com/OpenGVLab/SAM-Med2D (commit bfd2b93, 2024-06-18);
the comments name the official file:line a block ports. They run on our modules (model.Sam with
the same parameter names), so ours and the port can be timed on the same weights in one process
(bench.py) and checked to compute the same thing where they should (tests/test_bench.py). What is
left out: AMP via apex, logging and metrics printing, checkpoint saving inside the epoch loop.
The official code draws from the global `random`/`np.random` state; here an OfficialDraws (the
same calls on seeded random.Random / np.random.RandomState instances, so the same streams as the
official after random.seed(s); np.random.seed(s)) is passed in, or an object injecting the draws.

  the SammedPredictor flow (segment_anything/predictor_sammed.py), what infer.py replaces:
    predictor_encode   set_image: normalise at the original size, nearest resize, encoder
    predictor_decode   predict(box=...): one prompt-encoder + decoder pass per box, best of 3,
                       upsampled to the original size, sigmoid > 0.5
  the training step (train.py, utils.py), what train.py replaces:
    official_loss      FocalDiceloss_IoULoss (utils.py), pooled over the whole batch
    train_decode       prompt_and_decoder (train.py)
    OfficialDraws      the random draws, in the official calls and order
    official_points    generate_point + select_random_points (utils.py)
    train_one_batch    one batch of train_one_epoch (train.py:108-196) -> its 9 losses
    official_step      the same -> the last loss (bench.py)
    synthetic_batch    a batch shaped like TrainingDataset's, from random rectangles
"""

import random

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import data

# ------------------------------------------------------------------------------------------------
# Inference: SammedPredictor (segment_anything/predictor_sammed.py)
# ------------------------------------------------------------------------------------------------


def predictor_encode(sam, image: np.ndarray, image_format: str = "RGB"):
    """SammedPredictor.set_image: (H, W, 3) uint8 -> embedding (1, D, S/16, S/16)."""
    cfg, S = sam.cfg, sam.cfg.image_size
    if image_format != cfg.channel_order:  # :21-22 (model.image_format)
        image = image[..., ::-1]
    mean, std = np.float32(cfg.pixel_mean), np.float32(cfg.pixel_std)  # :29, float32 buffers
    input_image = (image - mean) / std  # :30, (H, W, 3) float32 at the original size
    # :34-37 and :228-233: albumentations Resize(S, S, INTER_NEAREST) + ToTensorV2 (HWC -> CHW)
    input_image = cv2.resize(input_image, (S, S), interpolation=cv2.INTER_NEAREST)  # (S, S, 3)
    input_image = torch.from_numpy(input_image).permute(2, 0, 1)[None]  # (1, 3, S, S)
    return sam.image_encoder(input_image)  # :45, (1, D, S/16, S/16)


@torch.no_grad()  # predict_torch :95
def predictor_decode(sam, features, original_size: tuple, boxes: np.ndarray) -> torch.Tensor:
    """SammedPredictor.predict(box=boxes) with multimask_output=True: boxes (n, 4) x0 y0 x1 y1 in
    original pixels -> masks (n, 1, H, W) as 0./1. floats."""
    S = sam.cfg.image_size
    # :73-76, apply_boxes (:187-198): scale x by S / W and y by S / H, as float64, then float32
    H, W = original_size
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 2, 2).copy()
    boxes[..., 0] *= S / W
    boxes[..., 1] *= S / H
    boxes = torch.as_tensor(boxes.reshape(-1, 4), dtype=torch.float)  # (n, 4)
    # predict_torch :114-145 for several boxes, :147-171 for one: the same computation per box
    mask_list = []
    for i in range(boxes.shape[0]):
        sparse, dense = sam.prompt_encoder(None, boxes[i : i + 1], None)  # :120-124
        low_res_masks, iou_predictions = sam.mask_decoder(
            features, sam.prompt_encoder.dense_pe(), sparse, dense, True
        )  # :127-133, (1, 3, S/4, S/4), (1, 3)
        max_values, max_indexs = torch.max(iou_predictions, dim=1)  # :135-139
        low_res_masks = low_res_masks[:, max_indexs]  # (1, 1, S/4, S/4): the best one only
        # postprocess_masks :180-184: bilinear to S x S, then to the original size
        masks = F.interpolate(low_res_masks, (S, S), mode="bilinear", align_corners=False)
        masks = F.interpolate(masks, (H, W), mode="bilinear", align_corners=False)
        mask_list.append(masks)
    masks = torch.cat(mask_list, dim=0)  # :145, (n, 1, H, W)
    return (torch.sigmoid(masks) > 0.5).float()  # :173-175


# ------------------------------------------------------------------------------------------------
# Training: train.py's train_one_epoch and the helpers it calls from utils.py
# ------------------------------------------------------------------------------------------------


def official_loss(masks, labels, iou_pred):
    """FocalDiceloss_IoULoss (utils.py:336-358, weight 20, iou_scale 1): focal and Dice pooled over
    the whole batch, the IoU term against a soft IoU that is also pooled (and differentiated)."""
    p = torch.sigmoid(masks)  # FocalLoss.forward, utils.py:282-291 (gamma 2, alpha 0.25)
    num_pos = torch.sum(labels)
    num_neg = labels.numel() - num_pos
    loss_pos = -0.25 * labels * (1 - p) ** 2 * torch.log(p + 1e-12)
    loss_neg = -0.75 * (1 - labels) * p**2 * torch.log(1 - p + 1e-12)
    focal = (torch.sum(loss_pos) + torch.sum(loss_neg)) / (num_pos + num_neg + 1e-12)
    intersection = torch.sum(p * labels)  # DiceLoss.forward, utils.py:307-312 (smooth 1)
    dice = 1 - (2.0 * intersection + 1.0) / (torch.sum(p) + torch.sum(labels) + 1.0)
    union = torch.sum(p) + torch.sum(labels) - intersection  # MaskIoULoss, utils.py:328-333
    iou = (intersection + 1e-7) / (union + 1e-7)
    iou_loss = torch.mean((iou - iou_pred) ** 2)
    return 20.0 * focal + dice + iou_loss * 1.0  # utils.py:353-357


def train_decode(sam, image_embeddings, prompt: dict, decoder_iter: bool, image_size: int):
    """prompt_and_decoder (train.py:62-101) with multimask=True (its default, train.py:38): the
    prompt encoder without gradient in the iterations, the best mask picked in a Python loop,
    upsampled to the input size. -> masks (P, 1, S, S), low-res (P, 1, S/4, S/4), IoU (P, 1)."""
    points = None  # :63-66
    if prompt["point_coords"] is not None:
        points = (prompt["point_coords"], prompt["point_labels"])
    with torch.no_grad() if decoder_iter else torch.enable_grad():  # :68-81
        sparse, dense = sam.prompt_encoder(points, prompt["boxes"], prompt["mask_inputs"])
    low_res_masks, iou_predictions = sam.mask_decoder(
        image_embeddings, sam.prompt_encoder.dense_pe(), sparse, dense, True
    )  # :83-89, (P, 3, S/4, S/4), (P, 3)
    max_values, max_indexs = torch.max(iou_predictions, dim=1)  # :91-98
    iou_predictions = max_values.unsqueeze(1)  # (P, 1)
    low_res = [low_res_masks[i : i + 1, idx] for i, idx in enumerate(max_indexs)]
    low_res_masks = torch.stack(low_res, 0)  # (P, 1, S/4, S/4)
    masks = F.interpolate(
        low_res_masks, (image_size, image_size), mode="bilinear", align_corners=False
    )  # :100, (P, 1, S, S)
    return masks, low_res_masks, iou_predictions


class OfficialDraws:
    """The official code's random draws, in its calls: Python's `random` (the step-1 prompt kind,
    clicks per iteration) and NumPy's global state (click positions, the mask-only iteration),
    here as instances seeded by `seed` (the official seeds nothing). A test may pass any object
    with these four methods instead, to inject the draws."""

    def __init__(self, seed: int = 0):
        self.py, self.np = random.Random(seed), np.random.RandomState(seed)

    def kind(self) -> float:  # train.py:112 random.random(); > 0.5: box prompts
        return self.py.random()

    def point_num(self, point_list) -> int:  # train.py:164, 194 random.choice(args.point_list)
        return self.py.choice(list(point_list))

    def init_mask_num(self, iter_point: int) -> int:  # train.py:175
        return int(self.np.randint(1, iter_point - 1))

    def clicks(self, masks_binary, labels, point_num: int) -> tuple:  # utils.py:201
        return select_random_points(masks_binary, labels, point_num, self.np)


def _draws(draws):
    """Callers that pass a numpy Generator (bench.py) get OfficialDraws seeded from it."""
    if isinstance(draws, np.random.Generator):
        return OfficialDraws(int(draws.integers(2**31)))
    return draws


def select_random_points(pr, gt, point_num: int, rs) -> tuple:
    """select_random_points (utils.py:69-114): per mask, point_num pixels of the error region
    (with replacement); a mask without error gets point_num random pixels, labelled -1 (padding).
    rs: the official's np.random (a RandomState). -> points (P, n, 2) (column, row), labels."""
    pred, gt = pr.data.cpu().numpy(), gt.data.cpu().numpy()  # :80
    error = np.zeros_like(pred)  # :81-82
    error[pred != gt] = 1
    batch_points, batch_labels = [], []
    for j in range(error.shape[0]):  # :87
        one_pred, one_gt, one_error = pred[j].squeeze(0), gt[j].squeeze(0), error[j].squeeze(0)
        indices = np.argwhere(one_error == 1)  # :92
        if indices.shape[0] > 0:  # :93-94
            selected = indices[rs.choice(indices.shape[0], point_num, replace=True)]
        else:  # :95-97; the official draws in [0, 256), its image size: here the mask's size
            indices = rs.randint(0, one_pred.shape[-1], size=(point_num, 2))
            selected = indices[rs.choice(indices.shape[0], point_num, replace=True)]
        points, point_labels = [], []
        for x, y in selected.reshape(-1, 2):  # :100-110; x: row, y: column, as they name them
            if one_pred[x, y] == 0 and one_gt[x, y] == 1:
                label = 1
            elif one_pred[x, y] == 1 and one_gt[x, y] == 0:
                label = 0
            else:
                label = -1
            points.append((y, x))  # :109, "Negate the coordinates": (column, row)
            point_labels.append(label)
        batch_points.append(points)
        batch_labels.append(point_labels)
    return np.array(batch_points), np.array(batch_labels)  # :114


def official_points(masks, labels, low_res_masks, prompt: dict, point_num: int, draws) -> dict:
    """generate_point (utils.py:192-205): clicks from the prediction's error region (the draws'
    clicks: select_random_points), the low-res mask as probabilities, boxes dropped."""
    masks_binary = (torch.sigmoid(masks.clone()) > 0.5).float()  # :193-195
    low_res_masks_logist = torch.sigmoid(low_res_masks.clone())  # :197-198
    points, point_labels = _draws(draws).clicks(masks_binary, labels, point_num)  # :200
    device = masks.device  # :201-204, then to_device (train.py:166)
    prompt["mask_inputs"] = low_res_masks_logist
    prompt["point_coords"] = torch.as_tensor(points).to(device)  # (P, n, 2)
    prompt["point_labels"] = torch.as_tensor(point_labels).to(device)  # (P, n)
    prompt["boxes"] = None
    return prompt


def train_one_batch(sam, optimizer, batch: dict, iter_point: int, point_list, draws) -> list:
    """The body of train_one_epoch's loop (train.py:108-196, use_amp off, torch >= 2 zero_grad)
    for one batch: step 1 on a box or a point prompt with the adapters and the decoder training,
    then iter_point click iterations on the detached embedding with the image encoder frozen.
    The draws come in the official order. -> the 1 + iter_point losses."""
    draws = _draws(draws)
    B, M, S, _ = batch["masks"].shape
    labels = batch["masks"].reshape(B * M, 1, S, S)  # :109 stack_dict_batched
    prompt = dict(point_coords=batch["point_coords"].reshape(B * M, -1, 2),
                  point_labels=batch["point_labels"].reshape(B * M, -1),
                  boxes=batch["boxes"].reshape(B * M, 4), mask_inputs=None)  # fmt: skip
    if draws.kind() > 0.5:  # :112-117
        prompt["point_coords"] = None
    else:
        prompt["boxes"] = None
    for n, value in sam.image_encoder.named_parameters():  # :119-123
        value.requires_grad = "Adapter" in n
    image_embeddings = sam.image_encoder(batch["image"])  # :143-144, (B, D, h, w)
    repeat = [image_embeddings[i].repeat(M, 1, 1, 1) for i in range(B)]  # :146-151
    image_embeddings = torch.cat(repeat, dim=0)  # :152, (B*M, D, h, w)
    masks, low_res_masks, iou_predictions = train_decode(sam, image_embeddings, prompt, False, S)
    loss = official_loss(masks, labels, iou_predictions)  # :154-155
    loss.backward(retain_graph=False)  # :156
    optimizer.step()  # :158-159
    optimizer.zero_grad()
    losses = [loss.item()]
    point_num = draws.point_num(point_list)  # :164
    prompt = official_points(masks, labels, low_res_masks, prompt, point_num, draws)  # :165
    image_embeddings = image_embeddings.detach().clone()  # :168
    for n, value in sam.named_parameters():  # :169-173
        value.requires_grad = "image_encoder" not in n
    init_mask_num = draws.init_mask_num(iter_point)  # :175
    for it in range(iter_point):  # :176
        if it == init_mask_num or it == iter_point - 1:  # :177-178, setting_prompt_none
            prompt.update(point_coords=None, point_labels=None, boxes=None)  # utils.py:208-212
        masks, low_res_masks, iou_predictions = train_decode(
            sam, image_embeddings, prompt, True, S
        )  # :186
        loss = official_loss(masks, labels, iou_predictions)  # :187
        loss.backward(retain_graph=True)  # :188
        optimizer.step()  # :190-191
        optimizer.zero_grad()
        losses.append(loss.item())
        if it != iter_point - 1:  # :193-195
            point_num = draws.point_num(point_list)
            prompt = official_points(masks, labels, low_res_masks, prompt, point_num, draws)
    return losses


def official_step(sam, optimizer, batch: dict, iter_point: int, point_list, draws) -> float:
    """One batch of train_one_epoch (train_one_batch) -> the last loss, as the official prints."""
    return train_one_batch(sam, optimizer, batch, iter_point, point_list, draws)[-1]


def synthetic_batch(B: int, M: int, S: int, seed: int) -> dict:
    """B images with M random rectangles each, shaped as data.TrainDataset gives them (one box and
    one point per mask, as the official TrainingDataset with point_num=1)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(B, M, S, S)
    for b in range(B):
        for m in range(M):
            x0, y0 = torch.randint(0, S // 2, (2,), generator=g).tolist()
            w, h = torch.randint(S // 16, S // 2, (2,), generator=g).tolist()
            masks[b, m, y0 : y0 + h, x0 : x0 + w] = 1
    flat = masks.reshape(B * M, S, S).bool()
    coords, labels = data.sample_points(flat, 1, g)
    return dict(image=torch.randn(B, 3, S, S, generator=g), masks=masks,
                boxes=data.boxes_from_masks(flat, jitter=True, generator=g).reshape(B, M, 4),
                point_coords=coords.reshape(B, M, 1, 2), point_labels=labels.reshape(B, M, 1),
                index=torch.arange(B))  # fmt: skip
