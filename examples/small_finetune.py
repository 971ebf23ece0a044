"""Fine-tuning LiteMedSAM on a small thick-slice dataset: over-fitting or recipe? (docs/train.md)

    python examples/small_finetune.py volumes runs/thick/src      # 3 thick-slice NIfTI cases
    python data.py volumes --images runs/thick/src/images --labels runs/thick/src/labels \\
        --out runs/thick/data --modality mr --split 0.34 0.33 0.33
    python examples/small_finetune.py run runs/thick/data runs/thick/exp --masks 2 --iter-points 2
    python examples/small_finetune.py table runs/thick/exp      # docs/train.md's table

The cases: the MNI152 T1 template of nilearn's wheel (1 mm, 197 x 233 x 189) keeping every 5th
axial slice (1 x 1 x 5 mm, the affine's z column scaled by 5, as tests/test_prepare.py), cut into
three slabs along z (inferior, middle, superior; each a NIfTI case with its own affine offset);
labels 1 white matter, 2 grey matter (probability maps >= 128, as examples/mni152.py). data.py
skips the x and y axes (5 mm / 1 mm > 3) and keeps the axial slices: one case each for train, val
and test, about 10 slices each, like a user's three thick-slice MRI cases.

`run` fine-tunes from train.py's default (LiteMedSAM, fresh adapters) with each recipe of
RECIPES: one run of the last step count, stopped and resumed exactly (`--stop-after`, `--resume`:
bit-identical to an uninterrupted run) so that the same trajectory is scored at every step count.
At each stop it scores last.safetensors with infer.evaluate on the val and train splits (box and
1/3/5 clicks, the official protocol, the output the recipe trains: best-of-3 by predicted IoU or
the single-mask token). Step 0 is the starting model as train.py validates it (adapters included).
Results go to OUT/results.jsonl (one line per recipe and step count); `table` prints them as
markdown. A recipe whose run directory holds a state continues from there. Run it with
OMP_NUM_THREADS=1 on a shared machine; docs/train.md has the exact commands and the figures.
"""

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import files  # noqa: E402
import infer  # noqa: E402
import model  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from examples.mni152 import FILES, template_dir  # noqa: E402

EVERY = 5  # keep every 5th axial slice: 1 x 1 x 5 mm
SLABS = {"slab_inferior": (0, 50), "slab_middle": (50, 100), "slab_superior": (100, 155)}  # z, 1 mm

# name -> train.py flags beyond the shared ones; the official recipe is train.py's default
RECIPES = {
    "official, lr 1e-4": {},
    "single-mask, lr 1e-4": {"multimask": False},
    "official, lr 1e-5": {"lr": 1e-5},
    "single-mask, no adapters, lr 1e-4": {"multimask": False, "adapter": False},
    "official, no adapters, lr 1e-4": {"adapter": False},
    "official, no adapters, no focal, lr 1e-4": {"adapter": False, "focal_weight": 0.0},
    "official, no adapters, lr 1e-5": {"adapter": False, "lr": 1e-5},
}


def volumes(out: Path) -> None:
    """out/images/<slab>.nii.gz (the T1) and out/labels/<slab>.nii.gz (1 WM, 2 GM)."""
    tdir = template_dir()
    t1 = nib.load(tdir / FILES.format("t1"))
    gm, wm = (np.asarray(nib.load(tdir / FILES.format(k)).dataobj) for k in ("gm", "wm"))
    labels = np.where(wm >= 128, 1, np.where(gm >= 128, 2, 0)).astype(np.uint8)
    image = np.asarray(t1.dataobj)
    for d in ("images", "labels"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for case, (z0, z1) in SLABS.items():
        affine = t1.affine.copy()
        affine[:3, 3] += affine[:3, 2] * z0  # voxel 0 of the slab is voxel z0 of the template
        affine[:3, 2] *= EVERY
        for d, arr in (("images", image), ("labels", labels)):
            img = nib.Nifti1Image(arr[:, :, z0:z1:EVERY], affine)
            files.atomic_write(out / d / f"{case}.nii.gz", lambda p, im=img: nib.save(im, p))
        print(f"{case}: z {z0}..{z1 - 1} every {EVERY} -> {len(range(z0, z1, EVERY))} slices")


def score(sam, root: Path, multimask: bool, modes) -> dict:
    """Dice per mode on the val and train splits of root."""
    res = {}
    for split in ("val", "train"):
        r = infer.evaluate(sam, root, prompt_modes=modes, multimask=multimask, split=split)
        res[split] = {k: round(float(v), 4) for k, v in r["dice"].items()}
        res[split]["n_masks"] = r["n_masks"]
        if "filled_box" in r:
            res[split]["filled_box"] = r["filled_box"]
    return res


def append(path: Path, line: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line), flush=True)


def run(root: Path, out: Path, steps: list, recipes: list, common: dict, modes) -> None:
    """Each recipe from step 0 (or from where its run directory stopped) to each step count."""
    results, starts = out / "results.jsonl", {}  # starts: the step-0 scores per starting model
    out.mkdir(parents=True, exist_ok=True)
    for name in recipes:
        flags = RECIPES[name]
        multimask = flags.get("multimask", True)
        rdir = out / name.replace(", ", "_").replace(" ", "-")
        done = runs.read_state(rdir)["step"] if (rdir / "state.pt").is_file() else 0
        if not done:  # step 0: the starting model as train.py builds it (seeded: fresh adapters)
            key = (flags.get("adapter", True), multimask)
            if key not in starts:
                sam = train.build_model(train.TrainConfig(data=str(root), **flags), "cpu")
                starts[key] = score(sam, root, multimask, modes)
            append(results, dict(recipe=name, step=0, **starts[key]))
        for n in (n for n in steps if n > done):
            args = dict(steps=max(steps), stop_after=n - done, val_every=0, progress=False)
            if done == 0:
                args.update(common, data=str(root), out=str(rdir), force=True, **flags)
            else:
                args.update(resume=str(rdir))
            train.main(args)
            done = n
            sam = model.load_checkpoint(rdir / "last.safetensors", verbose=False)
            append(results, dict(recipe=name, step=n, **score(sam, root, multimask, modes)))


def table(results: Path) -> str:
    """The markdown table of a results.jsonl: box Dice on val and train per recipe and step."""
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    steps = sorted({r["step"] for r in rows})
    by = {(r["recipe"], r["step"]): r for r in rows}
    lines = ["| box Dice: val (train) | " + " | ".join(f"step {n}" for n in steps) + " |",
             "|---|" + "---:|" * len(steps)]  # fmt: skip
    for name in dict.fromkeys(r["recipe"] for r in rows):
        cells = [f"{by[name, n]['val']['box']:.3f} ({by[name, n]['train']['box']:.3f})"
                 if (name, n) in by else "" for n in steps]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    fb = rows[0]["val"]["filled_box"]["dice"], rows[0]["train"]["filled_box"]["dice"]
    lines.append("| filled box | " + " | ".join([f"{fb[0]:.3f} ({fb[1]:.3f})"] * len(steps)) + " |")
    return "\n".join(lines)


def main(args) -> None:
    if args.command == "volumes":
        volumes(Path(args.path))
    elif args.command == "table":
        print(table(Path(args.path) / "results.jsonl"))
    else:
        common = dict(batch_size=2, masks_per_image=args.masks, iter_points=args.iter_points,
                      log_every=1, seed=0)  # fmt: skip
        modes = [m if m == "box" else int(m) for m in args.modes]
        run(Path(args.path), Path(args.out), args.steps, args.recipes or list(RECIPES), common,
            modes)  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["volumes", "run", "table"])
    p.add_argument("path", help="volumes: output folder; run: the dataset root (data.py's --out); "
                   "table: a results folder")  # fmt: skip
    p.add_argument("out", nargs="?", default="runs/small_finetune", help="run: results folder")
    p.add_argument("--steps", type=int, nargs="+", default=[6, 20, 50])
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES))
    p.add_argument("--masks", type=int, default=5, help="masks per image (train.py's M)")
    p.add_argument("--iter-points", type=int, default=8, help="train.py's click iterations")
    p.add_argument("--modes", nargs="+", default=["box"], help="scored: box and/or 1 3 5 clicks")
    main(p.parse_args())
