"""Line-by-line ports of the official SAM-Med2D code, the references our stages are timed against.

Each function follows one piece of github.com/OpenGVLab/SAM-Med2D (commit bfd2b93, 2024-06-18);
the comments name the official file:line a block ports. They run on our modules (model.Sam with
the same parameter names), so ours and the port can be timed on the same weights in one process
(bench.py) and checked to compute the same thing where they should (tests/test_bench.py). What is
left out: AMP via apex, logging and metrics printing, checkpoint saving inside the epoch loop.
The official code draws from the global `random`/`np.random` state; here a seeded
numpy.random.Generator `rng` is passed in instead (same distributions, another stream).

  the SammedPredictor flow (segment_anything/predictor_sammed.py), what infer.py replaces:
    predictor_encode   set_image: normalise at the original size, nearest resize, encoder
    predictor_decode   predict(box=...): one prompt-encoder + decoder pass per box, best of 3,
                       upsampled to the original size, sigmoid > 0.5
  the training step (train.py, utils.py), what train.py replaces:
    official_loss      FocalDiceloss_IoULoss (utils.py), pooled over the whole batch
    train_decode       prompt_and_decoder (train.py)
    official_points    generate_point + select_random_points (utils.py)
    official_step      one batch of train_one_epoch (train.py)
    synthetic_batch    a batch shaped like TrainingDataset's, from random rectangles
"""

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


def official_points(masks, labels, low_res_masks, prompt: dict, point_num: int, rng) -> dict:
    """generate_point (utils.py:192-205) with select_random_points (utils.py:69-114): point_num
    clicks per mask drawn from the error region (numpy, one mask and one point at a time), the
    previous low-res mask as probabilities, boxes dropped. Updates and returns `prompt`."""
    pred = (torch.sigmoid(masks.clone()) > 0.5).float()  # :193-195
    low_res_masks_logist = torch.sigmoid(low_res_masks.clone())  # :197-198
    pred, gt = pred.data.cpu().numpy(), labels.data.cpu().numpy()  # :80-82
    error = np.zeros_like(pred)
    error[pred != gt] = 1
    batch_points, batch_labels = [], []
    for j in range(error.shape[0]):  # :87-113
        one_pred, one_gt, one_error = pred[j].squeeze(0), gt[j].squeeze(0), error[j].squeeze(0)
        indices = np.argwhere(one_error == 1)
        if indices.shape[0] > 0:
            selected = indices[rng.choice(indices.shape[0], point_num, replace=True)]
        else:  # :96, official: randint(0, 256), its image size
            indices = rng.integers(0, one_pred.shape[-1], size=(point_num, 2))
            selected = indices[rng.choice(indices.shape[0], point_num, replace=True)]
        points, point_labels = [], []
        for x, y in selected.reshape(-1, 2):  # x: row, y: column, as the official names them
            if one_pred[x, y] == 0 and one_gt[x, y] == 1:
                label = 1
            elif one_pred[x, y] == 1 and one_gt[x, y] == 0:
                label = 0
            else:  # a pixel outside the error region (only when there is none): a padding point
                label = -1
            points.append((y, x))  # :109, "Negate the coordinates": (column, row) = (x, y)
            point_labels.append(label)
        batch_points.append(points)
        batch_labels.append(point_labels)
    device = masks.device  # generate_point :201-204, then to_device (train.py:166)
    prompt["mask_inputs"] = low_res_masks_logist
    prompt["point_coords"] = torch.as_tensor(np.array(batch_points)).to(device)  # (P, n, 2)
    prompt["point_labels"] = torch.as_tensor(np.array(batch_labels)).to(device)  # (P, n)
    prompt["boxes"] = None
    return prompt


def official_step(sam, optimizer, batch: dict, iter_point: int, point_list, rng) -> float:
    """One batch of train_one_epoch (train.py:108-196, use_amp off): step 1 on a box or a point
    prompt with the adapters and the decoder training, then iter_point click iterations on the
    detached embedding with the image encoder frozen. -> the last loss."""
    B, M, S, _ = batch["masks"].shape
    labels = batch["masks"].reshape(B * M, 1, S, S)  # stack_dict_batched (train.py:109)
    prompt = dict(point_coords=batch["point_coords"].reshape(B * M, -1, 2),
                  point_labels=batch["point_labels"].reshape(B * M, -1),
                  boxes=batch["boxes"].reshape(B * M, 4), mask_inputs=None)  # fmt: skip
    if rng.random() > 0.5:  # :112-117
        prompt["point_coords"] = None
    else:
        prompt["boxes"] = None
    for n, value in sam.image_encoder.named_parameters():  # :119-123
        value.requires_grad = "Adapter" in n
    image_embeddings = sam.image_encoder(batch["image"])  # :143-144, (B, D, h, w)
    repeat = [image_embeddings[i].repeat(M, 1, 1, 1) for i in range(B)]  # :146-152
    image_embeddings = torch.cat(repeat, dim=0)  # (B*M, D, h, w)
    masks, low_res_masks, iou_predictions = train_decode(sam, image_embeddings, prompt, False, S)
    loss = official_loss(masks, labels, iou_predictions)  # :154-156
    loss.backward(retain_graph=False)
    optimizer.step()  # :158-159
    optimizer.zero_grad()
    point_num = int(rng.choice(point_list))  # :164-166
    prompt = official_points(masks, labels, low_res_masks, prompt, point_num, rng)
    image_embeddings = image_embeddings.detach().clone()  # :168-173
    for n, value in sam.named_parameters():
        value.requires_grad = "image_encoder" not in n
    init_mask_num = rng.integers(1, iter_point - 1)  # :175, np.random.randint(1, iter_point - 1)
    for it in range(iter_point):  # :176-196
        if it == init_mask_num or it == iter_point - 1:  # setting_prompt_none, utils.py:208-212
            prompt.update(point_coords=None, point_labels=None, boxes=None)
        masks, low_res_masks, iou_predictions = train_decode(
            sam, image_embeddings, prompt, True, S
        )  # :186-188
        loss = official_loss(masks, labels, iou_predictions)
        loss.backward(retain_graph=True)
        optimizer.step()  # :190-191
        optimizer.zero_grad()
        if it != iter_point - 1:  # :193-196
            point_num = int(rng.choice(point_list))
            prompt = official_points(masks, labels, low_res_masks, prompt, point_num, rng)
    return loss.item()


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
