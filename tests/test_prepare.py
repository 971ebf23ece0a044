"""Tests for prepare.py, the dataset-building command, on real files: a synthetic volume with a
marker voxel and known objects (exact pixels, orientation on every axis, instances and the area
filter, case split, shards, interrupted and killed runs, bad inputs), 2D folders, and the MNI152
template from the nilearn wheel."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import data
import prepare
from files import read_json


def _save_nifti(path, arr, affine):
    nib.save(nib.Nifti1Image(arr, affine), str(path))


# ----------------------------------------------------------------------------------------------
# The preprocessing CLI on a synthetic volume with known objects


X, Y, Z = 64, 64, 8  # canonical RAS+ voxel grid of the synthetic case
LPS_AFFINE = np.array([[-1, 0, 0, X - 1], [0, -1, 0, Y - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])


def synthetic_case(intensity_offset=0.0):
    """-> (image, labels) in canonical RAS+ voxel order (i: left->Right, j: posterior->Anterior,
    k: inferior->Superior). A marker voxel sits near the right-anterior-superior corner."""
    i, j, k = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    image = (10.0 + i + 2 * j + 3 * k + intensity_offset).astype(np.float32)
    image[X - 2, Y - 2, Z - 2] = 1000.0  # the marker
    labels = np.zeros((X, Y, Z), np.int16)
    labels[10:20, 30:40, 2:7] = 3  # 100 px per axial slice
    labels[40:45, 5:10, 3:5] = 5  # 25 px
    labels[50:52, 50:53, 3:5] = 5  # 6 px: below 0.153% of 64 x 64 = 6.27 px as an instance
    labels[30:32, 30:32, 6] = 7  # 4 px: always below the filter
    return image, labels


def save_lps(path, arr):
    """Store a RAS+ array the way a DICOM converter often does: L-P-S axes, same world space."""
    _save_nifti(path, np.ascontiguousarray(arr[::-1, ::-1, :]), LPS_AFFINE)


def make_volumes(root, n=1, **kw):
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "lab").mkdir(exist_ok=True)
    for c in range(n):
        image, labels = synthetic_case(intensity_offset=c)
        save_lps(root / "img" / f"case{c:04d}_0000.nii.gz", image)  # nnU-Net channel suffix
        save_lps(root / "lab" / f"case{c:04d}.nii.gz", labels)
    return root / "img", root / "lab"


def volume_cfg(root, out, **kw):
    base = dict(images=str(root / "img"), labels=str(root / "lab"), out=str(out),
                modality="MR_T1", dataset="SYN", axes=("z",))  # fmt: skip
    return prepare.DataConfig(**{**base, **kw})


def read_png(path):
    return np.asarray(Image.open(path))


def test_cli_synthetic_volume_exact(tmp_path):
    make_volumes(tmp_path)
    out = tmp_path / "out"
    summary = prepare.run(volume_cfg(tmp_path, out))
    assert summary["slices"] == 5 and summary["skipped"] == []
    prefix = "MR_T1--SYN--case0000--z_"
    want = {f"images/{prefix}{k:04d}.png": [f"masks/{prefix}{k:04d}--label_3_000.png"]
            for k in range(2, 7)}  # fmt: skip
    for k in (3, 4):
        want[f"images/{prefix}{k:04d}.png"].append(f"masks/{prefix}{k:04d}--label_5_000.png")
    assert read_json(out / "image2label_train.json") == want  # one case: all in train
    inverse = {m: img for img, ms in want.items() for m in ms}
    assert read_json(out / "label2image_train.json") == inverse
    for s in ("val", "test"):
        assert read_json(out / f"image2label_{s}.json") == {}
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        k.split("/")[1] for k in want
    )
    # label 3 box i 10..19, j 30..39 -> radiological view: rows 63 - j, columns 63 - i
    box = np.zeros((Y, X), np.uint8)
    box[24:34, 44:54] = 255
    np.testing.assert_array_equal(read_png(out / f"masks/{prefix}0002--label_3_000.png"), box)
    union5 = np.zeros((Y, X), np.uint8)
    union5[54:59, 19:24] = union5[11:14, 12:14] = 255  # both blobs of label 5 (25 + 6 px)
    np.testing.assert_array_equal(read_png(out / f"masks/{prefix}0003--label_5_000.png"), union5)
    # intensity: 0.5-99.5 percentiles of the non-zero voxels, computed here independently
    image, _ = synthetic_case()
    lo, hi = np.percentile(image[image != 0], [0.5, 99.5])
    k = 6
    view = image[::-1, ::-1, k].T  # rows: anterior first; columns: patient right first
    want_img = np.round((np.clip(view, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)
    got = read_png(out / f"images/{prefix}0006.png")
    assert got.dtype == np.uint8 and got.ndim == 2
    np.testing.assert_array_equal(got, want_img)
    assert got[1, 1] == 255  # the marker, top-left
    # a pool of workers sharing the one volume writes the same files
    prepare.run(volume_cfg(tmp_path, tmp_path / "pool", workers=2))
    assert tree(tmp_path / "pool") == tree(out)


@pytest.mark.slow  # a subprocess
def test_cli_marker_orientation_all_axes(tmp_path):
    make_volumes(tmp_path)
    _, labels = synthetic_case()
    labels[X - 4 :, Y - 4 :, Z - 3 :] = 9  # slices through the marker need a mask to be kept
    save_lps(tmp_path / "lab" / "case0000.nii.gz", labels)
    out = tmp_path / "out"
    # through the command line; a window [0, 1000] keeps the body below 60, the marker at 255
    cmd = [sys.executable, data.__file__, "volumes", "--images", str(tmp_path / "img"),
           "--labels", str(tmp_path / "lab"), "--out", str(out), "--modality", "MR_T1",
           "--dataset", "SYN", "--min-area", "0", "--window", "500", "1000"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    printed = res.stderr + res.stdout
    assert (
        "case0000: 64x64x8 voxels, spacing 1.00 x 1.00 x 1.00 mm (RAS), intensity CT window "
        "-> [0, 1000] mapped to 0-255" in printed
    )
    assert "  z: kept, HxW 64x64 px at 1.00 x 1.00 mm; min area 0% = 0 px (0 mm^2)" in printed
    # marker at RAS voxel (X-2, Y-2, Z-2): patient right, anterior, superior -> in every view
    # one pixel from the top-left corner (radiological: right on the left; sagittal: anterior
    # on the left; superior/anterior at the top)
    for axis, k in (("x", X - 2), ("y", Y - 2), ("z", Z - 2)):
        img = read_png(out / f"images/MR_T1--SYN--case0000--{axis}_{k:04d}.png")
        assert img[1, 1] == 255 and (img == 255).sum() == 1, axis
    sag = read_png(out / "images/MR_T1--SYN--case0000--x_0015.png")
    assert sag.shape == (Z, Y)  # sagittal: rows superior->inferior, columns anterior->posterior
    vol = data.read_volume(tmp_path / "img" / "case0000_0000.nii.gz").data
    for axis, k in (("x", X - 2), ("y", Y - 2), ("z", Z - 2)):
        view = data.volume_slice(vol, axis, k)  # the raw marker is the unique maximum
        assert np.unravel_index(view.argmax(), view.shape) == (1, 1)


def test_cli_instances_and_area_filter(tmp_path):
    make_volumes(tmp_path)
    out = tmp_path / "out"
    prepare.run(volume_cfg(tmp_path, out, instances=True))
    m = data.read_manifest(out, "train")
    masks = sorted(Path(p).name for ms in m.values() for p in ms)
    assert "MR_T1--SYN--case0000--z_0003--label_5_000.png" in masks
    assert not any("label_5_001" in n or "label_7" in n for n in masks)  # 6 px and 4 px dropped
    blob = read_png(out / "masks/MR_T1--SYN--case0000--z_0003--label_5_000.png")
    assert (blob > 0).sum() == 25
    out2 = tmp_path / "out2"
    prepare.run(volume_cfg(tmp_path, out2, instances=True, min_area=0.0))
    m2 = [Path(p).name for ms in data.read_manifest(out2, "train").values() for p in ms]
    assert "MR_T1--SYN--case0000--z_0003--label_5_001.png" in m2
    assert "MR_T1--SYN--case0000--z_0006--label_7_000.png" in m2


def test_cli_case_split_shards_and_rerun(tmp_path, capsys):
    make_volumes(tmp_path, n=10)
    full = tmp_path / "full"
    prepare.run(volume_cfg(tmp_path, full, split=(0.6, 0.2, 0.2), seed=3))
    splits = {}
    for s in ("train", "val", "test"):
        for img in read_json(full / f"image2label_{s}.json"):
            splits.setdefault(img.split("--")[2], set()).add(s)
    assert all(len(v) == 1 for v in splits.values())  # a case never spans two splits
    counts = {s: sum(v == {s} for v in splits.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 6, "val": 2, "test": 2}
    # the same seed gives the same split; another seed another
    assert prepare.split_cases(list(splits), (0.6, 0.2, 0.2), 3) == {
        c: s.pop() for c, s in splits.items()
    }  # noqa: E501
    assert prepare.split_cases(list(splits), (0.6, 0.2, 0.2), 4) != prepare.split_cases(
        list(splits), (0.6, 0.2, 0.2), 3
    )
    # two shards into one output == one run
    sharded = tmp_path / "sharded"
    for i in (0, 1):
        prepare.run(volume_cfg(tmp_path, sharded, split=(0.6, 0.2, 0.2), seed=3, shard=(i, 2)))
    assert tree(sharded) == tree(full)
    # rerun: everything complete, nothing written
    capsys.readouterr()
    assert prepare.run(volume_cfg(tmp_path, full, split=(0.6, 0.2, 0.2), seed=3))["slices"] == 0
    assert "10 complete, 0 to do" in capsys.readouterr().out
    with pytest.raises(data.DataError, match="made with other options"):
        prepare.run(volume_cfg(tmp_path, full, instances=True))


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_cli_interrupted_then_rerun_equals_uninterrupted(tmp_path, monkeypatch):
    make_volumes(tmp_path, n=3)
    clean = tmp_path / "clean"
    prepare.run(volume_cfg(tmp_path, clean, axes=("x", "z")))
    broken = tmp_path / "broken"
    real_write, calls = prepare.write_png, []

    def dying_write(path, a):  # the process "dies" in the middle of the second case
        calls.append("case0001" in path.name)
        if sum(calls) == 5:
            path.with_name(f".{path.name}.999.tmp").write_bytes(b"half a png")
            raise KeyboardInterrupt
        real_write(path, a)

    monkeypatch.setattr(prepare, "write_png", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare.run(volume_cfg(tmp_path, broken, axes=("x", "z")))
    monkeypatch.setattr(prepare, "write_png", real_write)
    assert len(list((broken / "cases").iterdir())) == 1  # only the first case is complete
    assert not (broken / "image2label_train.json").exists()
    prepare.run(volume_cfg(tmp_path, broken, axes=("x", "z")))
    assert tree(broken) == tree(clean)  # complete, identical, and no temp files left


@pytest.mark.slow  # subprocesses, a pool, a real SIGKILL
def test_cli_killed_process_then_rerun(tmp_path):
    """A real SIGKILL of the CLI (with a worker pool) midway, then a rerun."""
    make_volumes(tmp_path, n=4)
    args = ["volumes", "--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
            "--modality", "mr", "--dataset", "SYN", "--workers", "2"]  # fmt: skip
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    cli = [sys.executable, str(Path(prepare.__file__))]
    prepare.run(volume_cfg(tmp_path, clean, modality="mr", axes=("x", "y", "z"), workers=2))
    proc = subprocess.Popen([*cli, *args, "--out", str(killed)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 60
    while not any((killed / "masks").glob("*.png")) and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "image2label_train.json").exists()  # killed before the end
    subprocess.run([*cli, *args, "--out", str(killed)], check=True, capture_output=True)
    assert tree(killed) == tree(clean)


def test_command_line_flags_make_the_config(monkeypatch):
    monkeypatch.setattr(prepare, "run", lambda cfg: cfg)  # main hands run its config
    args = prepare.parser().parse_args(
        ["images", "--images", "i", "--labels", "l", "--out", "o", "--modality", "xray",
         "--dataset", "JSRT", "--axes", "x", "z", "--window", "40", "400", "--instances",
         "--min-area", "0.01", "--split", "0.5", "0.25", "0.25", "--seed", "3",
         "--case-pattern", "^(P\\d+)_", "--workers", "2", "--shard", "1/4", "--skip-bad"]
    )  # fmt: skip
    assert prepare.main(args) == prepare.DataConfig(
        kind="images", images="i", labels="l", out="o", modality="xray", dataset="JSRT",
        axes=("x", "z"), window=(40.0, 400.0), instances=True, min_area=0.01,
        split=(0.5, 0.25, 0.25), seed=3, case_pattern="^(P\\d+)_", workers=2, shard=(1, 4),
        skip_bad=True,
    )  # fmt: skip
    required = ["volumes", "--images", "i", "--labels", "l", "--out", "o"]
    defaults = prepare.main(prepare.parser().parse_args(required))
    assert defaults == prepare.DataConfig(images="i", labels="l", out="o")
    lung = prepare.main(prepare.parser().parse_args([*required, "--window", "lung"]))
    assert lung.window == "lung"
    with pytest.raises(ValueError, match="--window takes a preset name or LEVEL WIDTH"):
        prepare.main(prepare.parser().parse_args([*required, "--window", "40", "wide"]))
    with pytest.raises(SystemExit):
        prepare.parser().parse_args([*required, "--shard", "3"])
    thick = prepare.main(prepare.parser().parse_args(
        [*required, "--max-anisotropy", "inf", "--no-resample", "--max-labels", "9"]))  # fmt: skip
    assert (thick.max_anisotropy, thick.resample, thick.max_labels) == (float("inf"), False, 9)
    for bad in (["nan", "100"], ["40", "0"], ["40", "-400"], ["inf", "10"]):
        with pytest.raises(ValueError, match=r"--window: CT window needs a finite LEVEL and a "
                           r"WIDTH > 0, got"):  # fmt: skip
            prepare.main(prepare.parser().parse_args([*required, "--window", *bad]))


def test_command_errors_are_one_line(tmp_path, capsys):
    args = ["volumes", "--images", str(tmp_path / "none"), "--labels", str(tmp_path),
            "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        prepare.command(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'none'}: not a folder" in err
    # a NaN window and a NaN volume: one line each, naming the flag / the file; nothing written
    make_volumes(tmp_path)
    args = ["volumes", "--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        prepare.command([*args, "--window", "nan", "100"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--window: CT window" in err
    image, _ = synthetic_case()
    image[5, 5, 5] = np.nan
    save_lps(tmp_path / "img" / "case0000_0000.nii.gz", image)
    with pytest.raises(SystemExit) as exit_:
        prepare.command(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().endswith("case0000_0000.nii.gz: 1 NaN/inf voxels")
    assert not list((tmp_path / "out").rglob("*.png"))


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_cli_bad_inputs_named_and_skipped(tmp_path, capsys):
    make_volumes(tmp_path, n=1)
    img, lab = tmp_path / "img", tmp_path / "lab"
    image, labels = synthetic_case()
    bad = {}
    _save_nifti(img / "shape.nii.gz", image, np.eye(4))
    _save_nifti(lab / "shape.nii.gz", labels[:, :, :4], np.eye(4))
    bad["shape"] = "shape.nii.gz: shape (64, 64, 4) does not match image"
    _save_nifti(img / "affine.nii.gz", image, np.eye(4))
    _save_nifti(lab / "affine.nii.gz", labels, np.diag([2.0, 1, 1, 1]))
    bad["affine"] = "affine.nii.gz: affine differs"
    _save_nifti(img / "frac.nii.gz", image, np.eye(4))
    _save_nifti(lab / "frac.nii.gz", labels.astype(np.float32) + 0.5, np.eye(4))
    bad["frac"] = "frac.nii.gz: non-integer labels"
    nan = image.copy()
    nan[3, 3, 3] = np.inf
    _save_nifti(img / "nan.nii.gz", nan, np.eye(4))
    _save_nifti(lab / "nan.nii.gz", labels, np.eye(4))
    bad["nan"] = "nan.nii.gz: 1 NaN/inf voxels"
    (img / "corrupt.nii.gz").write_bytes((img / "case0000_0000.nii.gz").read_bytes()[:3000])
    _save_nifti(lab / "corrupt.nii.gz", labels, np.eye(4))
    bad["corrupt"] = "corrupt.nii.gz: cannot read NIfTI"
    _save_nifti(img / "nolabel.nii.gz", image, np.eye(4))
    bad["nolabel"] = "nolabel.nii.gz: no label file for it in"
    _save_nifti(lab / "orphan.nii.gz", labels, np.eye(4))  # a label without an image: noted
    for name, msg in bad.items():
        one = tmp_path / f"only_{name}"
        (one / "img").mkdir(parents=True)
        (one / "lab").mkdir()
        for f in (img / f"{name}.nii.gz", lab / f"{name}.nii.gz"):
            if f.exists():
                (one / f.parent.name / f.name).write_bytes(f.read_bytes())
        with pytest.raises(data.DataError, match=re.escape(msg)):
            prepare.run(volume_cfg(one, one / "out"))
    capsys.readouterr()
    summary = prepare.run(volume_cfg(tmp_path, tmp_path / "out", skip_bad=True, workers=2))
    assert len(summary["skipped"]) == len(bad) and summary["slices"] == 5
    printed = capsys.readouterr().out
    assert "1 label files have no image: " in printed and "orphan.nii.gz" in printed
    for msg in bad.values():
        assert msg in printed and any(msg in s for s in summary["skipped"])


# ----------------------------------------------------------------------------------------------
# 2D folders


def test_cli_2d_folders(tmp_path):
    img, lab = tmp_path / "img", tmp_path / "lab"
    img.mkdir()
    lab.mkdir()
    rng = np.random.default_rng(8)
    m = np.zeros((40, 50), np.uint8)
    m[5:20, 5:25] = 1
    Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(img / "p01_a.png")
    Image.fromarray(m * 255).save(lab / "p01_a.png")  # 0/255
    a16 = rng.integers(0, 4000, (40, 50)).astype(np.uint16)
    Image.fromarray(a16).save(img / "p01_b.tif")
    Image.fromarray(m).save(lab / "p01_b.png")  # 0/1
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(img / "p02_a.png")
    label_map = m * 2
    label_map[30:35, 30:45] = 4
    label_map[0, 0] = 9  # 1 px: filtered
    Image.fromarray(label_map).save(lab / "p02_a.png")
    out = tmp_path / "out"
    cfg = prepare.DataConfig(kind="images", images=str(img), labels=str(lab), out=str(out),
                          modality="xray", dataset="T", case_pattern=r"^(p\d+)_",
                          split=(0.5, 0.0, 0.5))  # fmt: skip
    prepare.run(cfg)
    i2l = {**read_json(out / "image2label_train.json"),
           **read_json(out / "image2label_test.json")}  # fmt: skip
    assert i2l == {
        "images/xray--T--p01--p01_a.png": ["masks/xray--T--p01--p01_a--label_1_000.png"],
        "images/xray--T--p01--p01_b.png": ["masks/xray--T--p01--p01_b--label_1_000.png"],
        "images/xray--T--p02--p02_a.png": [
            "masks/xray--T--p02--p02_a--label_2_000.png",
            "masks/xray--T--p02--p02_a--label_4_000.png",
        ],
    }
    train = read_json(out / "image2label_train.json")
    assert {k.split("--")[2] for k in train} in ({"p01"}, {"p02"})  # patients stay together
    np.testing.assert_array_equal(read_png(out / "images/xray--T--p02--p02_a.png"), rgb)
    np.testing.assert_array_equal(
        read_png(out / "images/xray--T--p01--p01_b.png"), data.read_image(img / "p01_b.tif")[..., 0]
    )
    np.testing.assert_array_equal(
        read_png(out / "masks/xray--T--p01--p01_b--label_1_000.png"), m * 255
    )
    grey = rng.integers(0, 256, (40, 50), dtype=np.uint8)  # an image given as its own label map
    Image.fromarray(grey).save(img / "p04_a.png")
    Image.fromarray(grey).save(lab / "p04_a.png")
    with pytest.raises(data.DataError, match=r"lab/p04_a.png: identical to its image: an "
                       "intensity image, not a label map"):  # fmt: skip
        prepare.run(prepare.DataConfig(**{**cfg.__dict__, "out": str(tmp_path / "o3")}))
    with pytest.raises(data.DataError, match=r"lab/p04_a.png: 25\d distinct labels \(at most "
                       r"--max-labels 9\): an intensity image"):  # fmt: skip
        prepare.run(prepare.DataConfig(**{**cfg.__dict__, "out": str(tmp_path / "o4"),
                                          "max_labels": 9}))  # fmt: skip
    (img / "p04_a.png").unlink()
    (img / "p03_a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt, skipped
    Image.fromarray(m).save(lab / "p03_a.png")
    summary = prepare.run(prepare.DataConfig(**{**cfg.__dict__, "out": str(tmp_path / "o1"),
                                          "skip_bad": True}))  # fmt: skip
    assert len(summary["skipped"]) == 1 and "p03_a.png: cannot read image" in summary["skipped"][0]
    Image.fromarray(np.zeros((41, 50), np.uint8)).save(lab / "p02_a.png")
    with pytest.raises(
        data.DataError, match=r"p02_a.png: mask is 50x41 but its image .*p02_a.png is 50x40"
    ):
        prepare.run(prepare.DataConfig(**{**cfg.__dict__, "out": str(tmp_path / "o2")}))


# ----------------------------------------------------------------------------------------------
# The MNI152 template from the nilearn wheel (grey/white matter at 50% as labels 1 and 2)


def mni_paths():
    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        pytest.skip("nilearn's data files are not installed")
    d = Path(spec.origin).parent / "datasets" / "data"
    return [d / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")]


@pytest.mark.slow  # real data: 197 x 233 x 189 voxels
def test_mni152_builds_with_the_area_filter(tmp_path):
    t1, gm, wm = mni_paths()
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    (tmp_path / "img" / "case0000.nii.gz").write_bytes(t1.read_bytes())
    g, w = (np.asarray(nib.load(str(p)).dataobj) for p in (gm, wm))
    labels = np.zeros(g.shape, np.uint8)
    labels[g >= 128] = 1
    labels[w >= 128] = 2
    _save_nifti(tmp_path / "lab" / "case0000.nii.gz", labels, nib.load(str(gm)).affine)
    out = tmp_path / "out"
    summary = prepare.run(volume_cfg(tmp_path, out, modality="mr_t1", dataset="MNI152"))
    # the expected axial masks, from the label volume directly (the file is RAS+ already)
    H, W = labels.shape[1], labels.shape[0]
    want, dropped = set(), 0
    for k in range(labels.shape[2]):
        for lab_value in (1, 2):
            area = (labels[:, :, k] == lab_value).sum()
            if area >= 0.00153 * H * W:
                want.add(f"masks/mr_t1--MNI152--case0000--z_{k:04d}--label_{lab_value}_000.png")
            elif area > 0:
                dropped += 1
    got = {m for ms in read_json(out / "image2label_train.json").values() for m in ms}
    assert got == want and dropped > 0  # the filter really removed some masks
    assert summary["slices"] == len({m.rsplit("--", 1)[0] for m in want})
    mask = read_png(out / "masks/mr_t1--MNI152--case0000--z_0090--label_2_000.png") > 0
    np.testing.assert_array_equal(mask, (labels[::-1, ::-1, 90] == 2).T)


# ----------------------------------------------------------------------------------------------
# Thick slices (nnU-Net's anisotropy rule), refused label volumes, empty splits


@pytest.mark.parametrize("n, n_new", [(10, 72), (38, 190), (7, 25), (25, 173)])
def test_resample_slice_matches_torch(n, n_new):
    """Image: torch's bilinear (align_corners=False) to within rounding; labels: torch's
    nearest-exact, exactly; both axes."""
    rng = np.random.default_rng(n)
    img, lab = rng.integers(0, 256, (n, 17), dtype=np.uint8), rng.integers(0, 5, (n, 17))
    up = lambda a, size, mode: torch.nn.functional.interpolate(
        torch.from_numpy(a)[None, None].double(), size, mode=mode
    )[0, 0].numpy()  # fmt: skip
    for transpose in (False, True):
        t = (lambda a: a.T) if transpose else (lambda a: a)
        size = t(np.zeros((n_new, 17))).shape
        got_img, got_lab = prepare.resample_slice(t(img), t(lab), size)
        want = up(np.ascontiguousarray(t(img)), size, "bilinear")
        assert got_img.shape == size and np.abs(got_img - want).max() <= 0.5 + 1e-9
        np.testing.assert_array_equal(
            got_lab, up(np.ascontiguousarray(t(lab)), size, "nearest-exact")
        )


def _thick_mni(root):
    """The MNI152 template (1 mm) with GM/WM labels, keeping every 5th axial slice: 1 x 1 x 5 mm,
    the affine's z column scaled by 5. -> the full-resolution labels."""
    t1, gm, wm = mni_paths()
    (root / "img").mkdir()
    (root / "lab").mkdir()
    img = nib.load(str(t1))
    affine = img.affine.copy()
    affine[:3, 2] *= 5
    _save_nifti(root / "img" / "case0000.nii.gz", np.asarray(img.dataobj)[:, :, ::5], affine)
    g, w = (np.asarray(nib.load(str(p)).dataobj) for p in (gm, wm))
    full = np.zeros(g.shape, np.uint8)
    full[g >= 128] = 1
    full[w >= 128] = 2
    _save_nifti(root / "lab" / "case0000.nii.gz", full[:, :, ::5], affine)
    return full


def test_thick_mni152_axes_skipped_or_resampled(tmp_path, capsys):
    full = _thick_mni(tmp_path)  # (197, 233, 189) at 1 mm; the files are 197 x 233 x 38
    out = tmp_path / "out"
    prepare.run(volume_cfg(tmp_path, out, axes=("x", "y", "z"), modality="mr", dataset="MNI"))
    printed = capsys.readouterr().out
    assert "case0000: 197x233x38 voxels, spacing 1.00 x 1.00 x 5.00 mm (RAS)" in printed
    assert "  x: skipped, pixels 5.00 x 1.00 mm (rows x cols; ratio 5.0 > 3)" in printed
    assert "  y: skipped, pixels 5.00 x 1.00 mm (rows x cols; ratio 5.0 > 3)" in printed
    assert "  z: kept, HxW 233x197 px at 1.00 x 1.00 mm; min area 0.153% = 71 px (71 mm^2)" in (
        printed
    )
    assert "slice axes over the recorded cases: x: 1 skipped; y: 1 skipped; z: 1 kept" in printed
    images = list(read_json(out / "image2label_train.json"))
    assert images and all("--z_" in p for p in images)
    assert read_png(out / images[0]).shape == (233, 197)
    record = read_json(out / "cases" / "case0000.json")
    assert {a: p["action"] for a, p in record["axes"].items()} == {
        "x": "skipped", "y": "skipped", "z": "kept"
    }  # fmt: skip
    assert record["pairing"]["rule"] == "same stem"
    # a higher limit: the sagittal slices are resampled to 1 mm pixels, 38 -> 190 rows
    out2 = tmp_path / "out2"
    prepare.run(volume_cfg(tmp_path, out2, axes=("x",), max_anisotropy=6, modality="mr",
                           dataset="MNI"))  # fmt: skip
    assert "x: resampled HxW 38x233 -> 190x233 px (rows 5.00 -> 1.00 mm)" in capsys.readouterr().out
    name = "mr--MNI--case0000--x_0070"
    sag = read_png(out2 / f"images/{name}.png")
    wm = read_png(out2 / f"masks/{name}--label_2_000.png") > 0
    assert sag.shape == wm.shape == (190, 233)
    # geometry: resampled row i is at z = 187 - i mm; the full-resolution slice's row r at
    # z = 188 - r. Rows 2, 7, ... sit exactly on the kept 5 mm slices: equal there, and close
    # to the 1 mm truth everywhere (nearest within 2.5 mm)
    truth = data.volume_slice(full, "x", 70) == 2  # (189, 233)
    np.testing.assert_array_equal(wm[2:188:5], truth[3:189:5])
    dice = 2 * (wm[:188] & truth[1:]).sum() / (wm[:188].sum() + truth[1:].sum())
    assert dice > 0.85
    thick = data.read_volume(tmp_path / "img" / "case0000.nii.gz").data
    np.testing.assert_array_equal(sag[2::5], data.volume_slice(data.normalize_intensity(thick),
                                                               "x", 70))  # fmt: skip


def _lps_volume(path_img, path_lab, spacing=(0.9, 0.9, 6.5)):
    """A 40 x 48 x 10 volume stored L-P-S with 0.9 x 0.9 x 6.5 mm voxels (a clinical MRI); label 3
    fills i 5:15, j 10:30, k 3:6 (RAS voxels): 19.5 mm thick."""
    sx, sy, sz = spacing
    affine = np.array([[-sx, 0, 0, 39 * sx], [0, -sy, 0, 47 * sy], [0, 0, sz, 0], [0, 0, 0, 1]])
    i, j, k = np.meshgrid(np.arange(40), np.arange(48), np.arange(10), indexing="ij")
    image = (100 + i + 2 * j + 10 * k).astype(np.float32)
    labels = np.zeros((40, 48, 10), np.uint8)
    labels[5:15, 10:30, 3:6] = 3
    _save_nifti(path_img, image[::-1, ::-1], affine)
    _save_nifti(path_lab, labels[::-1, ::-1], affine)


def test_thick_synthetic_lps_volume(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    _lps_volume(tmp_path / "img" / "mri.nii.gz", tmp_path / "lab" / "mri.nii.gz")
    run = lambda out, **kw: prepare.run(volume_cfg(tmp_path, tmp_path / out, min_area=0, **kw))
    run("all", axes=("x", "y", "z"))
    printed = capsys.readouterr().out
    assert "spacing 0.90 x 0.90 x 6.50 mm (RAS)" in printed
    assert "  x: skipped, pixels 6.50 x 0.90 mm (rows x cols; ratio 7.2 > 3)" in printed
    assert "  y: skipped" in printed and "  z: kept, HxW 48x40 px at 0.90 x 0.90 mm" in printed
    with pytest.raises(data.DataError, match=r"mri.nii.gz: every slice axis asked for \(x, y\)"
                       r".*--max-anisotropy 3 \(spacing 0.90 x 0.90 x 6.50 mm\)"):  # fmt: skip
        run("xy", axes=("x", "y"))
    # the limit off (0): resampled to square pixels, 10 rows of 6.5 mm -> round(72.2) = 72
    run("res", axes=("x",), max_anisotropy=0)
    sag = read_png(tmp_path / "res/masks/MR_T1--SYN--mri--x_0010--label_3_000.png") > 0
    assert sag.shape == (72, 48)
    rows = np.nonzero(sag.any(1))[0]
    pixel = 6.5 * 10 / 72  # mm per resampled row
    assert abs(len(rows) * pixel - 19.5) <= pixel  # 3 slices of 6.5 mm
    centre_mm = (rows[0] + rows[-1] + 1) / 2 * pixel  # from the top (superior) edge
    assert abs(centre_mm - (10 - 4.5) * 6.5) <= pixel  # RAS k 3..5 are rows 4..6 from the top
    cols = np.nonzero(sag.any(0))[0]  # columns: anterior -> posterior, not resampled
    assert (cols[0], cols[-1]) == (47 - 29, 47 - 10)
    # resampling off as well: the stored pixels, as before this rule existed
    run("raw", axes=("x",), max_anisotropy=0, resample=False)
    assert read_png(tmp_path / "raw/images/MR_T1--SYN--mri--x_0010.png").shape == (10, 48)
    capsys.readouterr()
    run("inf", axes=("y",), max_anisotropy=float("inf"), resample=False)  # strict JSON records
    assert "y: kept, HxW 10x40 px at 6.50 x 0.90 mm" in capsys.readouterr().out


def test_refuses_intensity_volumes_as_labels(tmp_path):
    make_volumes(tmp_path)
    img, lab = tmp_path / "img", tmp_path / "lab"
    with pytest.raises(data.DataError, match="same folder and no file name has a label role"):
        prepare.run(volume_cfg(tmp_path, tmp_path / "o1", labels=str(img)))
    image, _ = synthetic_case()
    noisy = image + np.random.default_rng(0).integers(0, 500, image.shape)  # ~700 values
    save_lps(lab / "case0000.nii.gz", noisy.astype(np.int16))  # an MR stored as integers
    with pytest.raises(data.DataError, match=r"case0000.nii.gz: \d+ distinct labels: an "
                       "intensity volume, not a label map"):  # fmt: skip
        prepare.run(volume_cfg(tmp_path, tmp_path / "o2"))
    few = np.minimum(image, 40).astype(np.float32)  # few values: only equality gives it away
    save_lps(img / "case0000_0000.nii.gz", few)
    save_lps(lab / "case0000.nii.gz", few.astype(np.int16))
    with pytest.raises(data.DataError, match="case0000.nii.gz: identical to its image"):
        prepare.run(volume_cfg(tmp_path, tmp_path / "o3"))
    assert not (tmp_path / "o2" / "masks").exists() or not any((tmp_path / "o2/masks").iterdir())


def test_empty_split_warned_at_build_time(tmp_path, capsys):
    make_volumes(tmp_path, n=3)
    prepare.run(volume_cfg(tmp_path, tmp_path / "out"))  # 0.8/0.1/0.1 of 3 -> 2/0/1
    printed = capsys.readouterr().out
    assert "warning: the val split is empty (3 cases x 0.1 rounds to 0); train.py validates" in (
        printed
    )
    assert "the test split is empty" not in printed
    prepare.run(volume_cfg(tmp_path, tmp_path / "out2", split=(0.34, 0.33, 0.33)))
    assert "warning" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# File-name pairing layouts (find_cases reads names only: empty files will do)


def _touch(root, *names):
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"")


def _paired(root, capsys=None, **kw):
    cfg = prepare.DataConfig(**{"images": str(root / "images"), "labels": "", **kw})
    cases = prepare.find_cases(cfg)
    return {c.name: [(str(a.relative_to(root)), b and str(b.relative_to(root))) for a, b in c.pairs]
            for c in cases}, {c.name: c.error for c in cases if c.error}, cases  # fmt: skip


@pytest.mark.parametrize("layout, files, labels_dir, want, rule", [
    ("same stem", ["images/a.nii.gz", "labels/a.nii.gz", "images/b.nii", "labels/b.nii"],
     "labels", {"a": ("images/a.nii.gz", "labels/a.nii.gz"), "b": ("images/b.nii", "labels/b.nii")},
     "same stem"),
    ("nnU-Net", ["images/a_0000.nii.gz", "images/a_0001.nii.gz", "labels/a.nii.gz"], "labels",
     {"a": ("images/a_0000.nii.gz", "labels/a.nii.gz")}, "nnU-Net channel"),
    ("role suffixes, two folders", ["images/a_image.nii.gz", "labels/a_label.nii.gz",
     "images/b.nii.gz", "labels/b_seg.nii.gz"], "labels",
     {"a": ("images/a_image.nii.gz", "labels/a_label.nii.gz"),
      "b": ("images/b.nii.gz", "labels/b_seg.nii.gz")}, "role suffix"),
    ("role suffixes, one folder", ["images/a-img.nii.gz", "images/a-mask.nii.gz",
     "images/b.nii.gz", "images/b_gt.nii.gz"], "images",
     {"a": ("images/a-img.nii.gz", "images/a-mask.nii.gz"),
      "b": ("images/b.nii.gz", "images/b_gt.nii.gz")}, "role suffix"),
    ("case folders (KiTS)", ["images/c1/imaging.nii.gz", "images/c1/segmentation.nii.gz",
     "images/c2/c2_image.nii.gz", "images/c2/c2_label.nii.gz"], "",
     {"c1": ("images/c1/imaging.nii.gz", "images/c1/segmentation.nii.gz"),
      "c2": ("images/c2/c2_image.nii.gz", "images/c2/c2_label.nii.gz")}, "case folder"),
    ("MSD root", ["images/imagesTr/BRATS_001.nii.gz", "images/labelsTr/BRATS_001.nii.gz",
     "images/imagesTr/._BRATS_001.nii.gz", "images/imagesTs/BRATS_900.nii.gz"], "",
     {"BRATS_001": ("images/imagesTr/BRATS_001.nii.gz", "images/labelsTr/BRATS_001.nii.gz")},
     "same stem"),
])  # fmt: skip
def test_pairing_layouts(tmp_path, capsys, layout, files, labels_dir, want, rule):
    _touch(tmp_path, *files)
    labels = str(tmp_path / labels_dir) if labels_dir else ""
    pairs, errors, cases = _paired(tmp_path, labels=labels)
    assert errors == {} and {k: v[0] for k, v in pairs.items()} == want, layout
    assert {c.rule for c in cases} == {rule}
    printed = capsys.readouterr().out
    assert f"pairing rule: {rule} ({len(want)} cases)" in printed
    name, (image, label) = next(iter(want.items()))
    assert f"  {name}: {Path(image).name} + {Path(label).name}" in printed
    if layout == "nnU-Net":
        assert "1 further nnU-Net channels set aside (e.g. a_0001.nii.gz)" in printed
        pairs, errors, _ = _paired(tmp_path, labels=labels, channel=1)  # --channel 1
        assert errors == {} and pairs == {"a": [("images/a_0001.nii.gz", "labels/a.nii.gz")]}
        assert "the _0001 image of each case is used" in capsys.readouterr().out


@pytest.mark.parametrize("files, labels_dir, message", [
    (["images/a.nii.gz", "labels/a.nii.gz", "labels/a.nii"], "labels",
     r"images/a.nii.gz: ambiguous, 2 label files fit"),
    (["images/a.nii.gz", "labels/a_label.nii.gz", "labels/a_seg.nii.gz"], "labels",
     r"images/a.nii.gz: ambiguous, 2 label files fit"),
    (["images/a.nii.gz", "images/a_0000.nii.gz", "labels/a.nii.gz"], "labels",
     r"labels/a.nii.gz: ambiguous, claimed by .*images/a.nii.gz, .*images/a_0000.nii.gz"),
    (["images/a_0001.nii.gz", "labels/a.nii.gz"], "labels",
     r"images/a_0001.nii.gz: an nnU-Net channel without its _0000 image"),
    (["images/c1/imaging.nii.gz", "images/c1/scan.nii.gz", "images/c1/seg.nii.gz"], "",
     r"images/c1: need one image and one label file"),
    (["images/a.nii.gz", "labels/b.nii.gz"], "labels", r"images/a.nii.gz: no label file"),
])  # fmt: skip
def test_pairing_ambiguity_is_an_error(tmp_path, capsys, files, labels_dir, message):
    _touch(tmp_path, *files)
    labels = str(tmp_path / labels_dir) if labels_dir else ""
    _, errors, _ = _paired(tmp_path, labels=labels)
    assert any(re.search(message, e) for e in errors.values()), errors


def test_pairing_refusals(tmp_path):
    _touch(tmp_path, "images/a.nii.gz", "images/b.nii.gz")
    with pytest.raises(data.DataError, match="same folder and no file name has a label role"):
        _paired(tmp_path, labels=str(tmp_path / "images"))
    with pytest.raises(data.DataError, match="give --labels"):
        _paired(tmp_path)


def test_pairing_layout_end_to_end(tmp_path):
    """Case folders with real volumes: built like the same files in two folders."""
    image, labels = synthetic_case()
    for c in ("p1", "p2"):
        (tmp_path / "cases" / c).mkdir(parents=True)
        save_lps(tmp_path / "cases" / c / "image.nii.gz", image)
        save_lps(tmp_path / "cases" / c / "label.nii.gz", labels)
    cfg = volume_cfg(tmp_path, tmp_path / "out", images=str(tmp_path / "cases"), labels="")
    assert prepare.run(cfg)["slices"] == 2 * 5
    record = read_json(tmp_path / "out" / "cases" / "p1.json")
    assert record["pairing"]["rule"] == "case folder"
    assert record["pairing"]["pairs"][0][1].endswith("p1/label.nii.gz")


# ----------------------------------------------------------------------------------------------
# The worker pool dies with its parent; Ctrl-C stops it promptly (issue 13.5)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process, from /proc."""
    table = {}
    for d in Path("/proc").iterdir():
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split() if d.name.isdigit() else 0
        except OSError:  # gone meanwhile
            continue
        if fields:
            table[int(d.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> set[int]:
    table, found, todo = _proc_table(), set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, (pp, _) in table.items() if pp == p}
        found |= kids
        todo += kids
    return found


def _alive(pids) -> set[int]:
    """The pids that still run (a zombie has finished; it waits only to be reaped)."""
    table = _proc_table()
    return {p for p in pids if p in table and table[p][1] != "Z"}


def _busy_pool(tmp_path):
    """A `data.py volumes --workers 2` run whose units take seconds (one volume, 16 slices per
    unit, 256 instance masks per slice), caught mid-unit: -> (process, its workers' pids)."""
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    labels = np.zeros((128, 128, 128), np.uint8)
    labels[2::8, 2::8, :] = labels[3::8, 2::8, :] = 1  # 16 x 16 separate 2-px blobs per slice
    image = np.random.default_rng(0).integers(0, 1000, labels.shape).astype(np.float32)
    _save_nifti(tmp_path / "img" / "c.nii", image, np.eye(4))  # uncompressed: quick to write
    _save_nifti(tmp_path / "lab" / "c.nii", labels, np.eye(4))
    cmd = [sys.executable, data.__file__, "volumes", "--images", str(tmp_path / "img"), "--labels",
           str(tmp_path / "lab"), "--out", str(tmp_path / "out"), "--workers", "2", "--axes", "z",
           "--instances", "--min-area", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline, workers = time.time() + 60, set()
    while time.time() < deadline and proc.poll() is None:
        workers = _descendants(proc.pid)
        if len(workers) >= 2 and any((tmp_path / "out" / "masks").glob("*.png")):
            return proc, workers
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"the pool never got busy (exit {proc.poll()}, workers {workers})")


def _gone_within(pids, seconds: float) -> set[int]:
    deadline = time.time() + seconds
    while _alive(pids) and time.time() < deadline:
        time.sleep(0.02)
    return _alive(pids)


@pytest.mark.slow  # subprocesses and a pool
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_a_killed_parent(tmp_path, sig):
    proc, workers = _busy_pool(tmp_path)
    os.kill(proc.pid, sig)  # the parent only, as `kill PID` does
    proc.communicate(timeout=30)
    assert _gone_within(workers, 5.0) == set(), f"workers {workers} outlived the parent"


@pytest.mark.slow  # subprocesses and a pool
def test_ctrl_c_stops_the_pool_promptly(tmp_path):
    proc, workers = _busy_pool(tmp_path)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    _, err = proc.communicate(timeout=30)
    seconds = time.time() - t0
    assert proc.returncode == 130 and seconds < 5.0, (proc.returncode, seconds, err)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == "data.py: interrupted" and "Traceback" not in err
    assert _gone_within(workers, 2.0) == set()
    assert not (tmp_path / "out" / "image2label_train.json").exists()  # stopped before the end
