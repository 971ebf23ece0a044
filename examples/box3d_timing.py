"""Wall time of a `--box3d` volume with the default model, fp32 against the default precision.

    python examples/box3d_timing.py [--slices 150] [--z0 20] [--threads 2] [--out-dir DIR]

Runs `python infer.py T1 --box3d X0 Y0 Z0 X1 Y1 Z1` twice as a user would, each in its own process
(model loading and file writing included): once with `--dtype float32`, once with the default
(`--dtype auto`: the bf16 fast path on a CPU with native bf16, docs/precision.md). The volume is
the MNI152 T1 template from nilearn's wheel (examples/mni152.py), `--slices` axial slices from
`--z0`, with the README's brain box on every slice. Prints both wall times, their ratio, the
precision each run's JSON records, and the 3-D Dice between the two masks.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import data  # noqa: E402, I001  (the repository's root first, then examples/)
import mni152  # noqa: E402

BOX = (28, 29, 168, 200)  # x0 y0 x1 y1: the brain box on the README's axial slice


def run(volume: Path, box3d: list, out: Path, threads: int, dtype: str | None) -> float:
    """Wall seconds of one infer.py process; its mask goes to `out`, its record to out.json."""
    cmd = [sys.executable, str(ROOT / "infer.py"), str(volume), "--box3d", *map(str, box3d),
           "--out", str(out), "--json", f"{out}.json", "--threads", str(threads)]  # fmt: skip
    cmd += ["--dtype", dtype] if dtype else []
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def main(args) -> int:
    volume = mni152.template_dir() / mni152.FILES.format("t1")
    depth = data.read_volume(volume).data.shape[2]  # axial slices along z
    z1 = args.z0 + args.slices
    if not 0 <= args.z0 < z1 <= depth:
        sys.exit(f"box3d_timing.py: slices {args.z0}..{z1} do not fit the {depth} axial slices")
    box3d = [BOX[0], BOX[1], args.z0, BOX[2], BOX[3], z1]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    res = {}
    for name, dtype in (("float32", "float32"), ("default", None)):
        out = args.out_dir / f"mask_{name}.nii.gz"
        seconds = run(volume, box3d, out, args.threads, dtype)
        record = json.loads(Path(f"{out}.json").read_text())
        res[name] = dict(seconds=seconds, precision=record.get("precision"), out=out)
        print(f"{name}: {seconds:.1f} s wall ({record.get('precision')})", flush=True)
    a, b = (data.read_volume(res[k]["out"]).data > 0 for k in ("float32", "default"))
    dice = 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)
    t32, t = res["float32"]["seconds"], res["default"]["seconds"]
    print(f"--box3d {' '.join(map(str, box3d))} ({args.slices} slices), {args.threads} threads: "
          f"float32 {t32:.1f} s, default ({res['default']['precision']}) {t:.1f} s, "
          f"{t32 / t:.2f}x; 3-D Dice between the masks {dice:.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=150)
    p.add_argument("--z0", type=int, default=20, help="first axial slice")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/box3d_timing"))
    sys.exit(main(p.parse_args()))
