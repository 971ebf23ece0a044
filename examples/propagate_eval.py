"""Measure slice-to-slice propagation (volume.py) on the MNI152 template (examples/mni152.py's
labels: white matter, grey matter, brain), or on any NIfTI volume with a label map on its grid
(--volume, --label), axial slices (or --axis y, x), LiteMedSAM's weights by default.

    python examples/propagate_eval.py runs/prop                      # encodes every slice once
    python examples/propagate_eval.py runs/prop --embeddings E.pt    # reuse (or save) embeddings
    python examples/propagate_eval.py runs/ct --volume ct.nii.gz seg.nii.gz \
        --label liver=5 "right kidney=2" --window soft_tissue        # your own data

Per structure, 3D Dice over the whole volume of:
  box3d   today's --box3d: the structure's 3D bounding box, every slice of its z range on its own
  oracle  the tight box of the structure on every slice where it is present
  prop    volume.segment_volume from ONE box (the tight one) on the structure's middle slice
          (or at --key-at of its extent), for each prompt setting (PropagateConfig fields),
          its stop rule live; then once more without stop rules, where each rule of RULES is
          applied afterwards to the output masks by cutting the run at the first slice where it
          fires (with mask_stream off the propagation up to that slice is the same as the live
          run's; with it on the live run's rule watches the prompt stream, not the output)
and the slices where propagation stops against the structure's true extent, and each run's Dice
cut at the true extent (a perfect stop rule: only the prompts differ). Every slice is
encoded once (a keeping volume.SliceEncoder shared by all runs); times per slice are reported.
With --step 2 the volume is every 2nd slice (2 mm apart): slice indices and stop errors are
then in those slices (x2 for the template's own). Saved --embeddings are keyed by the slice's
index along the axis, and must be of this model and axis. Writes OUT/results.json and prints a
table.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mni152  # noqa: E402

import data  # noqa: E402
import files  # noqa: E402
import infer  # noqa: E402
import outputs  # noqa: E402
import volume  # noqa: E402

AXIS = "z"  # the slices along --axis are laid out as axial slices of the volume measured


def along(vol: np.ndarray, axis: str, step: int) -> np.ndarray:
    """Every step-th slice along `axis`, as data.volume_slice shows it, stacked as the z slices
    of a volume: volume_slice(out, "z", i) == volume_slice(vol, axis, i * step)."""
    n = vol.shape[data.AXES[axis]]
    views = [data.slice_to_voxels(data.volume_slice(vol, axis, k)) for k in range(0, n, step)]
    return np.stack(views, axis=2)


README_LABELS = ("white matter", "grey matter", "brain")  # measured unless --structures says


def structures_gt() -> tuple:
    """The T1 (canonical, uint8 as the CLI scales it) and {name: (X, Y, Z) bool} labels: the
    README's three and, as a held-out check, the left hemisphere (brain voxels left of the
    volume's middle; canonical x runs to the right)."""
    read = lambda k: data.read_volume(mni152.template_dir() / mni152.FILES.format(k)).data  # noqa: E731
    t1, gm, wm = read("t1"), read("gm"), read("wm")
    gt = {
        "white matter": wm >= 128,
        "grey matter": (wm < 128) & (gm >= 128),
        "brain": gm + wm >= 128,
    }
    gt["left hemisphere"] = gt["brain"].copy()
    gt["left hemisphere"][gt["brain"].shape[0] // 2 :] = False
    return data.normalize_intensity(t1), gt


def labelled(image: str, labels: str, names: list, window) -> tuple:
    """A volume (uint8 as the CLI scales it, with `window` for CT) and {name: label map == value}
    for `names` [(name, value), ...]; the label map must lie on the volume's grid."""
    vol, lab = data.read_volume(image), data.read_volume(labels)
    if lab.data.shape != vol.data.shape or not np.allclose(lab.affine, vol.affine, atol=1e-3):
        sys.exit(f"{labels}: not on the grid of {image} (shape {lab.data.shape} vs "
                 f"{vol.data.shape}, or another affine)")  # fmt: skip
    gt = {name: lab.data == value for name, value in names}
    for name, g in gt.items():
        if not g.any():
            sys.exit(f"{labels}: no voxel has the value of {name!r}")
    return data.normalize_intensity(vol.data, window), gt


def _label(v: str) -> tuple:
    """ "right kidney=2" -> ("right kidney", 2)"""
    name, sep, value = v.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a label is NAME=VALUE, not {v!r}")
    return name, float(value)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def tight_box(mask2d: np.ndarray) -> list:
    return data.boxes_from_masks(torch.from_numpy(mask2d)[None])[0].tolist()


def per_slice(sam, enc, u8, boxes: dict, multimask: bool) -> np.ndarray:
    """Each slice k of `boxes` {k: box} segmented on its own (box3d, oracle) -> (X, Y, Z) bool."""
    out = np.zeros(u8.shape, bool)
    for k, box in boxes.items():
        emb, geom = enc(k)
        logits, _, _ = volume.decode_slice(sam, emb, geom, [(box, [])], None, multimask)
        out[:, :, k] = data.slice_to_voxels(logits > sam.cfg.mask_threshold)
    return out


# Stop rules: (name, kind, threshold). Each also stops where the mask vanished. "overlap": the
# mask's Dice with the previous slice's mask; "grow": its area over the previous slice's.
RULES = [("vanished", "area", 0.0)] + [(f"area<{f:g}", "area", f) for f in (0.02, 0.05, 0.1, 0.2)]
RULES += [(f"iou<{t:g}", "iou", t) for t in (0.5, 0.7)]
RULES += [(f"overlap<{t:g}", "overlap", t) for t in (0.5, 0.7, 0.8)]
RULES += [(f"grow>{t:g}", "grow", t) for t in (1.2, 1.5, 2)]
RULES += [("change>2x", "change", 2.0)]  # grew over 2x or shrank below 1/2 x: the default


def fires(kind: str, t: float, mask, prev, iou: float, key_area: int) -> bool:
    area = int(mask.sum())
    if area < 1:
        return True
    if kind == "area":
        return area < t * key_area
    if kind == "iou":
        return iou < t
    if kind == "overlap":
        return dice(mask, prev) < t
    if kind == "change":
        return area > t * int(prev.sum()) or area * t < int(prev.sum())
    return area > t * int(prev.sum())


def cut(seg_mask: np.ndarray, rec: dict, kind: str, threshold: float) -> tuple:
    """The propagation cut at the first slice (each way from the key) where the rule fires
    -> (mask, first, last)."""
    ious, key = rec["predicted_iou"], rec["key"]
    key_area = int(seg_mask[:, :, key].sum())
    first = last = key
    for step in (1, -1):
        k = key + step
        while k in ious and not fires(
            kind, threshold, seg_mask[:, :, k], seg_mask[:, :, k - step], ious[k], key_area
        ):
            k += step
        if step > 0:
            last = k - 1
        else:
            first = k + 1
    out = seg_mask.copy()
    out[:, :, :first] = False
    out[:, :, last + 1 :] = False
    return out, first, last


SETTINGS = [{}]  # volume.PropagateConfig's defaults
POSITIONAL = ("margin", "min_margin", "mask_prompt", "box_cap", "click", "track")


def _setting(v) -> dict:
    """ "0.1,2,n[,0.1[,y[,y]]][,clicks=3,...]" -> PropagateConfig fields: margin 0.1, min_margin
    2 px, no mask prompt, box_cap 0.1 (or none), the click (y/n), box tracking (y/n), then any
    other field as name=value (y/n for booleans). Fields left out keep PropagateConfig's
    defaults."""
    types = {f.name: f.type for f in volume.PropagateConfig.__dataclass_fields__.values()}
    out = {}
    for i, item in enumerate(v.split(",")):
        name, value = item.split("=", 1) if "=" in item else (POSITIONAL[i], item)
        if name not in types:
            raise argparse.ArgumentTypeError(f"no PropagateConfig field {name!r}")
        kind = str(types[name])
        if value == "none":
            out[name] = None
        elif "bool" in kind:
            out[name] = value == "y"
        else:
            out[name] = int(value) if types[name] is int else float(value)
    return out


def _tag(setting: dict) -> str:
    """A setting's name in results.json: the fields that differ from the defaults."""
    given = ", ".join(f"{k}={v}" for k, v in setting.items())
    return f"prop {given or 'defaults'}"


def run(out: Path, embeddings, checkpoint, settings, step, structures, baselines=True,
        axis="z", key_at=0.5, source=None, output="auto") -> dict:  # fmt: skip
    """`source`: (image, labels, [(name, value), ...], window) for labelled(); None: MNI152.
    `output`: the decoder's output propagation uses, "multi" (the best of three by predicted IoU)
    or "single"; "auto": the one whose oracle scores higher (multi without baselines)."""
    sam = infer.load_model(infer.InferConfig(checkpoint=checkpoint))
    u8, gt = structures_gt() if source is None else labelled(*source)
    structures = structures or (README_LABELS if source is None else list(gt))
    u8, gt = along(u8, axis, step), {k: along(g, axis, step) for k, g in gt.items()}
    enc = volume.SliceEncoder(sam, u8, AXIS, keep=True)
    if embeddings and Path(embeddings).is_file():  # {"emb": {original slice: (D, h, w)},
        # "encode_s": {slice: s}} of this model
        saved = torch.load(embeddings, weights_only=True)
        H, W = data.volume_slice(u8, AXIS, 0).shape
        geom = data.geometry(H, W, sam.cfg.image_size, sam.cfg.resize_mode)
        have = [k for k in saved["emb"] if k % step == 0]
        enc.cache = {k // step: (saved["emb"][k][None], geom) for k in have}
        enc.encode_s = {k // step: saved["encode_s"][k] for k in have}
    load = open("/proc/loadavg").read().split()[:3]
    results = {
        "checkpoint": sam.cfg.name,
        "volume": "MNI152" if source is None else [str(source[0]), str(source[1])],
        "axis": axis,
        "step": step,
        "loadavg": load,
        "structures": {},
    }
    for name, g in gt.items():
        if name not in structures:
            continue
        zs = np.nonzero(g.any((0, 1)))[0]
        z0, z1 = int(zs[0]), int(zs[-1])
        key = z0 + (z1 - z0) // 2 if key_at == 0.5 else int(round(z0 + key_at * (z1 - z0)))
        slices = {k: data.volume_slice(g, AXIS, k) for k in range(z0, z1 + 1)}  # (H, W) views
        box = tight_box(slices[key])
        union = np.any(list(slices.values()), axis=0)
        box3d = tight_box(union)
        res = {"extent": [z0, z1], "key": key, "key_box": box, "box3d_box": box3d}
        for mm in (True, False) if baselines else ():
            tag = "multi" if mm else "single"
            t0 = time.perf_counter()
            b3 = per_slice(sam, enc, u8, {k: box3d for k in slices}, mm)
            orc = per_slice(sam, enc, u8, {k: tight_box(s) for k, s in slices.items()}, mm)
            res[f"box3d_{tag}"], res[f"oracle_{tag}"] = dice(b3, g), dice(orc, g)
            res[f"baselines_decode_s_per_slice_{tag}"] = (time.perf_counter() - t0) / (
                2 * len(slices)
            )
        mm = res.get("oracle_multi", 1) >= res.get("oracle_single", 0)  # the better output
        mm = mm if output == "auto" else output == "multi"
        for setting in settings:
            st = volume.Structure(box, key)
            seg = volume.segment_volume(sam, u8, [st], AXIS, volume.PropagateConfig(**setting), mm,
                                        encoder=enc)  # fmt: skip
            rec = seg.records[0]
            n_dec = len(seg.timings["decode_s"])
            row = {  # the setting as it runs, its own stop rule live
                "dice": dice(seg.masks[0], g),
                "stop_error": [rec["first"] - z0, rec["last"] - z1],
                "decode_s_per_slice": sum(seg.timings["decode_s"].values()) / max(1, n_dec),
                "reached": [rec["first"], rec["last"]],
                "ends": rec["ends"],
                "rules": {},
            }
            # again without stop rules: each rule is applied afterwards, to the output masks
            # (the similarity rule at -1 never fires, but the cosines are still recorded)
            off = {"stop_growth": None, "stop_shrink": None, "stop_similarity": -1.0}
            cfg = volume.PropagateConfig(**{**setting, **off})
            seg = volume.segment_volume(sam, u8, [st], AXIS, cfg, mm, encoder=enc)
            rec = seg.records[0]
            m0 = seg.masks[0]
            row["slice_dice"] = {
                k: round(dice(m0[:, :, k], g[:, :, k]), 3) for k in rec["predicted_iou"]
            }
            row["slice_similarity"] = rec["similarity"]  # cosine to the seed mask's features
            row["slice_area"] = {
                k: [int(m0[:, :, k].sum()), int(g[:, :, k].sum())] for k in rec["predicted_iou"]
            }
            for rule_name, kind, threshold in RULES:
                m, first, last = cut(seg.masks[0], rec, kind, threshold)
                row["rules"][rule_name] = {
                    "dice": dice(m, g),
                    "first": first,
                    "last": last,
                    "stop_error": [first - z0, last - z1],
                }
            m = m0.copy()  # a perfect stop rule: cut at the true extent (only the prompts differ)
            m[:, :, :z0], m[:, :, z1 + 1 :] = False, False
            row["dice_true_extent"] = dice(m, g)
            tag = _tag(setting) + (" multi" if mm else " single")
            res[tag] = row
            best = max(row["rules"].items(), key=lambda kv: kv[1]["dice"])
            print(
                f"{name:12s} {tag:40s} {row['dice']:.4f} stop {row['stop_error']} "
                f"true extent {row['dice_true_extent']:.4f} | afterwards: vanished "
                f"{row['rules']['vanished']['dice']:.4f} best {best[0]} {best[1]['dice']:.4f} "
                f"stop {best[1]['stop_error']}",
                flush=True,
            )
        if baselines:
            print(
                f"{name:12s} box3d {res['box3d_multi']:.4f}/{res['box3d_single']:.4f} "
                f"oracle {res['oracle_multi']:.4f}/{res['oracle_single']:.4f} (multi/single)",
                flush=True,
            )
        results["structures"][name] = res
        files.write_json(out / "results.json", results)
    enc_s = list(enc.encode_s.values())
    results["encode_s_per_slice"] = {
        "mean": float(np.mean(enc_s)),
        "median": float(np.median(enc_s)),
    }
    files.write_json(out / "results.json", results)
    if embeddings and not Path(embeddings).is_file():  # save what was encoded, for the next run
        emb = {k * step: e[0].clone() for k, (e, _) in enc.cache.items()}
        times = {k * step: s for k, s in enc.encode_s.items()}
        files.atomic_write(embeddings, lambda tmp: torch.save({"emb": emb, "encode_s": times}, tmp))
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for results.json")
    p.add_argument("--embeddings", help="saved embeddings {'emb': {slice: (D, h, w)}, 'encode_s': "
                   "{slice: s}}; a file not there yet: saved there after the run")  # fmt: skip
    p.add_argument("--checkpoint", help="default: LiteMedSAM (checkpoints.default_checkpoint)")
    p.add_argument(
        "--settings",
        nargs="+",
        type=_setting,
        default=SETTINGS,
        help="MARGIN,MIN_MARGIN,y|n (mask prompt)[,BOX_CAP|none[,y|n (click)[,y|n (track)]]]"
        "[,FIELD=VALUE...] (other PropagateConfig fields, y|n for booleans); default: defaults",
    )
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--structures", nargs="+", choices=[*README_LABELS, "left hemisphere"],
                   help="MNI152's; default: the README's three")  # fmt: skip
    p.add_argument("--volume", nargs=2, metavar=("IMAGE", "LABELS"),
                   help="a NIfTI volume and a label map on its grid instead of MNI152")  # fmt: skip
    p.add_argument("--label", nargs="+", type=_label, metavar="NAME=VALUE",
                   help="with --volume: the structures, each a value of the label map")  # fmt: skip
    p.add_argument("--window", nargs="+", help="with --volume: a CT window (data.WINDOWS name, "
                   "or LEVEL WIDTH); default: the 0.5-99.5 percentiles")  # fmt: skip
    p.add_argument("--key-at", type=float, default=0.5,
                   help="the key slice at this fraction of the extent (0.5: middle)")  # fmt: skip
    p.add_argument("--output", choices=("auto", "multi", "single"), default="auto",
                   help="the decoder output propagated (auto: the better oracle's)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared CPU)")
    p.add_argument("--step", type=int, default=1, help="every step-th slice (CPU time)")
    p.add_argument("--axis", choices=list(data.AXES), default="z", help="z: axial, y, x")
    a = p.parse_args()
    if bool(a.volume) != bool(a.label):
        p.error("--volume and --label go together")
    try:
        window = outputs.parse_window(a.window)
    except ValueError as err:
        p.error(str(err))
    source = None if a.volume is None else (*a.volume, a.label, window)
    torch.set_grad_enabled(False)
    torch.set_num_threads(a.threads)
    run(Path(a.out), a.embeddings, a.checkpoint, a.settings, a.step, a.structures, a.baselines,
        a.axis, a.key_at, source, a.output)  # fmt: skip
