"""The dataset-building command: 3D NIfTI volumes or 2D image folders -> the SA-Med2D-20M layout
that data.read_manifest, data.TrainDataset and data.TestDataset read.

    python prepare.py volumes --images imagesTr --labels labelsTr --out out --modality mr_t1 \
        --dataset MNI152 --axes z --workers 2
    python prepare.py images --images img_dir --labels mask_dir --out out --modality xray \
        --dataset X

(`python data.py volumes|images ...` is the same command.) The output:

    OUT/images/{modality}--{dataset}--{case}--{axis}_{slice:04d}.png     8-bit grey (or RGB 2D)
    OUT/masks/{image name}--label_{label}_{instance:03d}.png             0/255
    OUT/image2label_{split}.json, OUT/label2image_{split}.json           split: train, val, test
    OUT/cases/{case}.json   what one case produced; written last, so it marks the case complete

Files are paired into cases (a volume, or a patient's 2D images), cases are split train/val/test
by a seeded shuffle, and a shard (i, n) of a cluster job takes cases i, i+n, ... The work is cut
into units (a case's axis, in parts when several workers share one volume) that run in this
process or a pool; a case's record is written once all its units are done, so a killed run
resumes where it stopped. Every file is written atomically (files.py). The reading, intensity
normalisation, slicing and components are data.py's.
"""

import argparse
import ctypes
import functools
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import cli
import data
from data import WINDOWS, DataError
from files import (
    IMAGE_SUFFIXES,
    VOLUME_SUFFIXES,
    check_labels,
    is_binary,
    read_json,
    read_label_map,
    stem,
    write_json,
    write_png,
)


@dataclass
class DataConfig:
    kind: str = "volumes"  # "volumes" (3D NIfTI + label volumes) or "images" (2D files + masks)
    images: str = ""  # folder of images / volumes (or an MSD root, or a root of case folders)
    labels: str = ""  # folder of label volumes / masks, paired by file name (see find_cases)
    out: str = "sa_med2d_out"  # output root in the SA-Med2D-20M layout
    modality: str = "mr"  # first name field, e.g. ct, mr_t1, xray
    dataset: str = "dataset"  # second name field
    axes: tuple[str, ...] = ("x", "y", "z")  # volumes: slice axes (x sagittal, y coronal, z axial)
    window: str | tuple | None = None  # CT preset or (level, width); None: percentiles
    instances: bool = False  # split every label into connected components (instance masks)
    min_area: float = 0.00153  # drop masks below this fraction of the image (the paper's)
    max_anisotropy: float = (
        3.0  # volumes: skip slice axes whose pixel side ratio exceeds it (0: off)
    )
    resample: bool = True  # volumes: resample anisotropic slices to square pixels (else as stored)
    max_labels: int = 255  # refuse label volumes/maps with more distinct labels (intensities)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test fractions, by case
    seed: int = 0  # seed of the case-level split
    case_pattern: str = ""  # 2D: regex on the file stem whose group 1 is the case (patient) id
    workers: int = 1  # processes; 1 runs in this process
    shard: tuple[int, int] = (0, 1)  # (i, n): this run handles cases i, i+n, i+2n, ... (0-based)
    skip_bad: bool = False  # continue past bad inputs and list them at the end
    channel: int = 0  # nnU-Net file names: the image channel to use (0 = the _0000 files)


SPLITS = ("train", "val", "test")


@dataclass
class Case:
    name: str  # the case field of the output names
    pairs: list  # [(image path, label path)]: one volume pair, or the 2D images of a patient
    error: str = ""  # a problem found while pairing files
    rule: str = ""  # the naming rule that paired its files


def _clean(s: str) -> str:
    """A name field: only [A-Za-z0-9_.-], never the '--' separator."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", s)
    while "--" in s:
        s = s.replace("--", "-")
    return s or "_"


def _list_files(folder: Path, suffixes) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    ok = lambda p: p.is_file() and p.name.lower().endswith(suffixes) and p.name[0] != "."
    return sorted(p for p in folder.iterdir() if ok(p))


# File-name pairing. A role token ends a stem after "_", "-" or ".": "case01_seg", "case01-image".
LABEL_ROLES = {"label", "labels", "seg", "segmentation", "mask", "gt"}
IMAGE_ROLES = {"image", "img", "imaging", "vol", "volume", "data"}


def _role(stem: str) -> tuple[str, str]:
    """A stem -> (role, base): ("label", "case01") for "case01_seg", ("image", "") for "imaging",
    ("", stem) without a role token."""
    base, token = re.fullmatch(r"(?:(.*)[_.-])?([^_.-]*)", stem).groups()
    token = token.lower()
    role = "label" if token in LABEL_ROLES else "image" if token in IMAGE_ROLES else ""
    return (role, base or "") if role else ("", stem)


def _layout(cfg: DataConfig, suffixes) -> tuple[Path, Path | None, str]:
    """-> (images folder, labels folder or None for one folder per case, layout note)."""
    images = Path(cfg.images)
    if cfg.labels and Path(cfg.labels).resolve() != images.resolve():
        return images, Path(cfg.labels), ""
    if not cfg.labels and (images / "imagesTr").is_dir() and (images / "labelsTr").is_dir():
        return images / "imagesTr", images / "labelsTr", "MSD/nnU-Net root: imagesTr + labelsTr"
    subdirs = [d for d in sorted(images.iterdir()) if d.is_dir() and d.name[0] != "."]
    if subdirs and not _list_files(images, suffixes):
        return images, None, f"one folder per case ({len(subdirs)} folders)"
    if not cfg.labels:
        raise DataError(f"{images}: give --labels (or a root with imagesTr/ and labelsTr/, or "
                        "one folder per case)")  # fmt: skip
    return images, images, "images and labels in one folder: paired by role suffixes only"


def _pair(images: list[Path], labels: list[Path], one_folder: bool, channel: str):
    """Candidate labels of each image under every naming rule; -> {image: {label: rule}} and
    the images set aside as further nnU-Net channels."""
    by_stem, by_base = {}, {}
    for lab in labels:
        by_stem.setdefault(stem(lab), []).append(lab)
        role, base = _role(stem(lab))
        if role == "label":
            by_base.setdefault(base, []).append(lab)
    stems = {stem(f) for f in images}
    found, channels = {}, []
    for f in images:
        st, cands = stem(f), {}
        role, base = _role(st)
        if role == "label" and one_folder:
            continue  # a label file, not an image
        nn = re.fullmatch(r"(.*)_(\d{4})", st)
        if nn and nn.group(2) != channel and nn.group(1) in by_stem:
            channels.append(f)  # another nnU-Net channel of a case: set aside
            continue
        if not one_folder:
            cands.update({lab: "same stem" for lab in by_stem.get(st, [])})
        if nn and not one_folder:
            cands.update({lab: "nnU-Net channel" for lab in by_stem.get(nn.group(1), [])})
        if role != "label":
            cands.update({lab: "role suffix" for lab in by_base.get(base, []) if lab != f})
            if role == "image" and not one_folder:  # case01_image + case01
                cands.update({lab: "role suffix" for lab in by_stem.get(base, [])})
        found[f] = cands
    lonely = [c for c in channels if f"{stem(c)[:-5]}_{channel}" not in stems]
    return found, channels, lonely


def find_cases(cfg: DataConfig) -> list[Case]:
    """Pair every image with its label file and group files into cases. Layouts (docs/data.md):
    the same stem in two folders; nnU-Net's `case_0000` image + `case` label (other channels set
    aside); role suffixes (`case_image` + `case_label`, also _img/_seg/_mask/_gt; the only rule
    within one folder); one folder per case (`case/image.nii.gz` + `case/label.nii.gz`); an MSD
    root with imagesTr/ + labelsTr/. An image with two candidate labels, or a label claimed by two
    images, is an error, never a guess. The pairing is printed."""
    suffixes = VOLUME_SUFFIXES if cfg.kind == "volumes" else IMAGE_SUFFIXES
    image_dir, label_dir, note = _layout(cfg, suffixes)
    pairs = []  # (case id, image, label or None, rule, error)
    if label_dir is None:  # one folder per case
        for d in sorted(p for p in image_dir.iterdir() if p.is_dir() and p.name[0] != "."):
            files = _list_files(d, suffixes)
            labs = [f for f in files if _role(stem(f))[0] == "label"]
            imgs = [f for f in files if _role(stem(f))[0] != "label"]  # image or no role
            names = lambda fs: [f.name for f in fs]
            err = "" if len(imgs) == len(labs) == 1 else (
                f"{d}: need one image and one label file (role names such as image/label), "
                f"found images {names(imgs)}, labels {names(labs)}")  # fmt: skip
            pairs.append((d.name, imgs[0] if imgs else d, labs[0] if len(labs) == 1 else None,
                          "case folder", err))  # fmt: skip
        labels = [p[2] for p in pairs if p[2]]
    else:
        images, labels = _list_files(image_dir, suffixes), _list_files(label_dir, suffixes)
        one_folder = label_dir == image_dir
        found, channels, lonely = _pair(images, labels, one_folder, f"{cfg.channel:04d}")
        if one_folder and not any(_role(stem(f))[0] == "label" for f in labels):
            raise DataError(f"{image_dir}: --images and --labels are the same folder and no file "
                            "name has a label role (_label, _seg, _mask, _gt): every image would "
                            "be its own label map")  # fmt: skip
        if channels:
            print(f"{len(channels)} further nnU-Net channels set aside (e.g. {channels[0].name}); "
                  f"the _{cfg.channel:04d} image of each case is used (--channel)")  # fmt: skip
        claims = {}
        for f, cands in found.items():
            for lab in cands:
                claims.setdefault(lab, []).append(f)
        for f, cands in found.items():
            lab, rule = next(iter(cands.items()), (None, ""))
            base = stem(lab) if lab else stem(f)
            case_id = _role(base)[1] if rule == "role suffix" else base
            if len(cands) > 1:
                err = f"{f}: ambiguous, {len(cands)} label files fit: {', '.join(map(str, cands))}"
            elif lab and len(claims[lab]) > 1:
                err = f"{lab}: ambiguous, claimed by {', '.join(map(str, claims[lab]))}"
            else:
                err = "" if lab else f"{f}: no label file for it in {label_dir}"
            pairs.append((case_id, f, lab, rule, err))
        pairs += [(stem(c), c, None, "", f"{c}: an nnU-Net channel without its "
                   f"_{cfg.channel:04d} image")
                  for c in lonely]  # fmt: skip
    cases: dict[str, Case] = {}
    for case_id, f, lab, rule, error in pairs:
        if cfg.kind == "images" and cfg.case_pattern:
            match = re.search(cfg.case_pattern, stem(f))
            case_id = match.group(1) if match else case_id
            error = error or ("" if match else f"{f}: case pattern {cfg.case_pattern!r} does not "
                              "match")  # fmt: skip
        case = cases.setdefault(_clean(case_id), Case(_clean(case_id), [], rule=rule))
        case.pairs.append((f, lab))
        if cfg.kind == "volumes" and len(case.pairs) > 1:
            error = f"{f}: case name {case.name} is also used by {case.pairs[0][0]}"
        case.error = case.error or error
    out = [cases[k] for k in sorted(cases)]
    _print_pairing(out, note)
    used = {lab for c in out for _, lab in c.pairs}
    unused = [str(p) for p in labels if p not in used]
    if unused:  # not an error, but never silent
        print(f"{len(unused)} label files have no image: {', '.join(unused)}")
    return out


def _print_pairing(cases: list[Case], note: str) -> None:
    rules = {}
    for c in cases:
        rules[c.rule or "unpaired"] = rules.get(c.rule or "unpaired", 0) + 1
    print(f"pairing rule: {', '.join(f'{r} ({n} cases)' for r, n in rules.items())}"
          + (f"; {note}" if note else ""))  # fmt: skip
    for c in cases[:10]:
        f, lab = c.pairs[0]
        more = f" (+{len(c.pairs) - 1} more)" if len(c.pairs) > 1 else ""
        print(f"  {c.name}: {f.name} + {lab.name if lab else '(no label)'}{more}")
    if len(cases) > 10:
        print(f"  ... and {len(cases) - 10} more cases")


def split_cases(names, fractions, seed: int) -> dict[str, str]:
    """Case -> train/val/test: a seeded shuffle of the sorted names, cut by the fractions. Split by
    case (volume or patient), never by slice, so no patient is on both sides."""
    names = sorted(names)
    f = np.asarray(fractions, float) / sum(fractions)
    n_train = int(round(f[0] * len(names)))
    n_val = min(int(round(f[1] * len(names))), len(names) - n_train)
    order = np.random.default_rng(seed).permutation(len(names))
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(names) - n_train - n_val)
    return {names[i]: s for i, s in zip(order, split, strict=True)}


def _slice_masks(lab: np.ndarray, cfg: DataConfig) -> tuple[list, int]:
    """(H, W) integer labels -> ([(label, instance, mask)] that pass the area filter, the number
    dropped): a mask is dropped when its area is below cfg.min_area of the image (the paper's
    0.153%), counted on the slice as written (square pixels after resampling)."""
    min_px = cfg.min_area * lab.size
    out, dropped = [], 0
    for label in np.unique(lab[lab > 0]).tolist():
        m = lab == label
        parts = _instances(m) if cfg.instances else [m]
        keep = [p for p in parts if p.sum() >= min_px]
        out += [(label, k, p) for k, p in enumerate(keep)]
        dropped += len(parts) - len(keep)
    return out, dropped


def _instances(m: np.ndarray) -> list[np.ndarray]:
    """A binary mask -> its connected components, largest first (ties in scan order)."""
    lab = data.label_components(torch.from_numpy(m)).numpy()
    sizes = np.bincount(lab.ravel())[1:]
    order = np.lexsort((np.arange(len(sizes)), -sizes))
    return [lab == k + 1 for k in order]


def _image_name(cfg: DataConfig, case: Case, slice_id: str) -> str:
    return f"{_clean(cfg.modality)}--{_clean(cfg.dataset)}--{case.name}--{slice_id}"


def _write_slice(out: Path, name: str, image: np.ndarray, masks) -> tuple[str, list[str]]:
    image_rel = f"images/{name}.png"
    write_png(out / image_rel, image)
    mask_rels = []
    for label, k, m in masks:
        mask_rels.append(f"masks/{name}--label_{label}_{k:03d}.png")
        write_png(out / mask_rels[-1], m.astype(np.uint8) * 255)
    return image_rel, mask_rels


# ----------------------------------------------------------------------------------------------
# Thick slices: nnU-Net's anisotropy rule (docs/data.md). A slice's pixels are (row, col) mm from
# the canonical spacing; a slice axis whose pixels are more than max_anisotropy times longer than
# wide is skipped (nnU-Net's 2D model never sees through-plane slices of thick data), a milder
# ratio is resampled to square pixels at the finer spacing, upsampling only.

PIXEL_AXES = {"x": (2, 1), "y": (2, 0), "z": (1, 0)}  # slice axis -> canonical (row, col) axes


def axis_plan(spacing, shape, axis: str, cfg: DataConfig) -> dict:
    """What happens to the slices along `axis` of a volume with canonical voxel `spacing` (mm)
    and `shape`: {"action": "kept" | "resampled" | "skipped", "size": [H, W] as written,
    "pixel_mm": [row, col] as written, "ratio": longer / shorter pixel side}."""
    r, c = PIXEL_AXES[axis]
    (row, col), size = (float(spacing[r]), float(spacing[c])), [shape[r], shape[c]]
    ratio = max(row, col) / min(row, col)
    plan = dict(action="kept", size=size, pixel_mm=[row, col], ratio=round(ratio, 4))
    if cfg.max_anisotropy and ratio > cfg.max_anisotropy:
        plan.update(action="skipped", size=None)
    elif cfg.resample and ratio > 1 + 1e-3:  # header rounding (0.9375 vs 0.94) is not resampled
        t = min(row, col)  # nnU-Net's compute_new_shape: round(n * old / new)
        plan.update(action="resampled", size=[round(size[0] * row / t), round(size[1] * col / t)],
                    pixel_mm=[t, t], stored=size, stored_mm=[row, col])  # fmt: skip
    return plan


def plan_text(plan: dict, cfg: DataConfig) -> str:
    (row, col), size = plan["pixel_mm"], plan["size"]
    if plan["action"] == "skipped":
        limit = f"ratio {plan['ratio']:.1f} > {cfg.max_anisotropy:g}"
        return f"skipped, pixels {row:.2f} x {col:.2f} mm (rows x cols; {limit})"
    min_px = int(np.ceil(cfg.min_area * size[0] * size[1]))
    area = f"min area {100 * cfg.min_area:.3g}% = {min_px} px ({min_px * row * col:.0f} mm^2)"
    if plan["action"] == "kept":
        return f"kept, HxW {size[0]}x{size[1]} px at {row:.2f} x {col:.2f} mm; {area}"
    (h, w), (r0, c0) = plan["stored"], plan["stored_mm"]
    which = f"rows {r0:.2f}" if h != size[0] else f"cols {c0:.2f}"
    return (f"resampled HxW {h}x{w} -> {size[0]}x{size[1]} px ({which} -> {row:.2f} mm), "
            f"image linear, labels nearest; {area}")  # fmt: skip


def resample_slice(image: np.ndarray, labels: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) uint8 image and integer labels -> (H', W'): the image linearly interpolated (from its
    8-bit values, rounded back), the labels nearest, both on the pixel-centre grid (torch's
    align_corners=False: output pixel i samples (i + 0.5) * n / n' - 0.5, edges clamped), so that
    image and labels stay aligned. The labels are resampled as one map, before masks are split."""
    img = image.astype(np.float64)
    for axis, n_new in enumerate(size):
        n = img.shape[axis]
        if n_new == n:
            continue
        centre = (np.arange(n_new) + 0.5) * (n / n_new)  # output pixel centres, source pixels
        labels = np.take(labels, np.minimum(np.floor(centre).astype(np.int64), n - 1), axis)
        src = np.clip(centre - 0.5, 0, n - 1)
        i0 = np.floor(src).astype(np.int64)
        w = (src - i0).reshape((-1, 1) if axis == 0 else (1, -1))
        img = np.take(img, i0, axis) * (1 - w) + np.take(img, np.minimum(i0 + 1, n - 1), axis) * w
    return np.round(img).clip(0, 255).astype(np.uint8), labels


@functools.lru_cache(maxsize=1)  # per process: the last case read, shared by that case's units
def _read_case_volume(image_path: Path, label_path: Path, window, max_labels: int):
    """-> (uint8 image volume, int32 label volume, spacing (3,) mm, a note), checked."""
    vol, lab = data.read_volume(image_path), data.read_volume(label_path)
    if vol.data.shape != lab.data.shape:
        raise DataError(
            f"{label_path}: shape {lab.data.shape} does not match image {image_path} "
            f"{vol.data.shape}"
        )
    if not np.allclose(vol.affine, lab.affine, atol=1e-3):
        d = np.abs(vol.affine - lab.affine).max()
        raise DataError(f"{label_path}: affine differs from image {image_path}'s (by {d:.3g})")
    check_labels(lab.data, label_path)
    if np.array_equal(vol.data, lab.data):
        raise DataError(f"{label_path}: identical to its image {image_path}: an intensity "
                        "volume, not a label map")  # fmt: skip
    labels = lab.data.astype(np.int64)
    top = int(labels.max(initial=0))
    values, counts = (np.arange(top + 1), np.bincount(labels.ravel())) if top < 2**16 else (
        np.unique(labels, return_counts=True))  # fmt: skip
    present = [(int(v), int(c)) for v, c in zip(values, counts, strict=True) if v > 0 and c]
    if len(present) > max_labels:
        raise DataError(f"{label_path}: {len(present)} distinct labels: an intensity volume, not "
                        f"a label map (at most --max-labels {max_labels})")  # fmt: skip
    lo, hi = data.intensity_range(vol.data, window)
    how = "percentiles 0.5-99.5 of non-zero voxels" if window is None else "CT window"
    name = f" {window}" if isinstance(window, str) else ""
    spacing = np.sqrt((vol.affine[:3, :3] ** 2).sum(0))  # mm along canonical x, y, z
    shown = ", ".join(f"{v}: {c}" for v, c in present[:10]) + (", ..." if present[10:] else "")
    note = (f"{'x'.join(map(str, vol.data.shape))} voxels, spacing "
            f"{' x '.join(f'{v:.2f}' for v in spacing)} mm (RAS), intensity {how}{name} -> "
            f"[{lo:g}, {hi:g}] mapped to 0-255; label voxels {{{shown}}}")  # fmt: skip
    return data.scale_to_uint8(vol.data, lo, hi), labels.astype(np.int32), spacing, note


def _volume_unit(case: Case, cfg: DataConfig, axis: str, part: int, parts: int):
    image, labels, spacing, note = _read_case_volume(*case.pairs[0], cfg.window, cfg.max_labels)
    plans = {a: axis_plan(spacing, labels.shape, a, cfg) for a in cfg.axes}
    if all(p["action"] == "skipped" for p in plans.values()):
        raise DataError(
            f"{case.pairs[0][0]}: every slice axis asked for ({', '.join(cfg.axes)}) has pixels "
            f"more elongated than --max-anisotropy {cfg.max_anisotropy:g} (spacing "
            f"{' x '.join(f'{v:.2f}' for v in spacing)} mm); ask for --axes z or raise the limit"
        )
    plan, entries, dropped = plans[axis], [], 0
    ks = np.array_split(np.arange(labels.shape["xyz".index(axis)]), parts)[part]
    for k in ks if plan["action"] != "skipped" else ():
        lab = data.volume_slice(labels, axis, k)  # (H, W)
        if not lab.any():
            continue
        img = data.volume_slice(image, axis, k)  # (H, W)
        if plan["action"] == "resampled":
            img, lab = resample_slice(img, lab, plan["size"])  # (H', W')
        masks, n = _slice_masks(lab, cfg)
        dropped += n
        if masks:
            name = _image_name(cfg, case, f"{axis}_{k:04d}")
            entries.append(_write_slice(Path(cfg.out), name, img, masks))
    return entries, dict(note=note, axis=axis, plan=plan, dropped=dropped)


def _images_unit(case: Case, cfg: DataConfig):
    """2D: every image of the case with its mask or label map (0/1 and 0/255 are one label, 1)."""
    entries, names, dropped = [], set(), 0
    for image_path, mask_path in case.pairs:
        image = data.read_image(image_path)  # (H, W, 3)
        lab = read_label_map(mask_path, image.shape[:2], image_path)  # (H, W)
        if is_binary(lab):
            lab = (lab > 0).astype(np.int64)
        name = _image_name(cfg, case, _clean(stem(image_path)))
        if name in names:
            raise DataError(f"{image_path}: output name {name} is already used in case {case.name}")
        names.add(name)
        n_labels = len(np.unique(lab)) - 1
        grey = (image[..., :1] == image).all()
        if n_labels > cfg.max_labels or (
            n_labels > 1 and grey and np.array_equal(lab, image[..., 0])
        ):
            why = "identical to its image" if n_labels <= cfg.max_labels else (
                f"{n_labels} distinct labels (at most --max-labels {cfg.max_labels})")  # fmt: skip
            raise DataError(f"{mask_path}: {why}: an intensity image, not a label map")
        masks, n = _slice_masks(lab, cfg)
        dropped += n
        if masks:
            entries.append(
                _write_slice(Path(cfg.out), name, image[..., 0] if grey else image, masks)
            )
    note = f"{len(case.pairs)} 2D images (8-bit kept; 16-bit/float scaled min-max)"
    return entries, dict(note=note, axis="2d", plan=None, dropped=dropped)


def _run_unit(cfg: DataConfig, case: Case, axis: str, part: int, parts: int):
    """-> the unit's (entries, note), or the DataError it met: returned rather than raised, so
    that results come back from a pool worker and from this process alike."""
    try:
        if cfg.kind == "volumes":
            return _volume_unit(case, cfg, axis, part, parts)
        return _images_unit(case, cfg)
    except DataError as e:
        return e


def _units(cases: list[Case], cfg: DataConfig) -> list[tuple]:
    if cfg.kind == "images":
        return [(c, "2d", 0, 1) for c in cases]
    parts = 1 if cfg.workers == 1 else 2 * cfg.workers  # several workers can share one volume
    return [(c, axis, k, parts) for c in cases for axis in cfg.axes for k in range(parts)]


def _unit_results(units, cfg: DataConfig):
    """Yield (unit index, result or DataError) as units finish: in this process for one worker,
    else in a process pool (forked, like DataLoader workers; single-threaded CPU torch only)."""
    if cfg.workers == 1:
        for j, u in enumerate(units):
            yield j, _run_unit(cfg, *u)
        return
    fork = "fork" in multiprocessing.get_all_start_methods()
    if fork and cfg.kind == "volumes" and len({id(u[0]) for u in units}) == 1:
        try:  # one volume: read it once here; forked workers share it instead of each reading it
            _read_case_volume(*units[0][0].pairs[0], cfg.window, cfg.max_labels)
        except DataError:
            pass  # every unit meets the same error and reports it
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    pool = ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(os.getpid(),))  # fmt: skip
    try:
        futures = {pool.submit(_run_unit, cfg, *u): j for j, u in enumerate(units)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()
    except BaseException:  # Ctrl-C, an error, the consumer stopping: stop the units now
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()  # their outputs are atomic; the case records are the parent's
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(parent: int) -> None:
    """A pool worker: one torch thread; Ctrl-C (sent to the whole process group by a terminal)
    is the parent's to handle; and it dies with its parent, however the parent ends (SIGKILL
    included): Linux sends it SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG), elsewhere
    a thread watches the parent's pid."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PDEATHSIG
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _fingerprint(cfg: DataConfig, case: Case) -> dict:
    """What a case's outputs depend on; a rerun with other options must not mix results."""
    return dict(
        kind=cfg.kind, modality=cfg.modality, dataset=cfg.dataset, axes=list(cfg.axes),
        window=cfg.window if not isinstance(cfg.window, tuple) else list(cfg.window),
        instances=cfg.instances, min_area=cfg.min_area, resample=cfg.resample,
        max_anisotropy=cfg.max_anisotropy if np.isfinite(cfg.max_anisotropy) else 0,
        sources=[[str(a.name), str(b.name)] for a, b in case.pairs],
    )  # fmt: skip


def _is_complete(out: Path, case: Case, cfg: DataConfig) -> bool:
    path = out / "cases" / f"{case.name}.json"
    if not path.is_file():
        return False
    record = read_json(path)
    if record.get("fingerprint") != _fingerprint(cfg, case):
        raise DataError(f"{path}: made with other options or inputs; use a new --out")
    return all((out / f).is_file() for img, ms in record["images"] for f in [img, *ms])


def _process(cases: list[Case], cfg: DataConfig, out: Path) -> tuple[int, dict[str, str]]:
    """Run every unit of `cases`; write each case's record when its last unit is done.
    -> (number of slices written, {case: error} for bad cases when skipping them)."""
    _read_case_volume.cache_clear()  # inputs may have changed since an earlier run
    try:
        return _process_units(_units(cases, cfg), cases, cfg, out)
    finally:
        _read_case_volume.cache_clear()  # a big CT should not stay in memory after the run


def _process_units(units, cases, cfg: DataConfig, out: Path) -> tuple[int, dict[str, str]]:
    done: dict[str, dict] = {c.name: {} for c in cases}  # case -> {unit index: (entries, note)}
    need = {c.name: sum(u[0].name == c.name for u in units) for c in cases}
    bad, n_slices = {}, 0
    bar = tqdm(total=len(units), unit="part", desc="preprocess", dynamic_ncols=True)
    with bar:  # closed on the way out, also by an error or Ctrl-C: the message stays the last line
        for j, res in _unit_results(units, cfg):
            bar.update(1)
            case = units[j][0]
            if isinstance(res, DataError):
                if not cfg.skip_bad:
                    raise res
                bad.setdefault(case.name, str(res))
                continue
            done[case.name][j] = res
            if len(done[case.name]) == need[case.name] and case.name not in bad:
                parts = [res for _, res in sorted(done.pop(case.name).items())]
                record = _case_record(case, cfg, parts)
                write_json(out / "cases" / f"{case.name}.json", record)
                n_slices += len(record["images"])
                bar.write(record["note"])
    return n_slices, bad


def _case_record(case: Case, cfg: DataConfig, parts: list) -> dict:
    """A finished case's record: its slices, the pairing, what was done per axis, and the printed
    note (one block per case)."""
    images = [[img, ms] for entries, _ in parts for img, ms in entries]
    plans = {info["axis"]: info["plan"] for _, info in parts if info["plan"]}
    lines = [f"{case.name}: {parts[0][1]['note']}"]
    lines += [f"  {axis}: {plan_text(plan, cfg)}" for axis, plan in plans.items()]
    n_masks = sum(len(ms) for _, ms in images)
    dropped = sum(info["dropped"] for _, info in parts)
    lines.append(f"  {len(images)} slices, {n_masks} masks written, {dropped} below the min area")
    pairs = [[str(a), str(b)] for a, b in case.pairs]
    return dict(case=case.name, fingerprint=_fingerprint(cfg, case), note="\n".join(lines),
                pairing=dict(rule=case.rule, pairs=pairs), axes=plans, images=images)  # fmt: skip


def _axis_totals(out: Path, cases: list[Case]) -> str:
    """-> "z: 3 kept; x: 3 skipped" over the recorded cases, so that skipped axes are never
    silent."""
    totals: dict[str, dict[str, int]] = {}
    for case in cases:
        path = out / "cases" / f"{case.name}.json"
        for axis, plan in (read_json(path).get("axes", {}) if path.is_file() else {}).items():
            counts = totals.setdefault(axis, {})
            counts[plan["action"]] = counts.get(plan["action"], 0) + 1
    return "; ".join(f"{a}: " + ", ".join(f"{n} {k}" for k, n in c.items())
                     for a, c in sorted(totals.items()))  # fmt: skip


def _warn_empty_splits(splits: dict[str, str], fractions) -> None:
    """Build time is when an empty split can still be fixed cheaply: say which, why, what to do."""
    n, total = len(splits), sum(fractions)
    use = dict(train="train.py has nothing to train on", val="train.py validates on it (or "
               "train with --val-every 0)", test="infer.py --eval scores it")  # fmt: skip
    for name, f in zip(SPLITS, fractions, strict=True):
        if f > 0 and name not in splits.values():
            print(f"warning: the {name} split is empty ({n} cases x {f / total:.2g} rounds to "
                  f"0); {use[name]}. Use more cases or other --split fractions, e.g. --split "
                  "0.34 0.33 0.33")  # fmt: skip


def write_manifests(out: Path, cases: list[Case], splits: dict[str, str]) -> int:
    """Both manifest directions for every split, from the records of the completed cases.
    -> the number of cases without a record (bad, or left to other shards)."""
    i2l: dict[str, dict] = {s: {} for s in SPLITS}
    missing = 0
    for case in cases:
        path = out / "cases" / f"{case.name}.json"
        if not path.is_file():
            missing += 1
            continue
        for img, masks in read_json(path)["images"]:
            i2l[splits[case.name]][img] = masks
    for s in SPLITS:
        write_json(out / f"image2label_{s}.json", i2l[s])
        write_json(out / f"label2image_{s}.json", {m: i for i, ms in i2l[s].items() for m in ms})
    return missing


def _check(cfg: DataConfig) -> None:
    if cfg.kind not in ("volumes", "images"):
        raise ValueError(f"kind must be 'volumes' or 'images', got {cfg.kind!r}")
    if not cfg.axes or not set(cfg.axes) <= {"x", "y", "z"}:
        raise ValueError(f"axes must be some of x, y, z; got {cfg.axes}")
    i, n = cfg.shard
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
    if len(cfg.split) != 3 or min(cfg.split) < 0 or sum(cfg.split) <= 0:
        raise ValueError(f"split must be three non-negative fractions, got {cfg.split}")
    data.intensity_range(np.zeros(1), cfg.window)  # an unknown preset fails here, before any work
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, got {cfg.workers}")


def run(cfg: DataConfig) -> dict:
    """Preprocess cfg.images/cfg.labels into cfg.out; returns a summary."""
    _check(cfg)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    cases = find_cases(cfg)
    if not cases:
        raise DataError(f"{cfg.images}: no {cfg.kind} found")
    splits = split_cases([c.name for c in cases], cfg.split, cfg.seed)
    _warn_empty_splits(splits, cfg.split)
    i, n = cfg.shard
    mine = cases[i::n]
    for d in ("images", "masks", "cases"):
        (out / d).mkdir(parents=True, exist_ok=True)
    if n == 1:  # alone on this output: leftovers of a killed run can go
        for tmp in [*out.glob(".*.tmp*"), *out.glob("*/.*.tmp*")]:
            tmp.unlink(missing_ok=True)
    bad = {c.name: c.error for c in mine if c.error}
    if bad and not cfg.skip_bad:
        raise DataError(next(iter(bad.values())))
    todo = [c for c in mine if not c.error and not _is_complete(out, c, cfg)]
    print(f"{len(mine)} cases in shard {i}/{n}: {len(mine) - len(todo) - len(bad)} complete, "
          f"{len(todo)} to do, {len(bad)} bad")  # fmt: skip
    n_slices, more_bad = _process(todo, cfg, out)
    bad.update(more_bad)
    missing = write_manifests(out, cases, splits)
    seconds = time.perf_counter() - t0
    print(f"{n_slices} slices in {seconds:.1f} s; manifests cover {len(cases) - missing} of "
          f"{len(cases)} cases")  # fmt: skip
    if cfg.kind == "volumes":
        print(f"slice axes over the recorded cases: {_axis_totals(out, mine)}")
    if bad:
        print(f"skipped {len(bad)} bad cases:")
        for msg in bad.values():
            print(f"  {msg}")
    return dict(slices=n_slices, seconds=seconds, skipped=sorted(bad.values()), missing=missing)


# ----------------------------------------------------------------------------------------------
# The command line: one flag per DataConfig field (cli.py), `kind` as the first argument


def _shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"takes i/n, e.g. 0/4, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _window(values: tuple):
    """--window NAME or --window LEVEL WIDTH -> a WINDOWS name or (level, width) floats."""
    if len(values) == 1:
        return values[0]
    try:
        level, width = map(float, values)
    except ValueError:
        raise ValueError(f"--window takes a preset name or LEVEL WIDTH, got {values}") from None
    try:
        data.intensity_range(None, (level, width))  # nan, or a width <= 0: refused here
    except ValueError as e:
        raise ValueError(f"--window: {e}") from None
    return level, width


def main(args) -> dict:
    """The command: parsed flags (a namespace, or a dict of DataConfig fields) -> run."""
    values = cli.config_values(DataConfig, args)
    if isinstance(values.get("window"), tuple):
        values["window"] = _window(values["window"])
    return run(DataConfig(**values))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build SA-Med2D-20M style 2D data from 3D or 2D data")
    p.add_argument("kind", choices=["volumes", "images"], help="3D NIfTI volumes or 2D images")
    notes = cli.field_comments(DataConfig)
    required = {k: dict(required=True, help=notes[k]) for k in ("images", "out")}
    shard_help = "i/n: this job's share of the cases, 0-based (default: 0/1)"
    windows = f"CT window: a preset ({', '.join(WINDOWS)}) or LEVEL WIDTH"
    cli.add_config_args(
        p,
        DataConfig,
        skip=("kind",),
        **required,
        axes=dict(choices=["x", "y", "z"]),
        window=dict(nargs="+", help=f"{windows}; default: 0.5-99.5 percentiles of non-zero voxels"),
        split=dict(nargs=3, metavar=("TRAIN", "VAL", "TEST")),
        shard=dict(type=_shard, nargs=None, metavar="I/N", help=shard_help),
    )
    return p


def command(argv=None) -> None:
    """Parse the command line and run it; errors are one line on stderr (cli.main_guard)."""
    p = parser()
    cli.main_guard(main, p.parse_args(argv), p.prog)


if __name__ == "__main__":
    command()
