"""The files of `python infer.py`: what it reads besides the image (prompt JSON, NIfTI options)
and what it writes (mask PNG or NIfTI label volume, overlay PNG, JSON record; a folder of them
with a summary; the evaluation's results). infer.py holds the segmenting and the evaluation; this
module turns a command line or a prompt file into jobs, runs them through infer.segment, and
writes the results.

Everything a user can get wrong is checked before the model loads: the prompts (against the
image or slice they are for), the slices, the window, and the outputs (distinct files, none of
them an input, writable folders, no existing file without --force). A job's outputs are one
files.OutputSet: temp files first, renamed together at the end, so a failed, interrupted or
concurrent run never leaves a mixed or half-written set.

Errors name the file (and the prompt-file entry) they come from: infer.segment's errors say
what is wrong with a prompt, and this layer adds where it was given. In folder mode a bad file
is reported and skipped, and listed in summary.json.
"""

import csv
import io
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import cli
import data
import files
import infer
import volume
from infer import InferConfig, Prompt

PALETTE = [(64, 128, 255), (255, 160, 0), (220, 64, 220), (0, 200, 200), (150, 100, 40),
           (140, 90, 255)]  # fmt: skip  # mask tints: none is the box's or the points' colour
BOX_COLOUR = (255, 255, 255)  # box outlines: white, unlike every mask tint
POINT_COLOURS = {1: (0, 255, 0), 0: (255, 0, 0)}  # foreground green, background red
DISPLAY_SIDE = 512  # overlays of smaller images are enlarged (whole pixels) to at least this long
IOU_NOTE = (
    "the decoder's own estimate, used to pick the best of its 3 candidate masks; uncalibrated: "
    "not a measure of how right the mask is"
)

# ------------------------------------------------------------------------------------------------
# Prompt files and jobs: what to segment in which file
# ------------------------------------------------------------------------------------------------


def _numbers(values) -> list:
    """JSON numbers as floats; strings ("10") and booleans (true) are refused, not converted."""
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise TypeError
    return [float(v) for v in values]


def parse_window(w):
    """A CT window from the command line (["lung"], ["40", "400"]) or JSON ("lung", [40, 400])
    -> a data.WINDOWS name or (level, width) floats, finite with width > 0; None stays None
    (percentiles)."""
    if isinstance(w, list | tuple) and len(w) == 1:
        w = w[0]
    if w is None or (isinstance(w, str) and w in data.WINDOWS):
        return w
    try:
        if isinstance(w, str) or any(isinstance(v, bool) for v in w):
            raise TypeError
        level, width = (float(v) for v in w)
    except (TypeError, ValueError):
        raise ValueError(
            f"window is one of {', '.join(data.WINDOWS)} or LEVEL WIDTH, not {w!r}"
        ) from None
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        raise ValueError(f"window LEVEL WIDTH must be finite with WIDTH > 0, not {w!r}")
    return level, width


def parse_prompt(obj) -> Prompt:
    """A prompt from its JSON form {"box": [...], "points": [[x, y], ...], "labels": [...]}."""
    if not isinstance(obj, dict) or not set(obj) <= {"box", "points", "labels"} or not obj:
        raise ValueError(
            "a prompt is {'box': [x0,y0,x1,y1], 'points': [[x,y],...], 'labels': [1|0,...]}, "
            f"got {obj!r}"
        )
    box, points = obj.get("box"), obj.get("points", [])
    if box is not None and (not isinstance(box, list) or len(box) != 4):
        raise ValueError(f"box must be [x0, y0, x1, y1], got {box!r}")
    if not isinstance(points, list) or any(not isinstance(p, list) or len(p) != 2 for p in points):
        raise ValueError(f"points must be [[x, y], ...], got {points!r}")
    labels = obj.get("labels", [1] * len(points))
    if not isinstance(labels, list) or len(labels) != len(points):
        raise ValueError("labels must be a list with one label per point")
    if any(isinstance(lab, bool) or lab not in (0, 1) for lab in labels):
        raise ValueError("point labels are 1 (foreground) or 0 (background)")
    try:
        box = None if box is None else _numbers(box)
        points = [_numbers(p) for p in points]
    except TypeError:
        raise ValueError(f"coordinates must be numbers, got {obj!r}") from None
    return Prompt(box, points, [int(v) for v in labels])


@dataclass
class Job:
    """One input file and what to segment in it (from the command line or a --prompts entry)."""

    path: Path
    prompts: list  # [Prompt]; coordinates in the (slice) image's pixels
    slice: int | None = None  # NIfTI: the slice index along `axis`
    axis: str = "z"  # x sagittal, y coronal, z axial (of the canonical RAS+ volume)
    box3d: list | None = None  # NIfTI: [x0, y0, z0, x1, y1, z1]; x1, y1, z1 exclusive
    window: object = None  # NIfTI intensity: CT preset name or (level, width); None: percentiles
    propagate: object = None  # NIfTI: a volume.PropagateConfig to follow the boxes through slices
    anchors: list | None = None  # --propagate: [[K, x0, y0, x1, y1], ...] boxes that re-anchor


def parse_entry(path: Path, entry, defaults: dict | None = None) -> Job:
    """A --prompts entry: a list of prompts, or {"prompts": [...], "slice", "axis", "box3d",
    "window"} for NIfTI volumes. Keys it lacks come from `defaults` (the command line's); slice
    and box3d are alternatives, so a default of either applies only when the entry has neither."""
    if isinstance(entry, list):
        entry = {"prompts": entry}
    keys = {"prompts", "slice", "axis", "box3d", "window"}
    if not isinstance(entry, dict) or not set(entry) <= keys:
        raise ValueError(f"an entry is a list of prompts or a dict with keys {sorted(keys)}")
    if is_nifti(path):  # the command line's NIfTI options do not apply to 2D files
        given = {k: v for k, v in (defaults or {}).items() if v is not None}
        if "slice" in entry or "box3d" in entry:
            given = {k: v for k, v in given.items() if k not in ("slice", "box3d")}
        entry = {**given, **entry}
    elif set(entry) & {"slice", "axis", "box3d", "window"}:
        raise ValueError("slice, axis, box3d and window are for NIfTI volumes")
    if not isinstance(entry.get("prompts", []), list):
        raise ValueError("prompts must be a list of prompts")
    prompts = []
    for i, p in enumerate(entry.get("prompts", [])):
        try:
            prompts.append(parse_prompt(p))
        except ValueError as err:
            raise ValueError(f"prompt {i}: {err}") from None
    get = entry.get
    job = Job(path, prompts, get("slice"), get("axis", "z"), get("box3d"), get("window"))
    if job.axis not in data.AXES:
        raise ValueError(f"axis must be x, y or z, not {job.axis!r}")
    if job.slice is not None and (not isinstance(job.slice, int) or isinstance(job.slice, bool)):
        raise ValueError(f"slice must be a whole number, not {job.slice!r}")
    job.window = parse_window(job.window)
    b3 = job.box3d
    if b3 is not None:
        try:
            job.box3d = _numbers(b3) if isinstance(b3, list) and len(b3) == 6 else None
        except TypeError:
            job.box3d = None
        if job.box3d is None or prompts or job.slice is not None:
            raise ValueError(
                "box3d is [x0, y0, z0, x1, y1, z1] and replaces other prompts and the slice"
            )
    return job


def is_nifti(path) -> bool:
    return str(path).lower().endswith(files.VOLUME_SUFFIXES)


def _cli_defaults(args, cfg: InferConfig) -> dict:
    """The NIfTI options of the command line, defaults for --prompts entries that lack them."""
    return {"slice": args.slice, "axis": args.axis, "box3d": args.box3d, "window": cfg.window}


def job_from_args(args, path: Path, cfg: InferConfig) -> Job:
    """The one-file job: a --prompts JSON (a list of prompts), or --box/--point/--neg, where each
    box is one object and points refine the single box they come with (or form one object)."""
    if not is_nifti(path) and (args.slice is not None or args.box3d is not None or cfg.window):
        raise ValueError(f"{path}: --slice, --box3d and --window are for NIfTI volumes")
    if args.slice is not None and args.box3d is not None:
        raise ValueError("--box3d covers its own slices z0..z1: leave out --slice")
    if args.prompts:
        entry = files.read_json(args.prompts)
        if args.box or args.point or args.neg:
            raise ValueError("give the prompts either in --prompts or as --box/--point/--neg")
        try:
            return parse_entry(path, entry, _cli_defaults(args, cfg))
        except ValueError as err:
            raise ValueError(f"{args.prompts}: {err}") from None
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
    if args.box3d is None and not prompts:
        raise ValueError(f"{path}: no prompts (give --box, --point/--neg, --box3d or --prompts)")
    job = Job(path, prompts, args.slice, args.axis, args.box3d, cfg.window)
    if getattr(args, "propagate", False):  # volume.py's flags
        job.propagate = volume.PropagateConfig(**cli.config_values(volume.PropagateConfig, args))
        job.anchors = args.anchor
    return job


# ------------------------------------------------------------------------------------------------
# Reading a job's input and checking its prompts: all before the model loads
# ------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """A job's input, read and checked against its prompts."""

    job: Job
    prompts: list  # [Prompt], checked against the image (each slice)
    slices: list  # NIfTI: the slice indices along job.axis; [None] for a 2D image
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB: a 2D input
    volume: np.ndarray | None = None  # (X, Y, Z) uint8 canonical RAS+: a NIfTI input

    def frame(self, k) -> np.ndarray:
        """The (H, W, 3) uint8 image of slice k (None: the 2D image)."""
        if k is None:
            return self.image
        gray = data.volume_slice(self.volume, self.job.axis, k)  # (H, W)
        return np.repeat(gray[..., None], 3, axis=2)  # (H, W, 3)


def read_source(job: Job) -> Source:
    """Read the job's file and check its prompts and slices against it."""
    if is_nifti(job.path):
        vol = data.read_volume(job.path)
        u8 = data.normalize_intensity(vol.data, job.window)  # (X, Y, Z) uint8
        ks, prompts = _job_slices(job, u8.shape[data.AXES[job.axis]])
        src = Source(job, prompts, list(ks), volume=u8)
        where = f"{job.path} ({job.axis} slices)"
    else:
        if job.propagate is not None:
            raise ValueError(f"{job.path}: --propagate follows a structure through a NIfTI volume")
        src = Source(job, job.prompts, [None], image=data.read_image(job.path))
        where = str(job.path)
    try:
        infer.check_prompts(src.prompts, src.frame(src.slices[0]).shape[:2])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return src


def _job_slices(job: Job, n: int) -> tuple:
    """The slice indices a NIfTI job covers, and its prompts. box3d's z1 is exclusive, like x1
    and y1: it covers slices z0 <= k < z1."""
    if job.box3d is not None:
        x0, y0, z0, x1, y1, z1 = job.box3d
        if not (0 <= z0 < z1 <= n and float(z0).is_integer() and float(z1).is_integer()):
            raise ValueError(
                f"{job.path}: box3d z0 {z0:g}, z1 {z1:g} must be whole slice numbers with "
                f"0 <= z0 < z1 <= {n} along {job.axis} (z1 exclusive, like x1 and y1)"
            )
        return range(int(z0), int(z1)), [Prompt(box=[x0, y0, x1, y1])]
    if job.slice is None:
        raise ValueError(
            f"{job.path}: a NIfTI volume needs --slice K (with --box/--point) or --box3d"
        )
    if not 0 <= job.slice < n:
        raise ValueError(f"{job.path}: slice {job.slice} is outside 0..{n - 1} along {job.axis}")
    return [job.slice], job.prompts


# ------------------------------------------------------------------------------------------------
# Output files: the mask (PNG or NIfTI label volume), the overlay, the JSON record
# ------------------------------------------------------------------------------------------------


def check_outputs(paths, force: bool, inputs=()) -> None:
    """Before any work: the outputs must be distinct files, none of them one of `inputs` (never
    written over, even with --force), each in a folder this process can create files in; an
    existing output is refused unless --force."""
    paths = [Path(p) for p in paths if p is not None]
    seen = {}
    for p in paths:
        other = seen.setdefault(os.path.realpath(p), p)
        if other is not p:
            raise ValueError(f"two outputs are the same file: {other} and {p}")
    ins = [Path(i) for i in inputs if i is not None and Path(i).exists()]
    for p in paths:
        hit = [i for i in ins if os.path.realpath(i) == os.path.realpath(p)]
        hit += [i for i in ins if p.exists() and not hit and os.path.samefile(i, p)]
        if hit:
            raise ValueError(f"output {p} is the input {hit[0]}: refusing to write over an input")
    exists = [str(p) for p in paths if p.exists()]
    if exists and not force:
        raise FileExistsError(f"output exists: {', '.join(exists[:5])} (use --force to overwrite)")
    for p in paths:
        _check_writable(p)


def _check_writable(path: Path) -> None:
    """Create (and remove) a probe file in the nearest existing folder of `path`."""
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"output {path}: {folder} is a file, not a folder")
    probe = folder / f".{path.name}.{os.getpid()}.probe"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"output {path}: cannot write in {folder} ({err.strerror})") from None


def mask_image(ids: np.ndarray, n_prompts: int) -> np.ndarray:
    """The mask PNG: 0/255 for one prompt (visible in any viewer); the label map for several."""
    return ids * np.uint8(255) if n_prompts == 1 else ids


def display_scale(hw: tuple) -> int:
    """Whole-pixel enlargement of a small image's overlay: its longer side to DISPLAY_SIDE."""
    return max(1, math.ceil(DISPLAY_SIDE / max(hw)))


def overlay(image: np.ndarray, ids: np.ndarray, prompts: list, alpha: float) -> np.ndarray:
    """The image with each prompt's mask tinted in its colour, boxes outlined in BOX_COLOUR,
    points drawn (green foreground, red background); small images are enlarged by
    display_scale (nearest, so pixels stay sharp). ids: (H, W) label map, i+1 for prompt i."""
    P = len(prompts)
    colours = np.array([(0, 0, 0)] + [PALETTE[i % len(PALETTE)] for i in range(P)], np.float32)
    out = image.astype(np.float32)  # (H, W, 3)
    m = ids > 0
    out[m] = (1 - alpha) * out[m] + alpha * colours[ids[m]]
    k = display_scale(image.shape[:2])
    out = out.round().astype(np.uint8).repeat(k, 0).repeat(k, 1)  # (kH, kW, 3)
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    r = max(2, round(min(out.shape[:2]) / 100))  # marker radius grows with the image
    for p in prompts:
        if p.box is not None:  # box edges x0..x1 (exclusive): the outermost pixels it covers
            x0, y0, x1, y1 = (v * k for v in p.box)
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_COLOUR, width=max(1, r // 2))
        for (x, y), lab in zip(p.points, p.labels, strict=True):
            cx, cy = (x + 0.5) * k, (y + 0.5) * k  # the centre of the pixel the point is in
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=POINT_COLOURS[lab],
                         outline=(255, 255, 255))  # fmt: skip
    return np.asarray(pil)


def write_nifti(out: files.OutputSet, path: Path, canonical: np.ndarray, source: Path) -> None:
    """A label volume computed on the canonical (RAS+) grid, written in the source file's own
    voxel order, shape (an (X, Y, Z, 1) input stays 4D), affine and header, so it overlays the
    input in any viewer."""
    src = nib.load(str(source))
    back = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.io_orientation(src.affine)
    )
    arr = nib.orientations.apply_orientation(canonical, back).reshape(src.shape)
    header = src.header.copy()
    header.set_data_dtype(arr.dtype)
    img = nib.Nifti1Image(arr, src.affine, header)
    img.header.set_slope_inter(1, 0)
    out.write(path, lambda tmp: nib.save(img, tmp))


def run_job(sam, src: Source, outs: dict, cfg: InferConfig) -> dict:
    """Segment one checked input and write its outputs as one set: outs = {"mask", "overlay" (or
    None), "json" (or None)}. Returns the record that goes into the JSON; its "warnings" (empty
    masks) are for the caller to print."""
    t0 = time.perf_counter()
    job, P = src.job, len(src.prompts)
    if job.propagate is not None:  # one box, the whole structure: volume.py
        return _run_propagation(sam, src, outs, cfg, t0)
    H, W = src.frame(src.slices[0]).shape[:2]
    canvas = (
        None
        if src.volume is None
        else np.zeros(src.volume.shape, np.uint16 if P > 255 else np.uint8)
    )
    areas, empty_slices, per_slice = np.zeros(P, np.int64), np.zeros(P, np.int64), []
    timings = {"encode": 0.0, "decode": 0.0, "masks": 0.0}
    mid = src.slices[len(src.slices) // 2]  # the slice the overlay shows
    for k in tqdm(src.slices, "slices", unit="slice", disable=len(src.slices) == 1):
        image = src.frame(k)
        where = job.path if k is None else f"{job.path} slice {k}"
        seg = _segment(sam, image, src.prompts, cfg, where)
        t1 = time.perf_counter()
        ids, area = seg.label_map()  # (H, W), (P,)
        timings = {t: timings[t] + seg.timings.get(t, 0.0) for t in timings}
        timings["masks"] += time.perf_counter() - t1
        areas += area
        empty_slices += area == 0
        if canvas is not None:
            data.put_slice(canvas, job.axis, k, ids)
            per_slice.append({"slice": k, "predicted_iou": seg.iou.tolist(), "area_px": area})
        if k == mid:
            shown, iou = (image, ids), seg.iou
    with files.OutputSet(overwrite=cfg.force) as out:
        if canvas is None:
            out.write_png(outs["mask"], mask_image(shown[1], P))
            record = {"predicted_iou": iou.tolist(), "area_px": areas}
        else:
            write_nifti(out, outs["mask"], canvas, job.path)
            record = {"axis": job.axis, "slices": per_slice, "overlay_slice": mid,
                      "area_px": areas, "label_ids": "voxel value i+1 = prompt i"}  # fmt: skip
        if outs.get("overlay") is not None:
            out.write_png(outs["overlay"], overlay(*shown, src.prompts, cfg.overlay_alpha))
        record = {
            "input": str(job.path),
            "height": int(H),
            "width": int(W),
            "checkpoint": cfg.checkpoint,
            "multimask": cfg.multimask,
            "precision": cfg.dtype,  # what ran: infer.load_model resolves "auto"
            "threads": torch.get_num_threads(),
            "prompts": [asdict(p) for p in src.prompts],
            **record,
            "predicted_iou_note": IOU_NOTE,
            "overlay_scale": display_scale((H, W)),
            "warnings": _empty_warnings(job, areas, empty_slices, len(src.slices)),
            "outputs": {k: None if v is None else str(v) for k, v in outs.items()},
            "timings_s": {**timings, "total": time.perf_counter() - t0},
        }
        if outs.get("json") is not None:
            out.write_json(outs["json"], record)
        out.commit()
    return record


def _empty_warnings(job: Job, areas, empty_slices, n_slices: int) -> list:
    """A line per prompt whose mask is empty (everywhere), or empty on some of a box3d's slices."""
    lines = []
    for i, (a, e) in enumerate(zip(areas.tolist(), empty_slices.tolist(), strict=True)):
        if a == 0:
            lines.append(f"{job.path}: prompt {i} gave an empty mask")
        elif e and n_slices > 1:
            lines.append(f"{job.path}: prompt {i} gave an empty mask on {e} of {n_slices} slices")
    return lines


def _segment(sam, image, prompts, cfg: InferConfig, where) -> infer.Segmentation:
    """infer.segment, its errors (a box outside the image, ...) prefixed with where they occur."""
    try:
        return infer.segment(sam, image, prompts, multimask=cfg.multimask)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _run_propagation(sam, src: Source, outs: dict, cfg: InferConfig, t0: float) -> dict:
    """--propagate: volume.py follows each box through the slices; the outputs as one set."""
    job = src.job
    labels, record, image, ids, prompts = volume.propagate_job(sam, job, src.volume, cfg.multimask)
    H, W = image.shape[:2]
    with files.OutputSet(overwrite=cfg.force) as out:
        write_nifti(out, outs["mask"], labels, job.path)
        if outs.get("overlay") is not None:
            out.write_png(outs["overlay"], overlay(image, ids, prompts, cfg.overlay_alpha))
        record = {"input": str(job.path), "height": int(H), "width": int(W),
                  "checkpoint": cfg.checkpoint, "multimask": cfg.multimask,
                  "precision": cfg.dtype, "threads": torch.get_num_threads(), **record,
                  "area_px": np.bincount(labels.ravel(), minlength=len(prompts) + 1)[1:],
                  "overlay_scale": display_scale((H, W)), "warnings": [],
                  "outputs": {k: None if v is None else str(v) for k, v in outs.items()},
                  }  # fmt: skip
        record["timings_s"]["total"] = time.perf_counter() - t0
        if outs.get("json") is not None:
            out.write_json(outs["json"], record)
        out.commit()
    return record


# ------------------------------------------------------------------------------------------------
# The commands: one file, a folder, the evaluation
# ------------------------------------------------------------------------------------------------


def _inputs(args, cfg: InferConfig) -> list:
    """The files a run reads besides its images, which no output may replace."""
    return [args.prompts, args.prompt_file, cfg.checkpoint]


def run_single(args, cfg: InferConfig) -> int:
    path = Path(args.input)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    job = job_from_args(args, path, cfg)
    suffix = ".nii.gz" if is_nifti(path) else ".png"
    mask = Path(args.out or f"{files.stem(path)}_mask{suffix}")
    if is_nifti(mask) != is_nifti(path) or not (is_nifti(mask) or mask.suffix.lower() == ".png"):
        raise ValueError(f"--out {mask}: the mask of {path} is written as {suffix}")
    jpath = Path(args.json) if args.json else mask.with_name(f"{files.stem(mask)}.json")
    outs = {"mask": mask, "overlay": Path(args.overlay) if args.overlay else None, "json": jpath}
    check_outputs(outs.values(), cfg.force, inputs=[path, *_inputs(args, cfg)])
    src = read_source(job)  # the image, its prompts and slices checked before the model loads
    record = run_job(infer.load_model(cfg), src, outs, cfg)
    for line in record["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    written = ", ".join(str(p) for p in outs.values() if p is not None)
    areas = ", ".join(str(a) for a in np.ravel(record["area_px"]))
    print(f"{path}: {len(src.prompts)} prompt(s), mask area {areas} px -> {written}")
    return 0


def folder_outputs(out_dir: Path, name: str, overlays: bool) -> dict:
    """The outputs of input `name` (a path relative to the folder): its whole name, suffix
    included, plus .mask.png|.mask.nii.gz, .overlay.png and .json, so that a.png and a.nii.gz
    (or a.png and a.tif) cannot collide: a.png -> a.png.mask.png, a.png.overlay.png, a.png.json
    under --out-dir (subfolders of the name kept)."""
    base = out_dir / name
    return {
        "mask": Path(f"{base}.mask{'.nii.gz' if is_nifti(name) else '.png'}"),
        "overlay": Path(f"{base}.overlay.png") if overlays else None,
        "json": Path(f"{base}.json"),
    }


def run_folder(args, cfg: InferConfig) -> int:
    """Every file named in --prompts; a bad file is reported and skipped, and listed at the end.
    All prompt entries and every output name are checked before the model loads."""
    root, out_dir = Path(args.input), Path(args.out_dir or "out")
    if not args.prompts:
        raise ValueError(f"{root} is a folder: give --prompts JSON {{file name: prompts}}")
    spec = files.read_json(args.prompts)
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{args.prompts}: expected {{file name: [prompts] or {{...}}}}")
    for name in spec:
        if Path(name).is_absolute() or ".." in Path(name).parts or not Path(name).name:
            raise ValueError(f"{args.prompts}: {name!r} is not a file name inside {root}")
    outs = {name: folder_outputs(out_dir, name, args.overlays) for name in spec}
    summary = out_dir / "summary.json"
    paths = [p for o in outs.values() for p in o.values()] + [summary]
    inputs = [root / name for name in spec] + _inputs(args, cfg)
    check_outputs(paths, cfg.force, inputs=inputs)
    jobs, bad, defaults = {}, [], _cli_defaults(args, cfg)
    for name, entry in spec.items():  # every entry checked before the model loads
        try:
            try:
                job = parse_entry(root / name, entry, defaults)
            except ValueError as err:
                raise ValueError(f"{args.prompts}: {name}: {err}") from None
            if not job.path.is_file():
                raise FileNotFoundError(f"{job.path}: no such file")
            jobs[name] = job
        except (ValueError, OSError) as err:
            bad.append({"file": name, "error": str(err)})
    sam = infer.load_model(cfg) if jobs else None
    for name, job in tqdm(jobs.items(), "segment", unit="file"):
        try:
            record = run_job(sam, read_source(job), outs[name], cfg)
            for line in record["warnings"]:
                tqdm.write(f"warning: {line}", file=sys.stderr)
        except (ValueError, OSError) as err:  # data.DataError is a ValueError
            bad.append({"file": name, "error": str(err)})
    order = {name: i for i, name in enumerate(spec)}
    bad.sort(key=lambda b: order[b["file"]])
    with files.OutputSet(overwrite=cfg.force) as out:
        out.write_json(summary, {"segmented": len(spec) - len(bad), "skipped": bad})
        out.commit()
    print(f"segmented {len(spec) - len(bad)} of {len(spec)} files into {out_dir}")
    for b in bad:
        print(f"  skipped {b['file']}: {b['error']}")
    return 1 if bad else 0


def mode_title(mode) -> str:
    if mode == "box":
        return "Bbox"
    if isinstance(mode, str):  # "3shot": 3 points at once
        return f"{infer.SHOT.fullmatch(mode)[1]} at once"
    return "1 pt" if int(mode) == 1 else f"{int(mode)} pts"


def format_table(results: dict, modes) -> str:
    """A table like the paper's Table 1 with the filled-box baseline (the Dice of the prompt box
    itself, no model: the first sanity check of a Bbox score) as a last column, then Dice per
    dataset, modality and label."""
    keys = [infer.mode_key(m) for m in modes]
    fill = "filled_box" in results
    head = f"{'':28s}" + "".join(f"{mode_title(m):>10s}" for m in modes)
    lines = [head + (f"{'box fill':>10s}" if fill else "") + f"{'masks':>8s}"]

    def cells(res, metric):
        vals = "".join(f"{res[metric][k]:10.4f}" for k in keys)
        return vals + (f"{res['filled_box'][metric]:10.4f}" if fill else "")

    for metric, title in (("dice", "Dice"), ("iou", "IoU")):
        lines.append(f"{title:28s}{cells(results, metric)}{results['n_masks']:8d}")
    for name, groups in results["by"].items():
        lines.append(f"Dice by {name}:")
        for g, res in groups.items():
            lines.append(f"  {g[:26]:26s}{cells(res, 'dice')}{res['n_masks']:8d}")
    return "\n".join(lines)


def write_eval(out_dir: Path, results: dict) -> None:
    """results.json (means and breakdowns), per_mask.csv, prompts.json (for --prompt-file)."""
    summary = {k: v for k, v in results.items() if k not in ("per_mask", "prompts")}
    files.write_json(out_dir / "results.json", summary)
    files.write_json(out_dir / "prompts.json", results["prompts"], indent=None)  # compact
    buf = io.StringIO()
    cols = ["mask", "image", "modality", "dataset", "label", "mode", "dice", "iou", "pred_iou",
            "filled_dice", "filled_iou"]  # fmt: skip
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results["per_mask"])
    files.atomic_write(out_dir / "per_mask.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))


def run_eval(args, cfg: InferConfig) -> int:
    """--eval: infer.evaluate on the dataset, its table printed, results written to --out-dir."""
    out_dir = Path(args.out_dir or "out/eval")
    names = ("results.json", "per_mask.csv", "prompts.json")
    masks = [out_dir / "masks"] if args.save_masks else []
    check_outputs([out_dir / n for n in names] + masks, cfg.force)
    replay = files.read_json(args.prompt_file) if args.prompt_file else None
    results = infer.evaluate(
        infer.load_model(cfg), args.eval, cfg.prompt_modes, seed=cfg.seed, protocol=cfg.protocol,
        no_error_click=cfg.no_error_click, multimask=cfg.multimask, replay=replay, limit=args.limit,
        progress=True, save_dir=out_dir / "masks" if args.save_masks else None, split=args.split,
    )  # fmt: skip
    results["checkpoint"] = cfg.checkpoint
    results["precision"] = cfg.dtype
    write_eval(out_dir, results)
    print(format_table(results, cfg.prompt_modes))
    print(f"wrote {', '.join(str(out_dir / n) for n in names)}")
    return 0
