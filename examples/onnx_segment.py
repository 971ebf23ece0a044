"""Segment an image with a box using only the files `onnx_export.py` writes: numpy, Pillow and
onnxruntime, no PyTorch. The proof that the exported files are self-sufficient, and a template for
putting the model into a viewer or a service.

    python examples/onnx_segment.py MODEL_DIR IMAGE --box X0 Y0 X1 Y1 --out mask.png
        [--point X Y] [--neg X Y] (clicks that refine the box)  [--no-multimask]

MODEL_DIR holds encoder.onnx, decoder.onnx (three masks, the best kept by predicted IoU),
decoder_single.onnx (one mask) and preprocess.json. The steps mirror data.preprocess,
Sam.encode / Sam.decode and infer.py's postprocessing, in numpy: read the image as 8-bit RGB;
place it in the S x S input (resize + pad, as preprocess.json says); normalise; encode; map the
prompts to model pixels; decode; upsample the low-res logits to S, crop the padding, resize to the
original size (bilinear); threshold. The mask is written as a 0/255 PNG.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

# ------------------------------------------------------------------------------------------------
# Resizing, as torch.nn.functional.interpolate does it (align_corners=False), on (C, H, W) float32
# ------------------------------------------------------------------------------------------------


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel: floor(dst * in / out), OpenCV's INTER_NEAREST."""
    scale = np.float32(n_in / n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def resize_nearest(x: np.ndarray, h: int, w: int) -> np.ndarray:
    return x[:, _nearest_index(x.shape[1], h)][:, :, _nearest_index(x.shape[2], w)]


def _linear_weights(n_in: int, n_out: int) -> tuple:
    """Plain linear interpolation (half-pixel centres, edges clamped): indices i0, i1 and weights
    of each output pixel. The source position is rounded once, as PyTorch's fused multiply-add
    computes it; rounding twice moves it enough to change the mask's edge pixels."""
    scale = np.float32(n_in / n_out)
    src = ((np.arange(n_out) + 0.5) * np.float64(scale) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0.astype(np.float32)
    return i0, i1, np.float32(1) - w1, w1


def resize_bilinear(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear without antialiasing (interpolate(mode="bilinear")): the mask postprocessing."""
    y0, y1, wy0, wy1 = _linear_weights(x.shape[1], h)
    x0, x1, wx0, wx1 = _linear_weights(x.shape[2], w)
    top = x[:, y0][:, :, x0] * wx0 + x[:, y0][:, :, x1] * wx1  # (C, h, w)
    bottom = x[:, y1][:, :, x0] * wx0 + x[:, y1][:, :, x1] * wx1
    return (top * wy0[:, None] + bottom * wy1[:, None]).astype(np.float32)


def _antialias_taps(n_in: int, n_out: int) -> tuple:
    """Source indices and weights, (n_out, K) each, of the antialiased bilinear (triangle) filter
    that interpolate(..., antialias=True) and Pillow use: the triangle widens by the reduction
    factor, and each row's weights are normalised over its taps inside the image."""
    scale = np.float32(n_in / n_out)
    support = scale if scale >= 1 else np.float32(1)
    inv = np.float32(1) / scale if scale >= 1 else np.float32(1)
    K = int(np.ceil(support)) * 2 + 1
    idx, wts = np.zeros((n_out, K), np.int64), np.zeros((n_out, K), np.float32)
    for i in range(n_out):
        center = scale * np.float32(i + 0.5)
        lo = max(int(center - support + np.float32(0.5)), 0)
        hi = min(int(center + support + np.float32(0.5)), n_in)
        t = (np.arange(lo, hi, dtype=np.float32) - center + np.float32(0.5)) * inv
        w = np.maximum(np.float32(1) - np.abs(t), np.float32(0))
        idx[i, : hi - lo], wts[i, : hi - lo] = np.arange(lo, hi), w / w.sum() if w.sum() else w
    return idx, wts


def _filter_last_axis(x: np.ndarray, idx: np.ndarray, wts: np.ndarray) -> np.ndarray:
    """Sum of taps along the last axis, accumulated tap by tap in float32 with one rounding per
    step (PyTorch's fused multiply-add), so that the 8-bit rounding after it agrees."""
    out = x[..., idx[:, 0]] * wts[:, 0]
    for k in range(1, idx.shape[1]):
        out = (out.astype(np.float64) + x[..., idx[:, k]].astype(np.float64) * wts[:, k]).astype(
            np.float32
        )
    return out


def resize_bilinear_antialias(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Antialiased bilinear: along the width first, then the height, as PyTorch does."""
    x = _filter_last_axis(x, *_antialias_taps(x.shape[2], w))  # (C, H, w)
    x = _filter_last_axis(x.transpose(0, 2, 1), *_antialias_taps(x.shape[1], h))  # (C, w, h)
    return np.ascontiguousarray(x.transpose(0, 2, 1))  # (C, h, w)


# ------------------------------------------------------------------------------------------------
# Image -> model input, prompts -> model space, low-res logits -> mask (data.preprocess in numpy)
# ------------------------------------------------------------------------------------------------


def read_image(path) -> np.ndarray:
    """An 8-bit grey or colour image -> (H, W, 3) uint8 RGB (alpha dropped)."""
    try:
        im = Image.open(path)
        im.load()
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read image ({e})") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        raise SystemExit(f"{path}: {im.mode} pixels; convert to 8 bits first (infer.py does)")
    return np.ascontiguousarray(np.asarray(im.convert("RGB")))


def placement(H: int, W: int, spec: dict) -> dict:
    """Where the (H, W) image sits in the S x S input: model = original * scale + pad."""
    S = spec["image_size"]
    if spec["resize_mode"] == "stretch":
        if H < S and W < S:  # not resized: zero-padded, centred
            return dict(scale=(1.0, 1.0), pad=((S - W) // 2, (S - H) // 2), content=(H, W))
        return dict(scale=(S / W, S / H), pad=(0, 0), content=(S, S))
    k = S / max(H, W)  # "longest": longest side to S, pad bottom/right
    h, w = int(H * k + 0.5), int(W * k + 0.5)
    return dict(scale=(w / W, h / H), pad=(0, 0), content=(h, w))


def preprocess(image: np.ndarray, spec: dict) -> tuple:
    """(H, W, 3) uint8 RGB -> (1, 3, S, S) float32 as encoder.onnx expects, and the placement."""
    H, W = image.shape[:2]
    S, place = spec["image_size"], placement(H, W, spec)
    (h, w), (left, top) = place["content"], place["pad"]
    x = image.transpose(2, 0, 1).astype(np.float32)  # (3, H, W)
    if spec["channel_order"] == "BGR":
        x = x[::-1]
    if spec["resize_mode"] == "longest" and (h, w) != (H, W):
        x = np.clip(np.round(resize_bilinear_antialias(x, h, w)), 0, 255)  # the 8-bit image
    if spec["intensity"] == "min_max":
        x = (x - x.min()) / max(x.max() - x.min(), np.float32(1e-8))
    else:
        mean = np.asarray(spec["pixel_mean"], np.float32)[:, None, None]
        x = (x - mean) / np.asarray(spec["pixel_std"], np.float32)[:, None, None]
    if x.shape[1:] != (h, w):
        x = resize_nearest(x, h, w)  # "stretch": after normalising, as the official code
    out = np.zeros((1, 3, S, S), np.float32)
    out[0, :, top : top + h, left : left + w] = x
    return out, place


def prompt_arrays(place: dict, box=None, points=(), labels=()) -> tuple:
    """One prompt in original pixels -> point_coords (1, N, 2), point_labels (1, N) in model
    pixels, SAM's way: the box as two corner points labelled 2 and 3 after the clicks; without a
    box, one padding point labelled -1."""
    scale, pad = np.asarray(place["scale"], np.float32), np.asarray(place["pad"], np.float32)
    coords = [np.asarray(p, np.float32) * scale + pad for p in points]
    labels = [float(v) for v in labels]
    if box is not None:
        coords += [np.asarray(box[:2], np.float32) * scale + pad]
        coords += [np.asarray(box[2:], np.float32) * scale + pad]
        labels += [2.0, 3.0]
    else:
        coords, labels = coords + [np.zeros(2, np.float32)], labels + [-1.0]
    return np.stack(coords)[None].astype(np.float32), np.asarray([labels], np.float32)


def postprocess(low: np.ndarray, place: dict, original: tuple, S: int) -> np.ndarray:
    """(K, S/4, S/4) low-res logits -> (K, H, W): upsample to S, crop the padding, resize to the
    original size, all bilinear (infer.py's Geometry.logits_to_original)."""
    (h, w), (left, top) = place["content"], place["pad"]
    x = resize_bilinear(low.astype(np.float32), S, S)[:, top : top + h, left : left + w]
    return x if (h, w) == tuple(original) else resize_bilinear(x, *original)


# ------------------------------------------------------------------------------------------------
# Segmenting
# ------------------------------------------------------------------------------------------------


def load(model_dir, threads: int = 0) -> dict:
    """preprocess.json and the three onnxruntime sessions of an export folder."""
    model_dir = Path(model_dir)
    try:
        spec = json.loads((model_dir / "preprocess.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{model_dir / 'preprocess.json'}: cannot read ({e})") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sessions = {}
    for key, name in spec["files"].items():
        try:
            sessions[key] = ort.InferenceSession(
                str(model_dir / name), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise SystemExit(
                f"{model_dir / name}: onnxruntime {ort.__version__} cannot load it (opset "
                f"{spec.get('opset')}?): {str(e).splitlines()[0]}"
            ) from None
    return {"spec": spec, **sessions}


def segment(models: dict, image: np.ndarray, box=None, points=(), labels=(), multimask=True):
    """One object -> (H, W) bool mask, (H, W) float32 logits, predicted IoU."""
    spec, H, W = models["spec"], *image.shape[:2]
    x, place = preprocess(image, spec)
    (emb,) = models["encoder"].run(None, {"image": x})  # (1, D, h, w)
    coords, labs = prompt_arrays(place, box, points, labels)
    low = spec["low_res_size"]
    feed = {
        "image_embeddings": emb, "point_coords": coords, "point_labels": labs,
        "mask_input": np.zeros((1, 1, low, low), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
    }  # fmt: skip
    key = "decoder" if multimask else "decoder_single"
    if key not in models:
        raise SystemExit(f"this export has no {key}.onnx (see preprocess.json's files)")
    decoder = models[key]
    masks, iou = decoder.run(None, feed)  # (1, K, low, low), (1, K)
    best = int(iou[0].argmax())  # the official choice among the three: highest predicted IoU
    logits = postprocess(masks[0, best : best + 1], place, (H, W), spec["image_size"])[0]
    return logits > spec["mask_threshold"], logits, float(iou[0, best])


def write_png(path, mask: np.ndarray) -> None:
    """0/255 PNG, written to a temporary file and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(args) -> float:
    image = read_image(args.image)
    H, W = image.shape[:2]
    x0, y0, x1, y1 = args.box
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise SystemExit(f"{args.image}: box {args.box} is not inside the {W}x{H} image")
    points = [*args.point, *args.neg]
    labels = [1] * len(args.point) + [0] * len(args.neg)
    models = load(args.model_dir, args.threads)
    mask, _, iou = segment(models, image, args.box, points, labels, args.multimask)
    write_png(args.out, mask)
    print(f"wrote {args.out}: {int(mask.sum())} pixels, predicted IoU {iou:.3f}")
    return iou


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", help="the folder onnx_export.py wrote")
    p.add_argument("image", help="8-bit PNG / JPEG / TIFF, grey or colour")
    p.add_argument("--box", type=float, nargs=4, required=True, metavar=("X0", "Y0", "X1", "Y1"))
    p.add_argument("--point", type=float, nargs=2, action="append", default=[], metavar=("X", "Y"))
    p.add_argument("--neg", type=float, nargs=2, action="append", default=[], metavar=("X", "Y"))
    p.add_argument("--out", required=True, help="mask PNG (0/255)")
    p.add_argument("--multimask", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    main(p.parse_args())
    sys.exit(0)
