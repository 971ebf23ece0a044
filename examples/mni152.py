"""Real MRI for the examples and the README's "Real result": the MNI152 template in nilearn's wheel.

    python examples/mni152.py example examples/           # mni152_axial.png + its brain box
    python examples/mni152.py dataset runs/mni152         # the evaluation set (data.py inside)
    python examples/mni152.py baseline runs/mni152/data   # Dice of filling the whole mask's box

`infer.py --eval` prints the filled-box baseline of the box it prompts with (by default the largest
8-connected component's, the official rule) in its table's "box fill" column; `baseline` here
fills each mask's whole tight box at the original size (the `--protocol tight` box).

The ICBM 2009a template (T1, grey- and white-matter probability maps, 0-255) ships with nilearn;
only its data files are read (nilearn is never imported). See examples/MNI152_NOTICE.txt.

Labels, from the probability maps thresholded at 128 (50%): 1 white matter, 2 grey matter, 3 brain
(P(GM) + P(WM) >= 50%). Brain overlaps the other two, and a label volume holds one label per
voxel, so data.py runs on two cases with the same T1: "MNI152" (labels 1, 2) and "MNI152brain"
(label 3); the split step then lists the brain masks under the MNI152 image of the same slice.

It is one template, so the split is by slice ranges along each axis (train, gap, val, gap, test),
not by case. Slices of different axes still cross, and the template is left-right symmetric, so
the test slices are not independent of the training ones the way another subject's would be.
"""

import argparse
import importlib.util
import re
import sys
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import files  # noqa: E402
import prepare  # noqa: E402

FILES = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
LABELS = {1: "white matter", 2: "grey matter", 3: "brain"}
EXAMPLE_SLICE = 90  # axial slice (z) of the example image: ventricles, cortex and white matter
SLICE = re.compile(r"--(?P<case>MNI152(?:brain)?)--(?P<axis>[xyz])_(?P<k>\d+)\.png$")


def template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")  # finds the wheel's files, never imports it
    if spec is None:
        sys.exit("needs the MNI152 files of the nilearn wheel: pip install --no-deps nilearn")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def example(out: Path) -> None:
    """The README's example image: axial slice EXAMPLE_SLICE of the T1, 8-bit, as data.py scales
    MR (0.5-99.5 percentiles of the non-zero voxels)."""
    vol = data.read_volume(template_dir() / FILES.format("t1"))
    t1 = data.volume_slice(data.normalize_intensity(vol.data), "z", EXAMPLE_SLICE)  # (H, W)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mni152_axial.png"
    files.write_png(path, t1)
    gm, wm = (data.read_volume(template_dir() / FILES.format(k)).data for k in ("gm", "wm"))
    brain = data.volume_slice(gm + wm, "z", EXAMPLE_SLICE) >= 128
    ys, xs = np.nonzero(brain)
    print(f"wrote {path} ({t1.shape[1]}x{t1.shape[0]}); brain box: "
          f"--box {xs.min()} {ys.min()} {xs.max()} {ys.max()}")  # fmt: skip


def write_volumes(src: Path) -> None:
    """src/images/{MNI152,MNI152brain}.nii.gz (the T1) and src/labels/ (the label volumes)."""
    tdir = template_dir()
    t1 = nib.load(tdir / FILES.format("t1"))
    gm, wm = (np.asarray(nib.load(tdir / FILES.format(k)).dataobj, np.int32) for k in ("gm", "wm"))
    tissue = np.where(wm >= 128, 1, np.where(gm >= 128, 2, 0)).astype(np.uint8)
    brain = np.where(gm + wm >= 128, 3, 0).astype(np.uint8)
    for d in ("images", "labels"):
        (src / d).mkdir(parents=True, exist_ok=True)
    for case, labels in (("MNI152", tissue), ("MNI152brain", brain)):
        image = nib.Nifti1Image(np.asarray(t1.dataobj), t1.affine, t1.header)
        label = nib.Nifti1Image(labels, t1.affine)
        files.atomic_write(src / "images" / f"{case}.nii.gz", lambda p, im=image: nib.save(im, p))
        files.atomic_write(src / "labels" / f"{case}.nii.gz", lambda p, lb=label: nib.save(lb, p))


def split(root: Path, train=0.6, val=0.1, gap=6, test_every=4) -> dict:
    """Write the manifests: per axis, the slices with masks in index order are cut into train
    (first `train`), val (next `val`) and test (the rest), `gap` slices dropped between parts;
    every `test_every`-th test slice is kept (evaluation time on a CPU). -> counts per split."""
    by_slice, image_of = defaultdict(list), {}  # (axis, k) -> masks; -> the MNI152 image
    for path in sorted((root / "masks").glob("*--label_*.png")):  # from disk: reruns start over
        m = SLICE.search(path.name.split("--label_")[0] + ".png")
        if m is None:
            sys.exit(f"{path}: not a mask of the MNI152 cases")
        by_slice[m["axis"], int(m["k"])].append(f"masks/{path.name}")
        if m["case"] == "MNI152":
            image_of[m["axis"], int(m["k"])] = f"images/{path.name.split('--label_')[0]}.png"
    parts = {"train": {}, "val": {}, "test": {}}
    for axis in "xyz":
        ks = sorted(k for a, k in by_slice if a == axis and (a, k) in image_of)
        n_train, n_val = int(train * len(ks)), int(val * len(ks))
        cut = {"train": ks[:n_train], "val": ks[n_train + gap : n_train + gap + n_val],
               "test": ks[n_train + n_val + 2 * gap :][::test_every]}  # fmt: skip
        for name, chosen in cut.items():
            for k in chosen:
                parts[name][image_of[axis, k]] = sorted(by_slice[axis, k])
    for name, i2l in parts.items():
        l2i = {m: img for img, ms in i2l.items() for m in ms}
        for fname, obj in ((f"image2label_{name}.json", i2l), (f"label2image_{name}.json", l2i)):
            files.write_json(root / fname, obj)
    return {name: (len(i2l), sum(map(len, i2l.values()))) for name, i2l in parts.items()}


def dataset(out: Path) -> None:
    write_volumes(out / "src")
    cfg = prepare.DataConfig(kind="volumes", images=str(out / "src" / "images"),
                          labels=str(out / "src" / "labels"), out=str(out / "data"),
                          modality="mr_t1", dataset="ICBM2009a", split=(1.0, 0.0, 0.0))  # fmt: skip
    prepare.run(cfg)
    for name, (n_img, n_mask) in split(out / "data").items():
        print(f"{name}: {n_img} images, {n_mask} masks")


def baseline(root: Path, split_name: str = "test") -> dict:
    """Mean Dice of filling each mask's whole tight box (all its components: the --protocol tight
    box), per label and overall, at the original size."""
    scores = defaultdict(list)
    for masks in data.read_manifest(root, split_name).values():
        for path in masks:
            gt = data.read_mask(path)
            ys, xs = np.nonzero(gt)
            box = np.zeros_like(gt)
            box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
            d = 2 * (box & gt).sum() / (box.sum() + gt.sum())
            label = int(re.search(r"--label_(\d+)_\d+\.png$", path)[1])
            scores[LABELS[label]].append(d)
            scores["all"].append(d)
    result = {k: round(float(np.mean(v)), 4) for k, v in scores.items()}
    print(f"box-filled Dice on {split_name} ({len(scores['all'])} masks): {result}")
    return result


def main(args) -> None:
    {"example": example, "dataset": dataset, "baseline": baseline}[args.command](Path(args.path))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["example", "dataset", "baseline"])
    p.add_argument("path", help="example: output folder; dataset: run folder; baseline: data root")
    main(p.parse_args())
