"""The command line of `python model.py`: convert official files (SAM, SAM-Med2D) to ours,
parameter counts (info); `bench` and `export-onnx` hand the rest of the line to bench.py
(`encoder`) and onnx_export.py, which sit above the stages. model.py runs `main(parse_args())`
under `__main__`; it never imports this module. Usage: docs/model.md.
"""

import argparse
import runpy
import sys

import torch

import model
from model import PRESETS, Sam, SamConfig, load_checkpoint, save_checkpoint

HANDOVER = {"bench": ["bench", "encoder"], "export-onnx": ["onnx_export"]}


def count_parameters(sam: Sam) -> dict:
    """Parameter counts per part; the adapters are counted apart from the rest of the encoder."""
    adapters = sum(p.numel() for n, p in sam.image_encoder.named_parameters() if ".Adapter." in n)
    encoder = sum(p.numel() for p in sam.image_encoder.parameters()) - adapters
    prompt = sum(p.numel() for p in sam.prompt_encoder.parameters())
    decoder = sum(p.numel() for p in sam.mask_decoder.parameters())
    return dict(encoder=encoder, adapters=adapters, prompt_encoder=prompt, mask_decoder=decoder,
                total=encoder + adapters + prompt + decoder)  # fmt: skip


def main(args) -> None:
    if args.command == "convert":
        kw = dict(conventions=args.input_conventions, decoder_heads=args.decoder_heads)
        sam = load_checkpoint(args.src, args.image_size, args.adapter, **kw)
        save_checkpoint(sam, args.dst)
        print(f"wrote {args.dst} ({sam.cfg.name} at {sam.cfg.image_size} px)")
    elif args.command == "info":
        adapter = {} if args.adapter is None else dict(adapter=args.adapter)  # None: the preset's
        with torch.device("meta"):  # counting needs the shapes only
            cfg = SamConfig.from_name(args.preset, image_size=args.image_size or 256, **adapter)
            counts = count_parameters(Sam(cfg))
        print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    else:  # that module's own command line, as if run as `python bench.py encoder ...`
        module, *first = HANDOVER[args.command]
        sys.argv = [f"{module}.py", *first, *args.rest]
        runpy.run_module(module, run_name="__main__")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="model.py", description=model.__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="official .pth (SAM, SAM-Med2D) -> our .safetensors")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--input-conventions", choices=("sam-med2d", "checkpoint"), default="sam-med2d")
    c.add_argument("--decoder-heads", choices=("reinit", "keep"), default="reinit")
    info = sub.add_parser("info", help="parameter counts")
    info.add_argument("preset", choices=list(PRESETS))
    for s in (c, info):  # default: the file's (convert) or the preset's (info)
        s.add_argument("--image-size", type=int)
        s.add_argument("--adapter", action=argparse.BooleanOptionalAction)
    for name, (module, *first) in HANDOVER.items():
        sub.add_parser(name, add_help=False, help=f"python {module}.py {' '.join(first)} ...")
    args, args.rest = p.parse_known_args(argv)
    if args.rest and args.command not in HANDOVER:
        p.error(f"unrecognized arguments: {' '.join(args.rest)}")
    return args
