"""Writing files so that nothing is lost or half-written, and reading JSON with errors that name
the file.

Every stage writes through `atomic_write`: the bytes go to a hidden temp file beside the target,
which is then renamed over it, so a reader sees the old file or the new one, never half of one,
and a killed run leaves no partial output. Files that belong together (a mask, its overlay, its
record) go through an `OutputSet`: all written as temp files first, then renamed as a group under
a lock, so concurrent runs onto the same outputs leave one run's set, never a mix. JSON is written
strictly (no NaN/Infinity, which strict parsers reject)."""

import contextlib
import fcntl
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
