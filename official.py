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
  the test protocol (test.py, DataLoader.py's TestingDataset, utils.py, metrics.py), what
  infer.evaluate replaces:
    official_test_mask one item of test.py's loop: box, iterative clicks (accumulated, -1 for
                       a mask without error pixels), or n points at once; Dice as metrics.py
    official_test_item TestingDataset.__getitem__: cv2 reads, largest-component box, first points
    NumpyDraws         the random draws, injectable so a test gives both sides the same points
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
# Evaluation: test.py's loop, with TestingDataset (DataLoader.py), the prompt helpers (utils.py)
# and the metrics (metrics.py), what infer.evaluate replaces
# ------------------------------------------------------------------------------------------------

PIXEL_MEAN, PIXEL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]  # DataLoader.py:44-45


class NumpyDraws:
    """The random draws of the test protocol. The official code calls np.random's global state;
    here a seeded numpy Generator makes the same kinds of draws. A test passes another object with
    these three methods to inject draws (e.g. the points our evaluation drew)."""

    def __init__(self, rng):
        self.rng = rng

    def pick(self, candidates: np.ndarray, n: int, columns: str) -> np.ndarray:
        """n rows of `candidates`, uniformly with replacement: candidates[np.random.choice(
        len, n, replace=True)] (np.random.randint(len) for one first point). `columns` ("xy" or
        "rc") says what the candidates' two columns are, for injected draws."""
        return candidates[self.rng.choice(len(candidates), n, replace=True)]

    def integers(self, high: int, size: tuple) -> np.ndarray:  # np.random.randint(0, high, size)
        if isinstance(self.rng, np.random.RandomState):  # the official's own global state
            return self.rng.randint(0, high, size=size)
        return self.rng.integers(0, high, size=size)

    def permutation(self, n: int) -> np.ndarray:
        return self.rng.permutation(n)


def _regions(mask: np.ndarray) -> list:
    """skimage.measure.label (connectivity 2 = 8 neighbours in 2D) + regionprops, reduced to what
    get_boxes_from_mask reads: [(area, (min_row, min_col, max_row + 1, max_col + 1))] in label
    order, i.e. by each component's first pixel in raster order. A flood fill per component."""
    H, W = mask.shape
    seen = np.zeros((H, W), bool)
    regions = []
    for r0, c0 in np.argwhere(mask):  # raster order
        if seen[r0, c0]:
            continue
        seen[r0, c0], stack, pixels = True, [(r0, c0)], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < H and 0 <= cc < W and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        p = np.array(pixels)
        lo, hi = p.min(0), p.max(0) + 1
        regions.append((len(p), (int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))))
    return regions


def get_boxes_from_mask(mask, box_num=1, max_pixel=0) -> torch.Tensor:
    """utils.py:15-66 as the test set calls it (max_pixel=0: no noise, no draw, DataLoader.py:78):
    the bbox of the largest component (ties: the first label), x1/y1 exclusive. (box_num, 4)."""
    if isinstance(mask, torch.Tensor):  # :25-26
        mask = mask.numpy()
    regions = _regions(mask)  # :28-29, label() + regionprops()
    boxes = [bbox for _, bbox in regions]  # :32
    if len(boxes) >= box_num:  # :36-38, sorted() is stable
        sorted_regions = sorted(regions, key=lambda x: x[0], reverse=True)[:box_num]
        boxes = [bbox for _, bbox in sorted_regions]
    elif len(boxes) < box_num:  # :42-44, an empty mask: ZeroDivisionError, as the official
        num_duplicates = box_num - len(boxes)
        boxes += [boxes[i % len(boxes)] for i in range(num_duplicates)]
    noise_boxes = []
    for box in boxes:  # :48-65
        y0, x0, y1, x1 = box
        width, height = abs(x1 - x0), abs(y1 - y0)
        max_noise = min(max_pixel, int(min(width, height) * 0.1 * 5))  # :52-53, std 0.1
        assert max_noise == 0  # :55-62: randint(-0, 0) raises -> noise 0, no draw
        noise_boxes.append((x0, y0, x1, y1))
    return torch.as_tensor(noise_boxes, dtype=torch.float)  # :66


def init_point_sampling(mask, get_point: int, draws) -> tuple:
    """utils.py:117-158: one foreground point (background if there is none), or get_point // 2
    foreground + the rest background in random order. -> coords (n, 2) x, y; labels (n,)."""
    if isinstance(mask, torch.Tensor):  # :127-128
        mask = mask.numpy()
    fg_coords = np.argwhere(mask == 1)[:, ::-1]  # :131-132, (x, y) in raster order
    bg_coords = np.argwhere(mask == 0)[:, ::-1]
    fg_size = len(fg_coords)
    if get_point == 1:  # :137-146
        if fg_size > 0:
            fg_coord, label = draws.pick(fg_coords, 1, "xy")[0], 1  # :139 randint(fg_size)
        else:
            fg_coord, label = draws.pick(bg_coords, 1, "xy")[0], 0  # :143 randint(bg_size)
        coords = torch.as_tensor([fg_coord.tolist()], dtype=torch.float)
        return coords, torch.as_tensor([label], dtype=torch.int)
    num_fg = get_point // 2  # :148-158
    num_bg = get_point - num_fg
    fg_coords = draws.pick(fg_coords, num_fg, "xy")  # :150, 152 choice(fg_size, replace=True)
    bg_coords = draws.pick(bg_coords, num_bg, "xy")  # :151, 153
    coords = np.concatenate([fg_coords, bg_coords], axis=0)
    labels = np.concatenate([np.ones(num_fg), np.zeros(num_bg)]).astype(int)
    indices = draws.permutation(get_point)  # :156
    coords = torch.as_tensor(coords[indices], dtype=torch.float)
    return coords, torch.as_tensor(labels[indices], dtype=torch.int)


def _train_transforms(image: np.ndarray, mask: np.ndarray, img_size: int) -> tuple:
    """train_transforms (utils.py:161-168) applied as DataLoader.py:73-75 does: both sides below
    img_size -> A.PadIfNeeded (centred, top = int((S - h) / 2.0), zeros in normalised space),
    else A.Resize(S, S, INTER_NEAREST) for image and mask; ToTensorV2 (HWC -> CHW)."""
    h, w = mask.shape
    if h < img_size and w < img_size:
        top, left = int((img_size - h) / 2.0), int((img_size - w) / 2.0)
        pads = ((top, img_size - h - top), (left, img_size - w - left))
        image = np.pad(image, (*pads, (0, 0)))
        mask = np.pad(mask, pads)
    else:
        image = cv2.resize(image, (img_size, img_size), interpolation=cv2.INTER_NEAREST)
        mask = cv2.resize(mask, (img_size, img_size), interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask)  # (3, S, S), (S, S)


def official_test_item(image_path, mask_path, image_size: int, point_num: int, draws) -> dict:
    """TestingDataset.__getitem__ (DataLoader.py:47-102, no prompt file), collated as batch 1 and
    passed through to_device (test.py:46-58: image and label to float32)."""
    image = cv2.imread(str(image_path))  # :57, BGR uint8
    image = (image - PIXEL_MEAN) / PIXEL_STD  # :58, float64, RGB statistics on B, G, R
    ori_np_mask = cv2.imread(str(mask_path), 0)  # :63
    if ori_np_mask.max() == 255:  # :65-66
        ori_np_mask = ori_np_mask / 255
    assert np.array_equal(ori_np_mask, ori_np_mask.astype(bool)), mask_path  # :68
    h, w = ori_np_mask.shape  # :70-71
    ori_mask = torch.tensor(ori_np_mask).unsqueeze(0)
    image, mask = _train_transforms(image, ori_np_mask, image_size)  # :73-75
    mask = mask.to(torch.int64)
    boxes = get_boxes_from_mask(mask, max_pixel=0)  # :78
    point_coords, point_labels = init_point_sampling(mask, point_num, draws)  # :79
    return dict(  # :86-95, collated (batch 1), image and label made float by to_device
        image=image[None].float(),  # (1, 3, S, S)
        label=mask[None, None].float(),  # (1, 1, S, S)
        point_coords=point_coords[None],  # (1, n, 2)
        point_labels=point_labels[None],  # (1, n)
        boxes=boxes[None],  # (1, 1, 4)
        original_size=(h, w),
        ori_label=ori_mask[None],  # (1, 1, H, W), left as read
    )


def select_random_points(pr, gt, point_num: int, draws) -> tuple:
    """utils.py:69-114: point_num clicks per mask in its error region; a mask without error
    pixels gets random pixels, which are then labelled -1 (not a point)."""
    pred, gt = pr.data.cpu().numpy(), gt.data.cpu().numpy()  # :80-82
    error = np.zeros_like(pred)
    error[pred != gt] = 1
    batch_points, batch_labels = [], []
    for j in range(error.shape[0]):  # :87-113
        one_pred, one_gt = pred[j].squeeze(0), gt[j].squeeze(0)
        one_error = error[j].squeeze(0)
        indices = np.argwhere(one_error == 1)  # (row, col)
        if indices.shape[0] > 0:  # :93-94
            selected_indices = draws.pick(indices, point_num, "rc")
        else:  # :95-97: the official hard-codes 256, its mask size; here the mask's size
            indices = draws.integers(one_pred.shape[-1], size=(point_num, 2))
            selected_indices = draws.pick(indices, point_num, "rc")
        selected_indices = selected_indices.reshape(-1, 2)
        points, labels = [], []
        for i in selected_indices:  # :101-110
            x, y = i[0], i[1]  # x: row, y: column, as the official names them
            if one_pred[x, y] == 0 and one_gt[x, y] == 1:
                label = 1
            elif one_pred[x, y] == 1 and one_gt[x, y] == 0:
                label = 0
            else:
                label = -1
            points.append((y, x))  # :109, "Negate the coordinates"
            labels.append(label)
        batch_points.append(points)
        batch_labels.append(labels)
    return np.array(batch_points), np.array(batch_labels)


def generate_point(masks, labels, low_res_masks, batched_input: dict, point_num: int, clicks):
    """utils.py:192-205 (used by test.py and train.py alike): clicks from sigmoid(masks) > 0.5
    against the label, the previous low-res mask as probabilities, boxes dropped. clicks(masks
    binary, labels, n) -> (points, labels) is select_random_points over the caller's draws."""
    masks_binary = (torch.sigmoid(masks.clone()) > 0.5).float()  # :193-195
    low_res_masks_logist = torch.sigmoid(low_res_masks.clone())  # :197-198
    points, point_labels = clicks(masks_binary, labels, point_num)  # :200
    device = masks.device  # :201-204 (and train.py:166's to_device)
    batched_input["mask_inputs"] = low_res_masks_logist
    batched_input["point_coords"] = torch.as_tensor(points).to(device)  # (P, n, 2)
    batched_input["point_labels"] = torch.as_tensor(point_labels).to(device)  # (P, n)
    batched_input["boxes"] = None
    return batched_input


@torch.no_grad()  # test.py:87
def eval_decode(sam, batched_input: dict, image_embeddings, image_size: int, multimask=True):
    """prompt_and_decoder (test.py:81-111). -> masks (1, 1, S, S), low-res, IoU (1, 1)."""
    points = None  # :82-85
    if batched_input["point_coords"] is not None:
        points = (batched_input["point_coords"], batched_input["point_labels"])
    boxes = batched_input.get("boxes")  # collated (1, 1, 4); the prompt encoder reshapes to
    sparse, dense = sam.prompt_encoder(points, boxes, batched_input.get("mask_inputs"))  # :88-92
    low_res_masks, iou_predictions = sam.mask_decoder(
        image_embeddings, sam.prompt_encoder.dense_pe(), sparse, dense, multimask
    )  # :94-100, (1, K, S/4, S/4), (1, K)
    if multimask:  # :102-109
        max_values, max_indexs = torch.max(iou_predictions, dim=1)
        iou_predictions = max_values.unsqueeze(1)
        low_res = [low_res_masks[i : i + 1, idx] for i, idx in enumerate(max_indexs)]
        low_res_masks = torch.stack(low_res, 0)  # (1, 1, S/4, S/4)
    masks = F.interpolate(
        low_res_masks, (image_size, image_size), mode="bilinear", align_corners=False
    )  # :110
    return masks, low_res_masks, iou_predictions


def postprocess_masks(low_res_masks, image_size: int, original_size: tuple):
    """test.py:61-78: bilinear to S; crop the centred pad (both sides < S) or bilinear to the
    original size."""
    ori_h, ori_w = original_size
    masks = F.interpolate(
        low_res_masks, (image_size, image_size), mode="bilinear", align_corners=False
    )  # :63-68
    if ori_h < image_size and ori_w < image_size:  # :70-74
        top, left = (image_size - ori_h) // 2, (image_size - ori_w) // 2
        return masks[..., top : ori_h + top, left : ori_w + left]
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)  # :76


def seg_metrics(pr, gt, eps=1e-7, threshold=0.5) -> tuple:
    """metrics.py:12-54 for metrics ["iou", "dice"]: sigmoid only when some value is negative
    (a map of non-negative logits is thresholded raw at 0.5: the official quirk), both sides
    > 0.5, eps-smoothed, mean over the batch. -> (iou, dice)."""
    if pr.min() < 0:  # _list_tensor :20-22
        pr = torch.sigmoid(pr)
    pr, gt = (pr > threshold).type(pr.dtype), (gt > threshold).type(gt.dtype)  # _threshold :5-9
    intersection = torch.sum(gt * pr, dim=[1, 2, 3])
    union = torch.sum(gt, dim=[1, 2, 3]) + torch.sum(pr, dim=[1, 2, 3])  # :39-41
    dice = ((2.0 * intersection + eps) / (union + eps)).numpy()
    iou = ((intersection + eps) / (union - intersection + eps)).numpy()  # :30-32
    return float(np.mean(iou)), float(np.mean(dice))  # SegMetrics :51-54


def official_test_mask(
    sam,
    image_path,
    mask_path,
    draws,
    boxes_prompt=True,
    point_num=1,
    iter_point=1,
    image_size=256,
    multimask=True,
) -> dict:  #
    """test.py:144-196 for one item (batch 1, one mask): a box, or `iter_point` decodes with one
    error click appended per iteration, or `point_num` points at once (iter_point 1). The loss
    (test.py:187-188) is left out. -> {"iou", "dice"} rounded to 4 decimals as test.py:191, and
    the prompts: "boxes" (1, 4), or the accumulated "point_coords" (n, 2) and "point_labels"."""
    if iter_point > 1:  # parse_args :41-42
        point_num = 1
    batched_input = official_test_item(image_path, mask_path, image_size, point_num, draws)
    ori_labels, labels = batched_input["ori_label"], batched_input["label"]  # :146-148
    original_size = batched_input["original_size"]
    with torch.no_grad():  # :157-158
        image_embeddings = sam.image_encoder(batched_input["image"])
    if boxes_prompt:  # :160-164
        batched_input["point_coords"], batched_input["point_labels"] = None, None
        masks, low_res_masks, iou_predictions = eval_decode(
            sam, batched_input, image_embeddings, image_size, multimask
        )
        prompts = {"boxes": batched_input["boxes"][0]}
    else:  # :166-181
        batched_input["boxes"] = None
        point_coords = [batched_input["point_coords"]]
        point_labels = [batched_input["point_labels"]]
        for it in range(iter_point):
            masks, low_res_masks, iou_predictions = eval_decode(
                sam, batched_input, image_embeddings, image_size, multimask
            )
            if it != iter_point - 1:
                batched_input = generate_point(
                    masks,
                    labels,
                    low_res_masks,
                    batched_input,
                    point_num,
                    lambda mb, lab, n: select_random_points(mb, lab, n, draws),
                )
                point_coords.append(batched_input["point_coords"])
                point_labels.append(batched_input["point_labels"])
                batched_input["point_coords"] = torch.concat(point_coords, dim=1)
                batched_input["point_labels"] = torch.concat(point_labels, dim=1)
        prompts = {
            "point_coords": torch.concat(point_coords, dim=1)[0],
            "point_labels": torch.concat(point_labels, dim=1)[0],
        }  # :181
    masks = postprocess_masks(low_res_masks, image_size, original_size)  # :183
    iou, dice = seg_metrics(masks, ori_labels)  # :190
    iou, dice = (float(f"{m:.4f}") for m in (iou, dice))  # :191
    return {"iou": iou, "dice": dice, **prompts}


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
        return select_random_points(masks_binary, labels, point_num, NumpyDraws(self.np))


def _draws(draws):
    """Callers that pass a numpy Generator (bench.py) get OfficialDraws seeded from it."""
    if isinstance(draws, np.random.Generator):
        return OfficialDraws(int(draws.integers(2**31)))
    return draws


def official_points(masks, labels, low_res_masks, prompt: dict, point_num: int, draws) -> dict:
    """generate_point in training (train.py:165, 196), its clicks from the draws' clicks()."""
    return generate_point(masks, labels, low_res_masks, prompt, point_num, _draws(draws).clicks)


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
