"""Command lines built from the stages' config dataclasses, and the one way a CLI reports an error.

Each stage documents its settings once, as a dataclass field with a trailing comment:

    lr: float = 1e-4  # Adam

`add_config_args(parser, TrainConfig)` turns every field into a flag (`--lr`), its type read
from the annotation (bool -> --x/--no-x, tuple -> a list, `X | None` -> X) and its help from the
comment, so the dataclass, its defaults and `--help` can never disagree. `main_guard` runs a
CLI's main and turns the errors a user can cause (bad files, bad flags, Ctrl-C) into one line on
stderr instead of a traceback."""

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing

import torch


def field_comments(cls) -> dict[str, str]:
    """field name -> its trailing `# comment` in the class source (absent: no comment)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.end_lineno - 1]
            tail = line[node.end_col_offset :].strip()
            if tail.startswith("#"):
                comments[node.target.id] = tail.lstrip("#").strip()
    return comments


def _base_type(annotation):
    """`int | None` -> int; `tuple[int, ...]` -> tuple; other annotations unchanged."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def _optional(annotation) -> bool:
    """Is None one of the annotation's types (`float | None`)?"""
    return type(None) in typing.get_args(annotation)


def _or_none(kind):
    """An argparse type: "none" -> None, anything else -> kind(text)."""

    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _element_type(annotation, default):
    """The element type of a tuple field: from `tuple[int, ...]`, else from its default's items."""
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    if args and all(isinstance(a, type) for a in args) and len(set(args)) == 1:
        return args[0]
    kinds = {type(v) for v in default or ()}
    return kinds.pop() if len(kinds) == 1 else str


def add_config_args(parser, cls, skip=(), suppress_defaults=False, **overrides) -> None:
    """One `--flag` per field of the dataclass `cls` (except `skip`). `overrides[name]` is a dict
    of add_argument keywords that replace the derived ones (choices, a custom type, nargs...).
    With suppress_defaults, absent flags stay out of the namespace (the caller can tell which
    settings were given, e.g. to resume a run); the help still shows the dataclass default."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _base_type(hints[f.name])
        if kind is bool:
            kw = dict(action=argparse.BooleanOptionalAction)
        elif kind is tuple:
            kw = dict(type=_element_type(hints[f.name], default), nargs="+")
        elif kind in (int, float) and _optional(hints[f.name]):  # a str keeps "none" as text
            kw = dict(type=_or_none(kind), metavar=f"{kind.__name__.upper()}|none")
        else:
            kw = dict(type=kind)
        kw.update(overrides.get(f.name, {}))
        shown = ", ".join(map(str, default)) if isinstance(default, tuple) else default
        shown = str(shown).replace("%", "%%")
        help_text = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        kw.setdefault(
            "help", f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
        )
        kw["default"] = argparse.SUPPRESS if suppress_defaults else default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def config_values(cls, namespace) -> dict:
    """The fields of `cls` that the parsed namespace (or dict) holds, tuples as tuples."""
    given = namespace if isinstance(namespace, dict) else vars(namespace)
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in names}


def main_guard(main, argv_namespace, prog: str) -> typing.NoReturn:
    """sys.exit(main(args)) where errors a user can cause are one line on stderr: exit 2 for a bad
    input or setting (ValueError, a missing/existing file, other OS errors), 130 for Ctrl-C."""
    try:
        status = main(argv_namespace)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto": this process's GPU when CUDA is available (cuda:LOCAL_RANK under torchrun), else
    the CPU; anything else as torch spells it ("cpu", "cuda:1"). A missing GPU is a clear error."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"--device {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available (use cpu or auto)")
    return device
