"""The files of `python infer.py`: what it reads besides the image (prompt JSON, NIfTI options)
and what it writes (mask PNG or NIfTI label volume, overlay PNG, JSON record; a folder of them
with a summary; the evaluation's results). infer.py holds the segmenting and the evaluation; this
module turns a command line or a prompt file into jobs, runs them through infer.segment, and
writes the results atomically (files.py), refusing to overwrite outputs without --force.

Errors name the file (and the prompt-file entry) they come from: infer.segment's errors say
what is wrong with a prompt, and this layer adds where it was given. In folder mode a bad file
is reported and skipped, and listed in summary.json.
"""

import csv
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import files
import infer
from infer import InferConfig, Prompt

AXES = {"x": 0, "y": 1, "z": 2}  # of the canonical RAS+ volume: sagittal, coronal, axial
PALETTE = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255),
           (0, 200, 200)]  # fmt: skip

# ------------------------------------------------------------------------------------------------
# Prompt files and jobs: what to segment in which file
# ------------------------------------------------------------------------------------------------


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
    if any(lab not in (0, 1) for lab in labels):
        raise ValueError("point labels are 1 (foreground) or 0 (background)")
    try:
        box = None if box is None else [float(v) for v in box]
        points = [[float(x), float(y)] for x, y in points]
    except (TypeError, ValueError):
        raise ValueError(f"coordinates must be numbers, got {obj!r}") from None
    return Prompt(box, points, [int(v) for v in labels])


@dataclass
class Job:
    """One input file and what to segment in it (from the command line or a --prompts entry)."""

    path: Path
    prompts: list  # [Prompt]; coordinates in the (slice) image's pixels
    slice: int | None = None  # NIfTI: the slice index along `axis`
    axis: str = "z"  # x sagittal, y coronal, z axial (of the canonical RAS+ volume)
    box3d: list | None = None  # NIfTI: [x0, y0, z0, x1, y1, z1], z = slice indices, inclusive
    window: object = None  # NIfTI intensity: CT preset name or (level, width); None: percentiles


def parse_entry(path: Path, entry, defaults: dict | None = None) -> Job:
    """A --prompts entry: a list of prompts, or {"prompts": [...], "slice", "axis", "box3d",
    "window"} for NIfTI volumes. Keys it lacks come from `defaults` (the command line's)."""
    if isinstance(entry, list):
        entry = {"prompts": entry}
    keys = {"prompts", "slice", "axis", "box3d", "window"}
    if not isinstance(entry, dict) or not set(entry) <= keys:
        raise ValueError(f"an entry is a list of prompts or a dict with keys {sorted(keys)}")
    if is_nifti(path):  # the command line's NIfTI options do not apply to 2D files
        entry = {**{k: v for k, v in (defaults or {}).items() if v is not None}, **entry}
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
    if job.axis not in AXES:
        raise ValueError(f"axis must be x, y or z, not {job.axis!r}")
    if job.slice is not None and (not isinstance(job.slice, int) or isinstance(job.slice, bool)):
        raise ValueError(f"slice must be a whole number, not {job.slice!r}")
    job.window = infer.parse_window(job.window)
    b3 = job.box3d
    six_numbers = (
        isinstance(b3, list) and len(b3) == 6 and all(isinstance(v, int | float) for v in b3)
    )
    if b3 is not None and (prompts or not six_numbers):
        raise ValueError("box3d is [x0, y0, z0, x1, y1, z1] and replaces other prompts")
    return job


def is_nifti(path) -> bool:
    return str(path).lower().endswith(data.VOLUME_SUFFIXES)


def _cli_defaults(args, cfg: InferConfig) -> dict:
    """The NIfTI options of the command line, defaults for --prompts entries that lack them."""
    return {"slice": args.slice, "axis": args.axis, "box3d": args.box3d, "window": cfg.window}


def job_from_args(args, path: Path, cfg: InferConfig) -> Job:
    """The one-file job: a --prompts JSON (a list of prompts), or --box/--point/--neg, where each
    box is one object and points refine the single box they come with (or form one object)."""
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
    return Job(path, prompts, args.slice, args.axis, args.box3d, cfg.window)


# ------------------------------------------------------------------------------------------------
# Output files: the mask (PNG or NIfTI label volume), the overlay, the JSON record
# ------------------------------------------------------------------------------------------------


def check_outputs(paths: list, force: bool) -> None:
    """Refuse, before any work, to overwrite an existing output unless --force."""
    exists = [str(p) for p in paths if p is not None and Path(p).exists()]
    if exists and not force:
        raise FileExistsError(f"output exists: {', '.join(exists[:5])} (use --force to overwrite)")


def label_ids(seg: infer.Segmentation) -> np.ndarray:
    """(H, W) ids: prompt i (from 0) gets id i+1, 0 is background; a pixel claimed by several
    masks goes to the one with the highest logit. uint8, or uint16 beyond 255 prompts."""
    best = np.where(seg.masks, seg.logits, -np.inf).argmax(0)  # (H, W)
    ids = np.where(seg.masks.any(0), best + 1, 0)
    return ids.astype(np.uint8 if len(seg.masks) < 256 else np.uint16)


def mask_image(seg: infer.Segmentation) -> np.ndarray:
    """The mask PNG: 0/255 for one prompt (visible in any viewer); the label map for several."""
    ids = label_ids(seg)
    return ids * np.uint8(255) if len(seg.masks) == 1 else ids


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
    files.atomic_write(path, lambda tmp: nib.save(img, tmp))


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
        seg = _segment(sam, image, job.prompts, cfg, where=job.path)
        ids, prompts = label_ids(seg), job.prompts
        files.write_png(outs["mask"], mask_image(seg))
        record = {"predicted_iou": seg.iou.tolist(), "timings_s": seg.timings}
    if outs.get("overlay") is not None:
        files.write_png(outs["overlay"], overlay(image, ids, prompts, cfg.overlay_alpha))
    record = {
        "input": str(job.path),
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "checkpoint": cfg.checkpoint,
        "multimask": cfg.multimask,
        "precision": cfg.dtype,  # what ran: infer.load_model resolves "auto"
        "prompts": [asdict(p) for p in prompts],
        **record,
        "outputs": {k: None if v is None else str(v) for k, v in outs.items()},
    }
    record["timings_s"]["total"] = time.perf_counter() - t0
    if outs.get("json") is not None:
        files.write_json(outs["json"], record)
    return record


def _segment(sam, image, prompts, cfg: InferConfig, where) -> infer.Segmentation:
    """infer.segment, its errors (a box outside the image, ...) prefixed with where they occur."""
    try:
        return infer.segment(sam, image, prompts, multimask=cfg.multimask)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


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
        seg = _segment(sam, image, prompts, cfg, where=f"{job.path} slice {k}")
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
# The commands: one file, a folder, the evaluation
# ------------------------------------------------------------------------------------------------


def run_single(args, cfg: InferConfig) -> int:
    path = Path(args.input)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    job = job_from_args(args, path, cfg)
    suffix = ".nii.gz" if is_nifti(path) else ".png"
    mask = Path(args.out or f"{data.stem(path)}_mask{suffix}")
    if is_nifti(mask) != is_nifti(path) or not (is_nifti(mask) or mask.suffix.lower() == ".png"):
        raise ValueError(f"--out {mask}: the mask of {path} is written as {suffix}")
    jpath = Path(args.json) if args.json else mask.with_name(f"{data.stem(mask)}.json")
    outs = {"mask": mask, "overlay": Path(args.overlay) if args.overlay else None, "json": jpath}
    check_outputs(list(outs.values()), cfg.force)
    record = run_job(infer.load_model(cfg), job, outs, cfg)
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
    spec = files.read_json(args.prompts)
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{args.prompts}: expected {{file name: [prompts] or {{...}}}}")
    outs = {}
    for name in spec:
        stem = out_dir / data.stem(name)
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
    sam, bad, defaults = infer.load_model(cfg), [], _cli_defaults(args, cfg)
    for name, entry in tqdm(spec.items(), "segment", unit="file"):
        try:
            try:
                job = parse_entry(root / name, entry, defaults)
            except ValueError as err:
                raise ValueError(f"{args.prompts}: {name}: {err}") from None
            if not job.path.is_file():
                raise FileNotFoundError(f"{job.path}: no such file")
            run_job(sam, job, outs[name], cfg)
        except (ValueError, OSError) as err:  # data.DataError is a ValueError
            bad.append({"file": name, "error": str(err)})
            tqdm.write(f"skipped {name}: {err}")
    files.write_json(out_dir / "summary.json", {"segmented": len(spec) - len(bad), "skipped": bad})
    print(f"segmented {len(spec) - len(bad)} of {len(spec)} files into {out_dir}")
    for b in bad:
        print(f"  skipped {b['file']}: {b['error']}")
    return 1 if bad else 0


def mode_title(mode) -> str:
    return "Bbox" if mode == "box" else ("1 pt" if int(mode) == 1 else f"{int(mode)} pts")


def format_table(results: dict, modes) -> str:
    """A table like the paper's Table 1, then Dice per dataset, modality and label."""
    keys = [infer.mode_key(m) for m in modes]
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
    files.write_json(out_dir / "results.json", summary)
    files.write_json(out_dir / "prompts.json", results["prompts"], indent=None)  # compact
    buf = io.StringIO()
    cols = ["mask", "image", "modality", "dataset", "label", "mode", "dice", "iou", "pred_iou"]
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
        multimask=cfg.multimask, replay=replay, limit=args.limit, progress=True,
        save_dir=out_dir / "masks" if args.save_masks else None, split=args.split,
    )  # fmt: skip
    results["checkpoint"] = cfg.checkpoint
    results["precision"] = cfg.dtype
    write_eval(out_dir, results)
    print(format_table(results, cfg.prompt_modes))
    print(f"wrote {', '.join(str(out_dir / n) for n in names)}")
    return 0
