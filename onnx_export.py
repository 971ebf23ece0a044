"""Export a checkpoint to ONNX for onnxruntime: image encoder, prompt decoder, preprocessing.

    python onnx_export.py CHECKPOINT OUT_DIR [--opset 18] [--image-size S] [--bench --threads 2]

writes into OUT_DIR:
    encoder.onnx         image (1, 3, S, S), normalised -> image_embeddings (1, D, h, w)
    decoder.onnx         embedding + prompts -> masks (P, 3, S/4, S/4), iou_predictions (P, 3)
    decoder_single.onnx  the same with SAM's single-mask output: (P, 1, S/4, S/4), (P, 1)
    preprocess.json      what the weights expect: size, resize, channel order, intensity scaling

The decoder's prompts follow the convention of Meta's SAM ONNX export, so one graph takes points,
a box, or both, for any number P of prompts with N entries each (both dynamic):
    point_coords (P, N, 2) float32  x, y in model pixels (original * scale + pad, preprocess.json)
    point_labels (P, N)    float32  1 foreground, 0 background, 2 / 3 box top-left / bottom-right,
                                    -1 padding: without a box, append one point (0, 0) labelled -1
    mask_input   (P, 1, S/4, S/4)   sigmoid of a previous low-res prediction (zeros if none)
    has_mask_input (1,)   float32   1 to use mask_input, 0 to ignore it
The outputs are low-res logits (threshold preprocess.json's mask_threshold after upsampling), as
Sam.decode returns them. The encoder runs through the plain PyTorch reference path (the Triton
kernels do not export); the wrappers below only re-arrange inputs and call model.py's modules.

Errors: an op the exporter cannot translate names the innermost module that contains it (found by
exporting the submodules one by one); an opset outside what this exporter and onnxruntime support
is refused before anything is written. See docs/deploy.md.
"""

import argparse
import json
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import model

MIN_OPSET = 18  # torch.onnx's exporter (dynamo=True) emits opset 18 and newer
DEFAULT_OPSET = 18  # also what onnxruntime-web and older runtimes load
FILES = {k: f"{k}.onnx" for k in ("encoder", "decoder", "decoder_single")}
PREPROCESS_JSON = "preprocess.json"
DECODER_INPUTS = [
    "image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
]  # fmt: skip
DECODER_OUTPUTS = ["masks", "iou_predictions"]


class ExportError(ValueError):
    """A model that cannot be exported as asked; the message names the module and the reason."""


# ------------------------------------------------------------------------------------------------
# The two graphs: thin wrappers around model.py's modules
# ------------------------------------------------------------------------------------------------


class EncoderGraph(nn.Module):
    """image (1, 3, S, S) normalised -> embedding (1, D, h, w): Sam.encode without its checks."""

    def __init__(self, sam: model.Sam):
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image):
        return self.image_encoder(image)  # (1, D, h, w)


class DecoderGraph(nn.Module):
    """Sam.decode with SAM's labelled-point prompts (boxes as two corner points, label 2 and 3).

    PromptEncoder embeds points and box corners with the same Fourier features and adds a type
    embedding; doing that from the labels is what lets one graph take points, boxes and both (the
    tokens come out in Sam.decode's order when the box corners follow the points)."""

    def __init__(self, sam: model.Sam, multimask: bool):
        super().__init__()
        self.prompt_encoder, self.mask_decoder = sam.prompt_encoder, sam.mask_decoder
        self.image_size, self.multimask = sam.cfg.image_size, multimask

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        pe = self.prompt_encoder
        labels = point_labels[..., None]  # (P, N, 1)
        sparse = pe.pe_layer.points(point_coords + 0.5, self.image_size)  # (P, N, D), pixel centres
        sparse = torch.where(labels == -1, pe.not_a_point_embed.weight, sparse)
        for k, type_embedding in enumerate(pe.point_embeddings):  # 0 bg, 1 fg, 2/3 box corners
            sparse = sparse + (labels == k) * type_embedding.weight
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)  # (1, D, 1, 1)
        dense = has_mask_input * pe.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask
        P = point_coords.shape[0]
        image = image_embeddings.expand(P, -1, -1, -1)  # (P, D, h, w)
        return self.mask_decoder(image, pe.dense_pe(), sparse, dense, self.multimask)


def example_inputs(cfg: model.SamConfig, prompts: int = 2, points: int = 3, seed: int = 0):
    """Encoder and decoder inputs of the right shapes; P and N above 1 so that the exporter keeps
    them symbolic (it would specialise a size of 1)."""
    g = torch.Generator().manual_seed(seed)
    S, h, D = cfg.image_size, cfg.embed_size, cfg.prompt_dim
    image = torch.randn(1, 3, S, S, generator=g)
    coords = torch.rand(prompts, points, 2, generator=g) * S
    labels = torch.randint(-1, 4, (prompts, points), generator=g).float()
    mask = torch.rand(prompts, 1, 4 * h, 4 * h, generator=g)
    emb = torch.randn(1, D, h, h, generator=g)
    return (image,), (emb, coords, labels, mask, torch.ones(1))


def _decoder_dynamic_shapes():
    P, N = torch.export.Dim("prompts", min=1, max=4096), torch.export.Dim("points", min=1, max=256)
    return ({}, {0: P, 1: N}, {0: P, 1: N}, {0: P}, {})


# ------------------------------------------------------------------------------------------------
# Exporting, with errors that name the module
# ------------------------------------------------------------------------------------------------


def check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"opset {opset} is not supported: torch.onnx's exporter writes opset {MIN_OPSET} to "
            f"{newest} (the installed onnx {onnx.__version__}); try --opset {DEFAULT_OPSET}"
        )


def _to_onnx(graph: nn.Module, args: tuple, opset: int, names: tuple, dynamic_shapes=None):
    """torch.onnx.export (the dynamo exporter) -> ONNXProgram; quiet unless it fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            graph, args, dynamo=True, opset_version=opset, input_names=names[0],
            output_names=names[1], dynamic_shapes=dynamic_shapes, verbose=False,
        )  # fmt: skip


class _Call(nn.Module):
    """One recorded call of a submodule, as a module of its own: its tensor arguments become the
    graph's inputs, everything else stays as it was called."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.module, self.args, self.kwargs = module, args, kwargs

    def inputs(self) -> tuple:
        return tuple(a for a in [*self.args, *self.kwargs.values()] if torch.is_tensor(a))

    def forward(self, *tensors):
        it = iter(tensors)
        args = [next(it) if torch.is_tensor(a) else a for a in self.args]
        kwargs = {k: next(it) if torch.is_tensor(v) else v for k, v in self.kwargs.items()}
        return self.module(*args, **kwargs)


def find_failing_module(graph: nn.Module, args: tuple, opset: int) -> str:
    """The innermost submodule whose own export fails: record every submodule's inputs in one
    PyTorch run, then descend from the graph into the first child (in call order) that does not
    export on its own. Slow (one export per child tried), so only run after a failure."""
    calls, names = {}, {m: n for n, m in graph.named_modules()}
    record = lambda m, a, k: calls.setdefault(m, (a, k))  # noqa: E731
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in graph.modules()]
    try:
        with torch.no_grad():
            graph(*args)
    finally:
        for h in hooks:
            h.remove()

    def called_children(m):  # containers (ModuleList) are never called themselves: look inside
        for child in m.children():
            yield from [child] if child in calls else called_children(child)

    def fails(m) -> bool:
        call = _Call(m, *calls[m])
        try:
            _to_onnx(call, call.inputs(), opset, (None, None))
        except Exception:  # noqa: BLE001 - a probe: any failure of the export is the answer
            return True
        return False

    culprit = graph
    while (child := next((c for c in called_children(culprit) if fails(c)), None)) is not None:
        culprit = child
    name = names[culprit] or type(graph).__name__
    return f"{name} ({type(culprit).__name__})"


def _first_line(e: Exception) -> str:
    """The innermost cause's first line (the exporter's own says only which step failed), e.g.
    "DispatchError: No ONNX function found for <OpOverload(op='...')>", without colour codes."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def export_graph(graph, args, path: Path, what: str, opset: int, names, dynamic_shapes=None):
    """Export one graph to path (a temporary folder's file; the caller renames), check that
    onnxruntime loads it at the asked opset."""
    import onnx
    import onnxruntime as ort

    try:
        program = _to_onnx(graph, args, opset, names, dynamic_shapes)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; re-raised, named
        culprit = find_failing_module(graph, args, opset)
        raise ExportError(
            f"the {what} cannot be exported to ONNX (opset {opset}): {culprit} fails on its own; "
            f"{_first_line(e)}"
        ) from e
    got = {op.domain: op.version for op in program.model_proto.opset_import}.get("", None)
    if got != opset:
        raise ExportError(f"the {what} came out at opset {got}, not the asked {opset}")
    big = sum(p.numel() * p.element_size() for p in graph.parameters()) > 1.8 * 2**30
    program.save(str(path), external_data=big)  # protobuf's 2 GB limit: weights beside the file
    try:
        onnx.checker.check_model(str(path))
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnx/onnxruntime errors have no common base
        raise ExportError(
            f"the {what} ({path.name}, opset {opset}) does not load in onnxruntime "
            f"{ort.__version__}: {_first_line(e)}"
        ) from e


def preprocess_spec(cfg: model.SamConfig, opset: int, files=FILES) -> dict:
    """What a runner must do to an image before encoder.onnx, all read from the model's config."""
    S = cfg.image_size
    if cfg.resize_mode == "stretch":
        resize = (f"nearest resize to {S}x{S} ignoring the aspect ratio (source pixel floor(dst * "
                  f"H / {S}), OpenCV's INTER_NEAREST), after normalising; an image smaller than "
                  f"{S} on both sides is not resized but zero-padded, centred")  # fmt: skip
    else:
        resize = (f"longest side to {S} (sides int(H * k + 0.5)), antialiased bilinear on the "
                  f"8-bit image, rounded and clamped to 0..255, before normalising; zero-pad "
                  f"bottom/right to {S}x{S} after normalising")  # fmt: skip
    if cfg.intensity == "min_max":
        intensity = "per image: (x - min) / max(max - min, 1e-8) over all channels, before padding"
    else:
        intensity = "per channel, in channel_order: (x - pixel_mean) / pixel_std on 0..255 values"
    return {
        "model": cfg.name, "image_size": S, "embed_size": cfg.embed_size,
        "low_res_size": cfg.low_res_size, "channel_order": cfg.channel_order,
        "resize_mode": cfg.resize_mode, "resize": resize, "intensity": cfg.intensity,
        "intensity_rule": intensity, "pixel_mean": list(cfg.pixel_mean),
        "pixel_std": list(cfg.pixel_std), "pad_value": 0.0, "mask_threshold": cfg.mask_threshold,
        "layout": "NCHW float32, batch 1",
        "prompts": "x, y in model pixels: original * scale + pad (scale = content size / original "
                   "size per axis); labels 1 fg, 0 bg, 2/3 box corners, -1 padding point",
        "opset": opset, "files": files, "config": cfg.to_dict(),
    }  # fmt: skip


def export(sam: model.Sam, out_dir, opset: int = DEFAULT_OPSET, parts=tuple(FILES)) -> dict:
    """Write `parts` of encoder.onnx, decoder.onnx, decoder_single.onnx, and preprocess.json
    (whose "files" lists them) to out_dir. Returns {file name: path}.

    Every file is written in a temporary folder inside out_dir and renamed into place, so that an
    export that fails leaves out_dir as it was. sam is exported in fp32 through the reference
    kernels path and left on its configured path afterwards."""
    check_opset(opset)
    if not parts or set(parts) - set(FILES):
        raise ValueError(f"parts must be some of {list(FILES)}, not {list(parts)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sam = model.use_kernels(sam.float().eval(), "reference")  # Triton does not export
    try:
        return _export(sam, out_dir, opset, parts)
    finally:
        model.use_kernels(sam, sam.cfg.kernels)  # back to the configured path


def _export(sam: model.Sam, out_dir: Path, opset: int, parts) -> dict:
    enc_args, dec_args = example_inputs(sam.cfg)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        tmp = Path(tmp)
        if "encoder" in parts:
            what = f"image encoder (image_encoder, {type(sam.image_encoder).__name__})"
            names = (["image"], ["image_embeddings"])
            export_graph(EncoderGraph(sam), enc_args, tmp / FILES["encoder"], what, opset, names)
        for key, multimask in (("decoder", True), ("decoder_single", False)):
            if key in parts:
                what = "prompt decoder (prompt_encoder + mask_decoder)"
                names, dims = (DECODER_INPUTS, DECODER_OUTPUTS), _decoder_dynamic_shapes()
                graph = DecoderGraph(sam, multimask)
                export_graph(graph, dec_args, tmp / FILES[key], what, opset, names, dims)
        spec = preprocess_spec(sam.cfg, opset, {k: v for k, v in FILES.items() if k in parts})
        (tmp / PREPROCESS_JSON).write_text(json.dumps(spec, indent=1) + "\n")
        written = {}
        for f in sorted(tmp.iterdir()):  # the .onnx files and any external-data files
            os.replace(f, out_dir / f.name)
            written[f.name] = out_dir / f.name
    return written


# ------------------------------------------------------------------------------------------------
# Running the exported files, and timing them against the PyTorch path
# ------------------------------------------------------------------------------------------------


def session(path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def decoder_feed(emb, coords, labels, mask=None) -> dict:
    """numpy inputs of decoder.onnx from model-space prompts (already padded / with box corners)."""
    P = coords.shape[0]
    S4 = emb.shape[-1] * 4
    has = mask is not None
    mask = np.zeros((P, 1, S4, S4), np.float32) if mask is None else mask
    return {
        "image_embeddings": np.asarray(emb, np.float32),
        "point_coords": np.asarray(coords, np.float32),
        "point_labels": np.asarray(labels, np.float32),
        "mask_input": np.asarray(mask, np.float32),
        "has_mask_input": np.array([float(has)], np.float32),
    }


def _median_ms(fn, runs: int, warmup: int) -> float:
    times = []
    for _ in range(warmup + runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[warmup:]) * 1e3)


def bench(sam: model.Sam, out_dir, threads: int = 2, runs: int = 5, warmup: int = 2) -> dict:
    """Median latency (ms) of encoder and decoder (1 and 8 boxes): onnxruntime on out_dir's files
    vs our PyTorch path (cfg.kernels, "auto" by default) on the same weights, in one process with
    `threads` threads each; for the ViT encoder also PyTorch's reference path, the computation
    the ONNX graph holds. Not a test: the figures depend on the machine and its load."""
    torch.set_num_threads(threads)
    model.use_kernels(sam, sam.cfg.kernels)
    out_dir, S = Path(out_dir), sam.cfg.image_size
    enc = session(out_dir / FILES["encoder"], threads)
    dec = session(out_dir / FILES["decoder"], threads)
    x = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(0))
    res = {}
    with torch.inference_mode():
        emb = sam.encode(x)
        res["encoder"] = {
            "torch": _median_ms(lambda: sam.encode(x), runs, warmup),
            "onnxruntime": _median_ms(lambda: enc.run(None, {"image": x.numpy()}), runs, warmup),
        }
        if sam.cfg.encoder == "vit":  # TinyViT has no kernels path
            model.use_kernels(sam, "reference")
            res["encoder, reference"] = {"torch": _median_ms(lambda: sam.encode(x), runs, warmup)}
            model.use_kernels(sam, sam.cfg.kernels)
        for P in (1, 8):
            boxes = torch.tensor([[S * 0.2, S * 0.25, S * 0.7, S * 0.8]]).repeat(P, 1)  # (P, 4)
            coords = boxes.reshape(P, 2, 2).numpy()
            feed = decoder_feed(emb.numpy(), coords, np.tile([2.0, 3.0], (P, 1)))
            res[f"decoder, {P} box{'es' if P > 1 else ''}"] = {
                "torch": _median_ms(lambda: sam.decode(emb, boxes=boxes), runs, warmup),  # noqa: B023
                "onnxruntime": _median_ms(lambda: dec.run(None, feed), runs, warmup),  # noqa: B023
            }
    return res


def main(args) -> dict:
    sam = model.load_checkpoint(args.checkpoint, image_size=args.image_size)
    written = {}
    if not args.skip_export:
        try:
            written = export(sam, args.out_dir, opset=args.opset)
        except ExportError as e:
            raise SystemExit(f"{args.checkpoint}: {e}") from None
    for path in written.values():
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.bench:
        res = bench(sam, args.out_dir, threads=args.threads, runs=args.runs)
        cfg = sam.cfg
        print(f"{cfg.name}@{cfg.image_size} adapter={cfg.adapter} threads={args.threads}: median "
              f"of {args.runs} runs (ms); load {os.getloadavg()[0]:.2f}")  # fmt: skip
        for part, t in res.items():
            ort_ms = f"   onnxruntime {t['onnxruntime']:8.1f}" if "onnxruntime" in t else ""
            print(f"  {part:19s} torch {t['torch']:8.1f}{ort_ms}")
        return res
    return written


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="ours (.safetensors), SAM, SAM-Med2D or LiteMedSAM .pth")
    p.add_argument("out_dir")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--image-size", type=int, default=None, help="resample, e.g. SAM 1024 -> 256")
    p.add_argument("--bench", action="store_true", help="then time onnxruntime vs PyTorch")
    p.add_argument("--threads", type=int, default=2, help="for --bench, both runtimes")
    p.add_argument("--runs", type=int, default=5, help="for --bench")
    p.add_argument(
        "--skip-export", action="store_true", help="--bench the files in OUT_DIR as they are"
    )
    main(p.parse_args())
    sys.exit(0)
