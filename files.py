"""Files: writing them so that nothing is lost or half-written, reading them (JSON, images, label
maps) with errors that name the file, and the one rule for a file's name without its suffix.

Every stage writes through `atomic_write`: the bytes go to a hidden temp file beside the target,
which is then renamed over it, so a reader sees the old file or the new one, never half of one,
and a killed run leaves no partial output. Files that belong together (a mask, its overlay, its
record) go through an `OutputSet`: all written as temp files first, then renamed as a group under
a lock, so concurrent runs onto the same outputs leave one run's set, never a mix. JSON is written
strictly (no NaN/Infinity, which strict parsers reject).

`stem` (".nii.gz"-aware) names every stage's outputs. Reading is strict too: JSON, images and
label maps (the masks data.read_mask turns into bool) are checked as they are read, and a bad
file is an error whose message starts with its path (`DataError` for a bad input file)."""

import contextlib
import fcntl
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

VOLUME_SUFFIXES = (".nii.gz", ".nii")  # the files the stages read as NIfTI volumes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # ... and as 2D images


def stem(path) -> str:
    """A file's name without its format suffix: "scan.nii.gz" -> "scan", "p01_a.png" -> "p01_a"."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def temp_path(path) -> Path:
    """The hidden temp name a writer of `path` uses: same folder (so the rename is atomic), this
    process's id (so concurrent writers do not share one), and the target's suffixes (so writers
    that pick the format from the name, like nibabel's .nii.gz, still work)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{''.join(path.suffixes)}")


def stale_temps(folder, name: str) -> list[Path]:
    """The temp files (temp_path) of `folder`/`name` that no other live process is writing: a
    killed run's leftovers (and this process's own, when called before it writes)."""
    stale = []
    for tmp in Path(folder).glob(f".{name}.*.tmp*"):
        pid = tmp.name[len(name) + 2 :].split(".")[0]
        if not (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))):
            stale.append(tmp)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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


class OutputSet:
    """Files written as one group: `write` puts each into a temp file beside its target; `commit`
    then renames them all while holding an exclusive lock on their folders, after re-checking
    (unless `overwrite`) that none of the targets has appeared since the run checked at its start.
    Two runs onto the same outputs therefore leave one run's complete set (with overwrite: the
    later commit's; without: the second run fails), never a mix. Used as a context manager,
    whatever was not committed (an error, Ctrl-C) is removed on exit."""

    def __init__(self, overwrite: bool = False):
        self.overwrite = overwrite
        self.temps = {}  # target path -> its temp file, written and not yet committed

    def write(self, path, write) -> None:
        """write(tmp) into the temp file of `path` (created folders stay; files only at commit)."""
        path = Path(path)
        if path in self.temps:
            raise ValueError(f"{path}: written twice in one output set")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.temps[path] = temp_path(path)
        write(self.temps[path])

    def write_json(self, path, obj, indent=1) -> None:
        text = json_text(obj, indent)
        self.write(path, lambda tmp: tmp.write_text(text))

    def write_png(self, path, a: np.ndarray) -> None:
        self.write(path, lambda tmp: Image.fromarray(a).save(tmp, format="PNG"))

    def commit(self) -> None:
        """Rename every temp file onto its target, as one step under the folders' locks."""
        with folder_locks({p.parent for p in self.temps}):
            exists = [str(p) for p in self.temps if p.exists()]
            if exists and not self.overwrite:
                raise FileExistsError(
                    f"output exists: {', '.join(exists[:5])} (written by another run while this "
                    "one worked; use --force to overwrite)"
                )
            for path, tmp in self.temps.items():
                os.replace(tmp, path)
        self.temps = {}

    def discard(self) -> None:
        for tmp in self.temps.values():
            tmp.unlink(missing_ok=True)
        self.temps = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


@contextlib.contextmanager
def folder_locks(folders):
    """Exclusive flock()s on the folders themselves (no lock files left behind), taken in sorted
    order so that two processes locking overlapping sets cannot deadlock; the kernel releases them
    if the process dies."""
    fds = []
    try:
        for folder in sorted({str(Path(f).resolve()) for f in folders}):
            fds.append(os.open(folder, os.O_RDONLY))
            fcntl.flock(fds[-1], fcntl.LOCK_EX)
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)  # closing the descriptor releases its lock


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


# ------------------------------------------------------------------------------------------------
# Reading images and label maps strictly: a bad file is a DataError that names it
# ------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A bad input file; the message starts with the file's path and says what is wrong."""


def open_image(path) -> Image.Image:
    """An image file, opened and loaded by Pillow: one frame, else a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        im = Image.open(path)
        im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    if getattr(im, "n_frames", 1) > 1:
        raise DataError(f"{path}: multi-frame image ({im.n_frames} frames); convert to NIfTI")
    return im


def read_label_map(path, shape=None, image=None) -> np.ndarray:
    """A mask or label map file -> (H, W) int64 of non-negative integer labels. With `shape`, the
    (H, W) of the image it belongs to (named by `image`), a mask of another size is an error."""
    im = open_image(path)
    if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
        rgb = np.asarray(im.convert("RGB"))  # (H, W, 3)
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
            raise DataError(f"{path}: colour mask (channels differ); masks must be grey labels")
        a = rgb[..., 0]
    elif im.mode in ("LA", "PA"):
        a = np.asarray(im)[..., 0]  # P keeps its palette indices: they are the labels
    else:
        a = np.asarray(im)
    if shape is not None and a.shape != tuple(shape):
        (h, w), (H, W) = a.shape, shape
        of = f" {image}" if image else ""
        raise DataError(f"{path}: mask is {w}x{h} but its image{of} is {W}x{H}")
    check_labels(a, path)
    return a.astype(np.int64)


def check_labels(a: np.ndarray, path) -> None:
    """Labels (a 2D mask file or a label volume) must be finite non-negative integers."""
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise DataError(f"{path}: labels contain NaN or inf")
        frac = a != np.round(a)
        if frac.any():
            raise DataError(f"{path}: non-integer labels (e.g. {a[frac][0]:g})")
    if a.size and a.min() < 0:
        raise DataError(f"{path}: negative label {a.min():g}")


def is_binary(labels: np.ndarray) -> bool:
    """0/1 or 0/255 (an all-zero mask included): the two ways a binary mask is stored."""
    hi = int(labels.max()) if labels.size else 0
    return hi in (0, 1, 255) and bool(((labels == 0) | (labels == hi)).all())
