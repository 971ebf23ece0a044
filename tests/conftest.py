"""Shared test setup.

TRITON_INTERPRET must be set before `kernels` (imported by model.py) defines its Triton kernels, so
that on a machine without a GPU the kernels run on the CPU through Triton's interpreter: it is set
here, at collection time, before any test module imports model or kernels.
"""

import importlib
import os
import signal
import sys
import types
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter; with one, natively (unless the
# caller sets TRITON_INTERPRET itself).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A shell without job control starts background commands with SIGINT ignored (POSIX), and an
# ignored SIGINT is inherited across exec: the CLIs that the Ctrl-C tests interrupt would never see
# it. With a handler here, the children start with the default disposition, whoever started pytest.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _install_torchvision_stand_in():
    """Meta's segment_anything imports four torchvision names at package import; the PyPI
    torchvision does not load beside the CPU torch, and the parity tests use none of them."""

    def unused(*args, **kwargs):
        raise NotImplementedError("torchvision stand-in: not available in the tests")

    names = {
        "torchvision.ops.boxes": ["batched_nms", "box_area"],
        "torchvision.transforms.functional": ["resize", "to_pil_image"],
    }
    for mod in ("torchvision", "torchvision.ops", "torchvision.transforms"):
        sys.modules.setdefault(mod, types.ModuleType(mod))
    for mod, attrs in names.items():
        m = types.ModuleType(mod)
        for a in attrs:
            setattr(m, a, unused)
        sys.modules[mod] = m


@pytest.fixture(scope="session")
def segment_anything():
    """Meta's reference package (test-only; installed by .ci/run with --no-deps)."""
    try:
        importlib.import_module("torchvision")
    except Exception:  # absent, or present but broken beside this torch
        for mod in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[mod]
        _install_torchvision_stand_in()
    return importlib.import_module("segment_anything")


@pytest.fixture(autouse=True)
def _float32_by_default(request, monkeypatch):
    """`--dtype auto` resolves to float32 in tests, so CLI outputs compare exactly with fp32
    references; tests/test_precision.py tests the bf16 fast path and the CPU check itself."""
    if request.path.name != "test_precision.py":
        import precision

        monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
