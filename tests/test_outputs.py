"""outputs.py's and files.py's pieces on their own, against hand-made expectations: prompt-file
parsing and its errors, the label map of overlapping masks (chunked and not), the mask PNG's
values, the overlay, the NIfTI slice writer as the inverse of data.volume_slice, the output checks
(existing, colliding, inputs, unwritable) and the output set's group commit. The whole command
runs in test_infer.py."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import files
import infer
import outputs
from infer import Prompt


def test_parse_entry_reads_nifti_options_and_fills_defaults(tmp_path):
    entry = {"prompts": [{"box": [1, 2, 30, 40]}, {"points": [[5, 6], [7, 8]], "labels": [1, 0]}]}
    defaults = {"slice": 3, "axis": "y", "box3d": None, "window": "lung"}
    job = outputs.parse_entry(tmp_path / "v.nii.gz", entry, defaults)
    assert job.prompts == [
        Prompt(box=[1.0, 2.0, 30.0, 40.0]),
        Prompt(points=[[5.0, 6.0], [7.0, 8.0]], labels=[1, 0]),
    ]
    assert (job.slice, job.axis, job.window) == (3, "y", "lung")
    job = outputs.parse_entry(tmp_path / "v.nii", {"slice": 1, "window": [40, 400], "prompts": []})
    assert (job.slice, job.window) == (1, (40.0, 400.0))
    job = outputs.parse_entry(tmp_path / "a.png", [{"points": [[5, 6]]}], defaults)
    assert (job.slice, job.axis, job.window) == (None, "z", None)  # NIfTI options skip 2D files
    assert job.prompts[0].labels == [1]  # a point without a label is foreground


def test_malformed_prompt_entries_are_clear_errors(tmp_path):
    """Wrong JSON types are a ValueError saying what is wrong (the CLI adds the file name), never
    a TypeError from deep inside."""
    cases = [
        ([{"points": 5}], "prompt 0: points must be"),
        ([{"box": [1, 1, 5, 5]}, {"points": [[1, 2]], "labels": 1}], "prompt 1: labels must be"),
        ([{"points": [[1, 2]], "labels": [2]}], "prompt 0: point labels are 1"),
        ([{"box": [1, "a", 5, 5]}], "prompt 0: coordinates must be numbers"),
        ([{"colour": 1}], "prompt 0: a prompt is"),
        ({"prompts": 7}, "prompts must be a list"),
        ({"slice": "3", "prompts": [{"box": [1, 1, 5, 5]}]}, "slice must be"),
        ({"slice": True, "prompts": [{"box": [1, 1, 5, 5]}]}, "slice must be"),
        ({"axis": "w", "prompts": []}, "axis must be"),
        ({"box3d": [1, 1, "a", 5, 5, 2]}, "box3d is"),
        ({"box3d": [1, 1, 0, 5, 5, 2], "prompts": [{"box": [1, 1, 5, 5]}]}, "box3d is"),
        ({"window": "no_such_window", "prompts": []}, "window is one of"),
        ({"window": ["nan", 100], "prompts": []}, "window LEVEL WIDTH must be finite"),
        ({"window": [40, 0], "prompts": []}, "window LEVEL WIDTH must be finite with WIDTH > 0"),
        ({"window": [40, -10], "prompts": []}, "window LEVEL WIDTH must be finite"),
        ({"window": [40, True], "prompts": []}, "window is one of"),
        ({"prompts": [], "extra": 1}, "an entry is"),
        # issue 13.10: strings and booleans are not coordinates, nor labels
        ([{"box": [1, "10", 5, 5]}], "prompt 0: coordinates must be numbers"),
        ([{"box": [True, 1, 5, 5]}], "prompt 0: coordinates must be numbers"),
        ([{"points": [[1, False]]}], "prompt 0: coordinates must be numbers"),
        ([{"points": [[1, 2]], "labels": [True]}], "prompt 0: point labels are 1"),
        ({"box3d": [1, 1, 0, 5, "5", 2]}, "box3d is"),
        # issue 13.10: --slice with --box3d is an error, not silently ignored
        ({"slice": 1, "box3d": [1, 1, 0, 5, 5, 2]}, "box3d is .* replaces other prompts and the"),
    ]
    for entry, msg in cases:
        with pytest.raises(ValueError, match=f"^{msg}"):
            outputs.parse_entry(tmp_path / "v.nii.gz", entry)


def _seg(logits):
    """A Segmentation whose geometry maps the low-res logits to the original size unchanged (an
    S x S low-res grid is upsampled to S x S, the identity, and cropped to (H, W)): the label map
    can then be checked by hand."""
    logits = torch.tensor(logits, dtype=torch.float32)  # (P, H, W)
    P, H, W = logits.shape
    S = max(H, W)
    low = torch.full((P, 1, S, S), -5.0)
    low[:, 0, :H, :W] = logits
    geom = data.Geometry((H, W), S, "stretch", (1.0, 1.0), (0, 0), (H, W))
    return infer.Segmentation(low, np.zeros(P), geom)


def test_label_map_gives_overlaps_to_the_highest_logit():
    logits = [[[2.0, 0.5, -1, -1]], [[-1, 3.0, 1.0, -2]]]  # (P=2, H=1, W=4): both claim pixel 1
    ids, areas = _seg(logits).label_map()
    np.testing.assert_array_equal(ids, [[1, 2, 2, 0]])
    assert ids.dtype == np.uint8 and areas.tolist() == [2, 2]
    ids, _ = _seg([[[1.0, 1.0]], [[1.0, 0.5]]]).label_map()
    assert ids.tolist() == [[1, 1]]  # a tie goes to the first prompt, as numpy's argmax does
    many = np.full((300, 1, 2), -1.0)
    many[299, 0, 1] = 1.0
    ids, areas = _seg(many).label_map()
    assert ids.dtype == np.uint16 and ids.tolist() == [[0, 300]] and areas.sum() == 1


def test_chunked_label_map_equals_the_whole_stack(monkeypatch):
    """Issue 13.4: masks are made a chunk of prompts at a time; any chunking gives the label map
    (and areas) that the whole (P, H, W) stack gives by numpy's argmax over claimed pixels."""
    gen = torch.Generator().manual_seed(0)
    P, (H, W) = 9, (300, 280)
    low = torch.randn(P, 1, 64, 64, generator=gen) * 3 + 1  # (P, 1, 64, 64): much overlap
    seg = infer.Segmentation(low, np.zeros(P), data.geometry(H, W, 256, "stretch"))
    full = seg.geom.logits_to_original(low)[:, 0].numpy()  # (P, H, W), all at once
    claimed = full > 0
    want = np.where(claimed.any(0), np.where(claimed, full, -np.inf).argmax(0) + 1, 0)
    assert len(np.unique(want)) == P + 1  # every prompt wins somewhere: the check is not vacuous
    for chunk in (1, 2, 4, P, 100):
        ids, areas = seg.label_map(chunk)
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_array_equal(areas, claimed.sum((1, 2)))
    monkeypatch.setattr(infer, "CHUNK_BYTES", 3 * 4 * H * W)  # the default: 3 prompts a chunk
    assert [len(lg) for _, lg in seg.chunks()] == [3, 3, 3]
    np.testing.assert_array_equal(seg.label_map()[0], want)
    np.testing.assert_array_equal(seg.masks, claimed)
    np.testing.assert_array_equal(seg.logits, full)


def test_mask_png_is_0_255_for_one_prompt_and_ids_for_several():
    np.testing.assert_array_equal(outputs.mask_image(np.array([[1, 0]], np.uint8), 1), [[255, 0]])
    np.testing.assert_array_equal(outputs.mask_image(np.array([[1, 2]], np.uint8), 2), [[1, 2]])


def test_overlay_enlarges_small_images_and_outlines_boxes_in_their_own_colour():
    """Issue 12.6: a 45x120 (HxW) image's overlay is enlarged by whole pixels (5x: 225x600), the
    mask tinted, the box outlined in a colour no mask has; a large image stays as it is."""
    assert outputs.BOX_COLOUR not in outputs.PALETTE
    assert not set(outputs.POINT_COLOURS.values()) & set(outputs.PALETTE)
    image = np.full((45, 120, 3), 100, np.uint8)
    ids = np.zeros((45, 120), np.uint8)
    ids[10:30, 20:60] = 1
    box = [15, 5, 70, 40]  # x0 y0 x1 y1, x1 and y1 exclusive
    ov = outputs.overlay(image, ids, [Prompt(box=box)], alpha=0.5)
    assert outputs.display_scale((45, 120)) == 5 and ov.shape == (225, 600, 3)
    tint = np.round(0.5 * 100 + 0.5 * np.array(outputs.PALETTE[0])).astype(np.uint8)
    assert (ov[15 * 5 : 25 * 5, 25 * 5 : 55 * 5] == tint).all()  # inside the mask
    assert (ov[:20, :] == 100).all()  # above the box, outside the mask
    # the outline runs along the box's outermost pixels, enlarged: columns 75 and 349
    assert (ov[5 * 5 + 10 : 40 * 5 - 10, 15 * 5] == outputs.BOX_COLOUR).all()
    assert (ov[5 * 5 + 10 : 40 * 5 - 10, 70 * 5 - 1] == outputs.BOX_COLOUR).all()
    assert (ov[5 * 5 + 10 : 40 * 5 - 10, 70 * 5] != outputs.BOX_COLOUR).any()
    big = outputs.overlay(np.zeros((600, 520, 3), np.uint8), np.zeros((600, 520), np.uint8),
                          [Prompt(box=[1, 1, 9, 9])], alpha=0.5)  # fmt: skip
    assert outputs.display_scale((600, 520)) == 1 and big.shape == (600, 520, 3)


def test_folder_outputs_keep_the_whole_input_name():
    """Issue 13.2: a.png and a.nii.gz (or a.tif) get outputs that cannot collide."""
    names = ["a.png", "a.nii.gz", "a.tif", "sub/a.png"]
    outs = [outputs.folder_outputs(Path("o"), n, True) for n in names]
    paths = [str(p) for o in outs for p in o.values()]
    assert len(set(paths)) == len(paths)
    want = ["o/a.nii.gz.mask.nii.gz", "o/a.nii.gz.overlay.png", "o/a.nii.gz.json"]
    assert [str(p) for p in outs[1].values()] == want
    assert str(outs[0]["mask"]) == "o/a.png.mask.png"
    assert str(outs[3]["json"]) == "o/sub/a.png.json"


def test_put_slice_inverts_data_volume_slice():
    vol = np.zeros((6, 5, 4), np.int32)  # canonical RAS+: x -> right, y -> anterior, z -> up
    vol[5, 4, 2] = 7  # right, anterior, slice 2
    img = data.volume_slice(vol, "z", 2)
    assert img.shape == (5, 6) and img[0, 0] == 7  # radiological: anterior top, right on the left
    vol = np.random.default_rng(0).integers(0, 9, (6, 5, 4))
    for axis, ax in data.AXES.items():
        out = np.zeros_like(vol)
        data.put_slice(out, axis, 1, data.volume_slice(vol, axis, 1))
        np.testing.assert_array_equal(np.take(out, 1, ax), np.take(vol, 1, ax))
        assert np.count_nonzero(np.delete(out, 1, ax)) == 0  # only that slice is written


def test_check_outputs_refuses_existing_files_unless_forced(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    paths = [tmp_path / "a.png", tmp_path / "b.png", None]
    with pytest.raises(FileExistsError, match=r"a\.png \(use --force"):
        outputs.check_outputs(paths, force=False)
    outputs.check_outputs(paths, force=True)
    outputs.check_outputs([tmp_path / "b.png", None], force=False)


def test_check_outputs_refuses_collisions_inputs_and_unwritable_places(tmp_path):
    """Issue 13.1 (two outputs one file, however spelt), 13.10 (an output that is an input, even
    with --force; a folder that cannot be written)."""
    m = tmp_path / "m.png"
    with pytest.raises(ValueError, match="two outputs are the same file"):
        outputs.check_outputs([m, None, tmp_path / "x" / ".." / "m.png"], force=True)
    os.symlink(m, tmp_path / "link.png")
    with pytest.raises(ValueError, match="two outputs are the same file"):
        outputs.check_outputs([m, tmp_path / "link.png"], force=True)
    img = tmp_path / "img.png"
    img.write_bytes(b"x")
    os.link(img, tmp_path / "hard.png")
    for out in (img, tmp_path / "." / "img.png", tmp_path / "hard.png"):
        with pytest.raises(ValueError, match="is the input .*img.png: refusing to write over"):
            outputs.check_outputs([out], force=True, inputs=[img])
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        outputs.check_outputs([img / "sub" / "m.png"], force=False)
    with pytest.raises(PermissionError, match="cannot write in /proc"):
        outputs.check_outputs([Path("/proc/no_such_dir/m.png")], force=False)
    assert not list(tmp_path.glob(".*probe"))  # the probe file is gone


def test_output_set_renames_as_a_group_and_rechecks_at_commit(tmp_path):
    """Issue 13.3: nothing is visible before commit; a target that appeared meanwhile stops the
    commit (without overwrite) with every file left as it was; an error removes the temps."""
    a, b = tmp_path / "a.png", tmp_path / "sub" / "b.json"
    with files.OutputSet() as out:
        out.write_png(a, np.zeros((2, 3), np.uint8))
        out.write_json(b, {"x": 1})
        assert not a.exists() and not b.exists() and len(list(tmp_path.rglob(".*.tmp*"))) == 2
        out.commit()
    assert Image.open(a).size == (3, 2) and files.read_json(b) == {"x": 1}
    b.write_text("theirs")
    with pytest.raises(FileExistsError, match="b.json .*another run"):
        with files.OutputSet() as out:
            out.write_png(a, np.ones((4, 4), np.uint8))
            out.write_json(b, {"x": 2})
            out.commit()
    assert Image.open(a).size == (3, 2) and b.read_text() == "theirs"  # neither replaced
    assert not list(tmp_path.rglob(".*.tmp*"))
    with files.OutputSet(overwrite=True) as out:
        out.write_json(b, {"x": 3})
        out.commit()
    assert files.read_json(b) == {"x": 3}
    with pytest.raises(ValueError, match="non-finite"):  # strict JSON only
        with files.OutputSet(overwrite=True) as out:
            out.write_json(a, {"x": float("nan")})
    assert not list(tmp_path.rglob(".*.tmp*"))
