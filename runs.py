"""train.py's run directory and its chores: the checks before a run, saving (and validating) at a
checkpoint, resuming, config.json, log.jsonl and the closing summary.

    OUT/config.json        what ran: the settings, the model preset and checkpoint file, the steps
    OUT/log.jsonl          one JSON line per --log-every steps and per validation
    OUT/last.safetensors   the latest model (weights + config; loadable by infer.py)
    OUT/best.safetensors   the best model by validation score
    OUT/state.pt           what changes while training (trainable weights, Adam, GradScaler, the
                           step-level generator, the step, the best score, the config): it alone
                           decides where --resume continues; it loads with weights_only=True

A save writes last.safetensors, then state.pt, each to a temp file renamed into place. state.pt
holds every trainable weight, so a run killed between the two resumes consistently from the older
state.pt (the frozen weights are the same in both files). A fresh run refuses a non-empty
directory unless --force; a resumed one drops the log lines of steps it will run again. Temp files
left by a killed run are removed by the next run in that directory.
"""

import datetime
import json
import os
import resource
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import checkpoints
import cli
import data
import files
import model

RUN_FILES = ("config.json", "log.jsonl", "last.safetensors", "best.safetensors", "state.pt")

# ------------------------------------------------------------------------------------------------
# Before the first step: settings, data, the directory
# ------------------------------------------------------------------------------------------------


def resolve_config(args: dict, config_cls, overrides: tuple) -> tuple:
    """-> (config, saved state or None). A resumed run takes its config from state.pt; only the
    settings named in `overrides` may differ."""
    if not args.get("resume"):
        return config_cls(**args), None
    state = read_state(Path(args["resume"]))
    fixed = [k for k in args if k not in overrides]
    if fixed:
        raise ValueError(f"--resume continues a run as it was configured; cannot change {fixed}")
    saved = state.get("config")
    unknown = sorted(set(saved or {}) - {f.name for f in fields(config_cls)})
    if not isinstance(saved, dict) or unknown:
        raise ValueError(f"{args['resume']}/state.pt: not a training state of this train.py "
                         f"(unknown settings: {unknown or 'no config'})")  # fmt: skip
    # stop_after belongs to the run that set it; the resumed one goes on unless told otherwise
    cfg = config_cls(**{**saved, "stop_after": None, **args, "out": args["resume"]})
    return cfg, state


def check_data(cfg) -> None:
    """Fail before any work: the manifests exist and parse, the first image and mask read, and
    the val split has masks when validation is on (cfg: a train.TrainConfig)."""
    train = data.read_manifest(cfg.data, "train")
    if not train:
        raise ValueError(f"{cfg.data}: the train split is empty")
    image, masks = next(iter(train.items()))
    data.read_image(image)
    for m in masks[:1]:
        data.read_mask(m)
    if cfg.val_every:
        root = Path(cfg.val_data or cfg.data)
        if not any(data.read_manifest(root, "val").values()):  # raises if there is no val split
            name = next(f"{root / f}" for f in ("image2label_val.json", "label2image_val.json")
                        if (root / f).is_file())  # fmt: skip
            raise ValueError(
                f"{name}: the val split lists no masks, but --val-every {cfg.val_every} asks for "
                "validation: rebuild the dataset with validation cases (prepare.py --split), "
                "point --val-data at a dataset with a val split, or pass --val-every 0 to train "
                "without validation (then there is no best.safetensors)"
            )


def prepare_dir(out: Path, state: dict | None, force: bool, rank: int = 0) -> None:
    """A fresh run: check_fresh. A resumed one: remove killed runs' temp files, and drop the log
    lines of the steps after state.pt's (they run again). Only rank 0 changes files."""
    if state is None:
        return check_fresh(out, force, remove=rank == 0)
    if rank != 0:
        return
    clean_temps(out)
    if dropped := trim_log(out / "log.jsonl", state["step"]):
        print(f"{out}/log.jsonl: dropped {dropped} lines after step {state['step']} (run again)")


def check_fresh(out: Path, force: bool, remove: bool = True) -> None:
    """A fresh run starts in a new or empty directory. With force, the files of the earlier run
    (RUN_FILES and their temp files) are removed (if `remove`); anything else stays."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out is a file, not a run directory")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return
    if not force:
        shown = ", ".join(present[:6]) + (", ..." if len(present) > 6 else "")
        hint = f"--resume {out} to continue its run, " if "state.pt" in present else ""
        raise FileExistsError(f"{out}: not empty ({shown}); {hint}--force to start over in "
                              "it (removes the earlier run's files), or another --out")  # fmt: skip
    if not remove:
        return
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    clean_temps(out)


def clean_temps(out: Path) -> list[str]:
    """Remove the temp files (files.temp_path) of RUN_FILES left by killed processes; a live
    process's are kept. -> the names removed."""
    removed = []
    for name in RUN_FILES:
        for tmp in files.stale_temps(out, name):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    if removed:
        print(f"{out}: removed temp files of a killed run: {', '.join(removed)}")
    return removed


# ------------------------------------------------------------------------------------------------
# The starting weights and the run's plan (steps, data position, config.json)
# ------------------------------------------------------------------------------------------------


def checkpoint_file(cfg):
    """The file a fresh run starts from: --checkpoint (a path or a known name), infer.py's
    default (LiteMedSAM) without one; None for --checkpoint none (random init)."""
    if cfg.checkpoint == "none":
        return None
    return checkpoints.resolve_checkpoint(cfg.checkpoint) if cfg.checkpoint else (
        checkpoints.default_checkpoint())  # fmt: skip


def build_model(cfg, device) -> model.Sam:
    if (path := checkpoint_file(cfg)) is not None:
        return model.load_checkpoint(path, image_size=cfg.image_size, adapter=cfg.adapter,
                                     device=device, seed=cfg.seed,
                                     conventions=cfg.input_conventions,
                                     decoder_heads=cfg.decoder_heads)  # fmt: skip
    mcfg = model.SamConfig.from_name(cfg.model, image_size=cfg.image_size, adapter=cfg.adapter)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(cfg.seed)
        return model.Sam(mcfg).to(device)


def plan_run(tr, state: dict | None) -> tuple:
    """-> (dataset, steps per epoch, total steps, first step, end of this run, best (score,
    step)); config.json written. The step alone fixes the data position (epoch, batch), the lr."""
    cfg, out = tr.cfg, Path(tr.cfg.out)
    ds = data.TrainDataset(cfg.data, tr.sam.cfg, masks_per_image=cfg.masks_per_image,
                           seed=cfg.seed, mask_sampling=cfg.mask_sampling,
                           box_rule=cfg.box_rule)  # fmt: skip
    spe = len(ds) // cfg.batch_size
    if spe == 0:
        raise ValueError(f"{cfg.data}: {len(ds)} training images, fewer than the batch size")
    if state and state["steps_per_epoch"] != spe:
        raise ValueError(f"{cfg.data}: the dataset changed since the run started ({spe} steps "
                         f"per epoch, not {state['steps_per_epoch']})")  # fmt: skip
    total = cfg.steps or cfg.epochs * spe
    start = state["step"] if state else 0
    best = (state["best"], state.get("best_step")) if state else (-1.0, None)
    end = min(total, start + cfg.stop_after) if cfg.stop_after else total
    if tr.rank == 0:
        source = out / "last.safetensors" if state else checkpoint_file(cfg) or "none (random init)"
        write_config(out, asdict(cfg), tr.sam.cfg, total, start, source)
    return ds, spe, total, start, end, best


# ------------------------------------------------------------------------------------------------
# Processes (DDP) and the data order
# ------------------------------------------------------------------------------------------------


def setup_distributed(device: str) -> tuple:
    """-> (rank, world size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPUs,
    gloo on CPUs."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    device = cli.resolve_device(device, local)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    if world > 1:
        # Generous timeout: the other processes wait while rank 0 validates.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))  # fmt: skip
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return int(os.environ.get("RANK", "0")), world, device


def mean_over_processes(tr, losses: dict) -> dict:
    if tr.world == 1:
        return losses
    t = torch.tensor(list(losses.values()), dtype=torch.float64, device=tr.device)
    dist.all_reduce(t)
    return dict(zip(losses, (t / tr.world).tolist(), strict=True))


def batches(ds, cfg, rank: int, world: int, step: int, spe: int):
    """The micro-batches of every step from `step` to the end of its epoch, on this process.

    The DistributedSampler's permutation depends on (seed, epoch) only, and process r takes every
    world-th index: so the images of a global step are the same whatever the number of processes."""
    epoch, first = divmod(step, spe)
    ds.set_epoch(epoch)
    sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    local = cfg.batch_size // world
    indices = list(sampler)[first * local : spe * local]
    loader = DataLoader(ds, batch_size=local // cfg.grad_accum, sampler=indices,
                        num_workers=cfg.workers, drop_last=True)  # fmt: skip
    it = iter(loader)
    for _ in range(spe - first):
        yield [next(it) for _ in range(cfg.grad_accum)]


# ------------------------------------------------------------------------------------------------
# Saving and resuming
# ------------------------------------------------------------------------------------------------


def save_state(tr, step: int, best: tuple, spe: int) -> None:
    """last.safetensors, then state.pt (the module docstring says why in this order) of a
    train.Trainer after `step` steps; best = (score, step)."""
    out = Path(tr.cfg.out)
    trainable = {n: p.detach().cpu() for n, p in tr.sam.named_parameters() if p.requires_grad}
    state = dict(step=step, epoch=step // spe, batch_in_epoch=step % spe, steps_per_epoch=spe,
                 best=best[0], best_step=best[1], trainable=trainable,
                 optimizer=tr.opt.state_dict(), scaler=tr.scaler.state_dict(),
                 generator=tr.gen.get_state(), config=asdict(tr.cfg))  # fmt: skip
    model.save_checkpoint(tr.sam, out / "last.safetensors")
    files.atomic_write(out / "state.pt", lambda tmp: torch.save(state, tmp))


def checkpoint(tr, step: int, best: tuple, spe: int, record: dict, validate) -> tuple:
    """At a validation point of train.main: rank 0 validates (validate(sam, cfg), one console
    line), keeps best.safetensors by the score, saves; all processes wait. best: (score, step)
    -> the new best."""
    out = Path(tr.cfg.out)
    if tr.rank == 0:
        if tr.cfg.val_every:
            val = validate(tr.sam, tr.cfg)
            improved = val["score"] > best[0]
            if improved:
                best = (val["score"], step)
                model.save_checkpoint(tr.sam, out / "best.safetensors")
            log_line(out / "log.jsonl", dict(step=step, val=val, best=best[0], best_step=best[1]))
            record["val"] = val
            dice = "  ".join(f"{k} {v:.4f}" for k, v in val["dice"].items())
            tqdm.write(f"step {step}: validation Dice {dice}  mean {val['score']:.4f}  "
                       + ("(best so far: best.safetensors)" if improved
                          else f"(best {best[0]:.4f} at step {best[1]})"))  # fmt: skip
        save_state(tr, step, best, spe)
    if tr.world > 1:
        b = torch.tensor([best[0], -1 if best[1] is None else best[1]], dtype=torch.float64,
                         device=tr.device)  # fmt: skip
        dist.broadcast(b, 0)  # also makes every process wait for rank 0
        best = (float(b[0]), None if b[1] < 0 else int(b[1]))
    return best


def read_state(run_dir: Path) -> dict:
    """state.pt of a run to resume, with an error that names what is missing and why."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory to resume")
    missing = [n for n in ("state.pt", "last.safetensors") if not (run_dir / n).is_file()]
    if missing == ["state.pt"]:
        raise FileNotFoundError(
            f"{run_dir}/state.pt is missing (last.safetensors is there): the run was stopped "
            "before its first training state was saved (killed while writing it?), so there is "
            f"nothing to resume; start it again with --out {run_dir} --force"
        )
    if missing:
        raise FileNotFoundError(f"{run_dir}: cannot resume: {' and '.join(missing)} missing")
    try:
        return torch.load(run_dir / "state.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{run_dir}/state.pt: cannot read training state: {e}") from None


def restore(sam: model.Sam, opt, scaler, gen: torch.Generator, state: dict) -> None:
    """Copy a state.pt's trainable weights, Adam, GradScaler and generator into a fresh trainer."""
    named = {n: p for n, p in sam.named_parameters() if p.requires_grad}
    if set(named) != set(state["trainable"]):
        raise ValueError("state.pt: its trainable parameters do not match the model's")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(state["trainable"][n])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    gen.set_state(state["generator"])


# ------------------------------------------------------------------------------------------------
# What a person reads: config.json, log.jsonl, the closing summary
# ------------------------------------------------------------------------------------------------


def write_config(out: Path, settings: dict, mcfg, total: int, start: int, source) -> None:
    """config.json: the settings, and what they resolved to (the model preset and size the
    checkpoint holds, the file it came from, the number of steps; epochs only if they decided)."""
    ran = dict(settings, model=mcfg.name, image_size=mcfg.image_size, checkpoint_file=str(source),
               steps=total, epochs=None if settings["steps"] else settings["epochs"],
               started_at_step=start)  # fmt: skip
    files.write_json(out / "config.json", ran)


def print_summary(out: Path, start: int, end: int, total: int, best: tuple) -> None:
    lines = [f"trained steps {start}..{end} of {total}; in {out}:"]
    if best[1] is not None:
        lines.append(f"  best.safetensors  validation score {best[0]:.4f} (mean Dice of box, 1, "
                     f"3, 5 points) at step {best[1]}")  # fmt: skip
    else:
        lines.append("  (no validation with --val-every 0, so no best.safetensors)")
    resume = f" (python train.py --resume {out} continues)" if end < total else ""
    lines += [
        f"  last.safetensors  the model at step {end}",
        f"  log.jsonl, config.json, state.pt{resume}",
    ]
    print("\n".join(lines))


def trim_log(path: Path, step: int) -> int:
    """Keep the log lines up to `step` (the resumed one): the steps after it run again. A torn
    last line (a kill while appending) goes too. -> lines dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            keep.append(line)
    if len(keep) < len(lines):
        files.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))
    return len(lines) - len(keep)


def log_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
