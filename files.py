"""Writing files so that nothing is lost or half-written, and reading JSON with errors that name
the file.

Every stage writes through `atomic_write`: the bytes go to a hidden temp file beside the target,
which is then renamed over it, so a reader sees the old file or the new one, never half of one,
and a killed run leaves no partial output. JSON is written strictly (no NaN/Infinity, which
strict parsers reject)."""

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def temp_path(path) -> Path:
    """The hidden temp name a writer of `path` uses: same folder (so the rename is atomic), this
    process's id (so concurrent writers do not share one), and the target's suffixes (so writers
    that pick the format from the name, like nibabel's .nii.gz, still work)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{''.join(path.suffixes)}")


def atomic_write(path, write) -> None:
    """write(tmp) into a temp file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _plain(value):
    """json.dumps' fallback for NumPy scalars and arrays."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_text(obj, indent=1) -> str:
    """Strict JSON: a NaN or infinity raises ValueError instead of writing a bare `NaN`."""
    try:
        return json.dumps(obj, indent=indent, default=_plain, allow_nan=False) + "\n"
    except ValueError as e:
        raise ValueError(f"refusing to write non-finite numbers as JSON ({e})") from None


def write_json(path, obj, indent=1) -> None:
    text = json_text(obj, indent)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_png(path, a: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(a).save(tmp, format="PNG"))


def read_json(path):
    """The parsed file; a missing file, undecodable bytes or malformed JSON name the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
