"""Per-mask Dice differences between two `infer.py --eval` runs (docs/precision.md's table).

    python examples/dice_diff.py FP32_DIR FAST_DIR

Each DIR holds the per_mask.csv of one run. The second run should replay the first one's prompts
(`--prompt-file FP32_DIR/prompts.json`), so that the same clicks are scored and only the
precision differs. Rows are matched by (mask, mode); a mask or mode missing from either run is an
error. Prints, per mode: the masks, both mean Dice, the difference of the means (second - first),
and the distribution of the per-mask differences: mean, mean absolute, and the worst 1% (the
99th percentile of |difference|, linear interpolation) and the worst mask.
"""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def read_dice(run_dir) -> dict:
    """{(mask, mode): dice} from run_dir/per_mask.csv."""
    path = Path(run_dir) / "per_mask.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {(r["mask"], r["mode"]): float(r["dice"]) for r in rows}
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: not an infer.py --eval per_mask.csv ({err})") from None


def compare(a: dict, b: dict) -> dict:
    """Per mode: n, mean_a, mean_b, diff_of_means, mean_diff, mean_abs_diff, p99_abs_diff,
    max_abs_diff (b - a)."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:3]
        raise ValueError(f"the runs scored different masks or modes, e.g. {only}")
    out = {}
    for mode in dict.fromkeys(m for _, m in a):  # in the runs' order
        keys = [k for k in a if k[1] == mode]
        da, db = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
        d = db - da
        out[mode] = dict(
            n=len(keys), mean_a=da.mean(), mean_b=db.mean(), diff_of_means=db.mean() - da.mean(),
            mean_diff=d.mean(), mean_abs_diff=np.abs(d).mean(),
            p99_abs_diff=np.percentile(np.abs(d), 99), max_abs_diff=np.abs(d).max(),
        )  # fmt: skip
    return out


def main(args) -> int:
    res = compare(read_dice(args.first), read_dice(args.second))
    cols = list(next(iter(res.values())))
    print(f"{'mode':6s}" + "".join(f"{c:>15s}" for c in cols))
    for mode, r in res.items():
        print(f"{mode:6s}{r['n']:15d}" + "".join(f"{r[c]:15.5f}" for c in cols[1:]))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", help="the reference run's --out-dir (fp32)")
    p.add_argument("second", help="the compared run's --out-dir (the fast path)")
    try:
        sys.exit(main(p.parse_args()))
    except ValueError as err:
        sys.exit(f"dice_diff.py: {err}")
