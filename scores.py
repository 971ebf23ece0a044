"""The bookkeeping around infer.evaluate's scores: which masks each test image has, in manifest
order (manifest_groups, with the key that names each mask in the results and in prompts.json),
what an SA-Med2D-20M file name says about its mask (name_fields: modality, dataset, label), and
the means the results report per prompt mode, overall and per group (summarise). infer.py holds
the protocol itself; outputs.py writes these results as tables and files.
"""

from pathlib import Path

import numpy as np

import data


def name_fields(mask_path: str) -> dict:
    """Modality, dataset and label from an SA-Med2D-20M style name,
    e.g. `mr_t1--MNI152--case0000--z_0090--label_2_000.png` (the trailing _000 is the instance)."""
    parts = Path(mask_path).stem.split("--")
    if len(parts) < 3:
        return {"modality": "unknown", "dataset": "unknown", "label": "unknown"}
    label = parts[-1].rsplit("_", 1)[0] if parts[-1].rsplit("_", 1)[-1].isdigit() else parts[-1]
    return {"modality": parts[0], "dataset": parts[1], "label": f"{parts[1]}/{label}"}


def summarise(rows: list, keys: list) -> dict:
    """Mean Dice/IoU per prompt mode, overall and per dataset, modality and label; with box
    rows, also the filled-box baseline ("filled_box"), kept apart from "dice" because train.py's
    validation averages every mode in it. keys: the prompt modes' names in the rows, in order
    ("box", "1pt", "3shot": infer.mode_key)."""

    def means(rs, metric):
        return {
            k: float(np.mean([r[metric] for r in rs if r["mode"] == k] or [np.nan])) for k in keys
        }

    def filled(rs):
        box = [r for r in rs if "filled_dice" in r]
        return {m: float(np.mean([r[f"filled_{m}"] for r in box])) for m in ("dice", "iou")}

    out = {
        "dice": means(rows, "dice"),
        "iou": means(rows, "iou"),
        "n_masks": len(rows) // len(keys),
    }
    has_fill = any("filled_dice" in r for r in rows)
    if has_fill:
        out["filled_box"] = filled(rows)
    out["by"] = {}
    for name in ("dataset", "modality", "label"):
        groups = {}
        for r in rows:
            groups.setdefault(r[name], []).append(r)
        out["by"][name] = {
            g: {
                "n_masks": len(rs) // len(keys),
                "dice": means(rs, "dice"),
                "iou": means(rs, "iou"),
                **({"filled_box": filled(rs)} if has_fill else {}),
            }  # fmt: skip
            for g, rs in sorted(groups.items())
        }
    return out


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
