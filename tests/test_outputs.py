"""outputs.py's pieces on their own, against hand-made expectations: prompt-file parsing and its
errors, the label map of overlapping masks, the mask PNG's values, the NIfTI slice writer as the
inverse of data.volume_slice, and the refusal to overwrite. The whole command runs in
test_infer.py."""

import numpy as np
import pytest

import data
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
        ({"prompts": [], "extra": 1}, "an entry is"),
    ]
    for entry, msg in cases:
        with pytest.raises(ValueError, match=f"^{msg}"):
            outputs.parse_entry(tmp_path / "v.nii.gz", entry)


def _seg(masks, logits):
    return infer.Segmentation(np.array(masks), np.array(logits, np.float32), np.zeros(len(masks)))


def test_label_ids_give_overlaps_to_the_highest_logit():
    masks = [[[1, 1, 0, 0]], [[0, 1, 1, 0]]]  # (P=2, H=1, W=4): both claim pixel 1
    logits = [[[2.0, 0.5, -1, -1]], [[-1, 3.0, 1.0, -2]]]
    ids = outputs.label_ids(_seg(np.array(masks, bool), logits))
    np.testing.assert_array_equal(ids, [[1, 2, 2, 0]])
    assert ids.dtype == np.uint8
    many = np.zeros((300, 1, 2), bool)
    many[299, 0, 1] = True
    ids = outputs.label_ids(_seg(many, np.where(many, 1.0, -1.0)))
    assert ids.dtype == np.uint16 and ids.tolist() == [[0, 300]]


def test_mask_png_is_0_255_for_one_prompt_and_ids_for_several():
    one = _seg(np.array([[[True, False]]]), [[[1.0, -1.0]]])
    np.testing.assert_array_equal(outputs.mask_image(one), [[255, 0]])
    two = _seg(np.array([[[True, False]], [[False, True]]]), [[[1.0, -1]], [[-1, 1.0]]])
    np.testing.assert_array_equal(outputs.mask_image(two), [[1, 2]])


def test_put_slice_inverts_data_volume_slice():
    vol = np.zeros((6, 5, 4), np.int32)  # canonical RAS+: x -> right, y -> anterior, z -> up
    vol[5, 4, 2] = 7  # right, anterior, slice 2
    img = data.volume_slice(vol, "z", 2)
    assert img.shape == (5, 6) and img[0, 0] == 7  # radiological: anterior top, right on the left
    vol = np.random.default_rng(0).integers(0, 9, (6, 5, 4))
    for axis, ax in outputs.AXES.items():
        out = np.zeros_like(vol)
        outputs.put_slice(out, axis, 1, data.volume_slice(vol, axis, 1))
        np.testing.assert_array_equal(np.take(out, 1, ax), np.take(vol, 1, ax))
        assert np.count_nonzero(np.delete(out, 1, ax)) == 0  # only that slice is written


def test_check_outputs_refuses_existing_files_unless_forced(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    paths = [tmp_path / "a.png", tmp_path / "b.png", None]
    with pytest.raises(FileExistsError, match=r"a\.png \(use --force"):
        outputs.check_outputs(paths, force=False)
    outputs.check_outputs(paths, force=True)
    outputs.check_outputs([tmp_path / "b.png", None], force=False)
