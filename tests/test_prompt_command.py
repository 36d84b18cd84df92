"""``mambahome prompt``: one object from command-line prompts with the bundled promptable model, on real MRI."""
from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT, oblique_affine
from engine.cli import main

BUNDLED = REPO_ROOT / "napari_mambahome" / "models" / "interactive.safetensors"
CASE = "hippocampus_001.nii.gz"


@pytest.fixture(scope="module")
def hippocampus(shared_data):
    """The image, its anterior hippocampus (label 1) and the voxel deepest inside it."""
    from scipy import ndimage

    if not BUNDLED.is_file():
        pytest.skip("the bundled interactive model is not in this checkout")
    image = shared_data / "hippocampus" / "imagesTr" / CASE
    truth = np.asarray(nib.load(str(shared_data / "hippocampus" / "labelsTr" / CASE)).dataobj) == 1
    inside = tuple(int(v) for v in np.unravel_index(np.argmax(ndimage.distance_transform_edt(truth)), truth.shape))
    return image, truth, inside


def _prompt(tmp_path, image, out_name, *options):
    out = tmp_path / out_name
    code = main(["prompt", "--checkpoint", str(BUNDLED), "--input", str(image), "--output", str(out),
                 "--device", "cpu", "--quiet", *[str(o) for o in options]])
    assert code == 0
    return out, np.asarray(nib.load(str(out)).dataobj)


def _dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def test_a_click_segments_the_structure_on_the_inputs_grid(tmp_path, hippocampus, capsys):
    image, truth, inside = hippocampus
    out, mask = _prompt(tmp_path, image, "anterior.nii.gz", "--point", *inside, "--label-value", 2)
    assert set(np.unique(mask)) == {0, 2}
    assert _dice(mask == 2, truth) > 0.5  # the bundled model's first click scores about 0.7 on held-out cases
    np.testing.assert_array_equal(nib.load(str(out)).affine, nib.load(str(image)).affine)
    assert f"{int(np.sum(mask == 2))} voxels of label 2 (1 prompt(s)" in capsys.readouterr().out


def test_prompts_apply_in_command_line_order(tmp_path, hippocampus):
    """Kinds and signs interleave as typed (one list, not one per option); a negative click where the first click
    over-reached removes the structure there."""
    from scipy import ndimage

    from engine.interactive.command import register_cli

    parser = __import__("argparse").ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["prompt", "--checkpoint", "c", "--input", "i", "--output", "o", "--point", "1", "2", "3",
                              "--box", "0", "0", "0", "4", "4", "4", "--negative-point", "5", "6", "7",
                              "--scribble", "s.nii.gz", "--point", "8", "9", "10"])
    assert args.prompts == [("point", True, [1, 2, 3]), ("box", True, [0, 0, 0, 4, 4, 4]),
                            ("point", False, [5, 6, 7]), ("scribble", True, "s.nii.gz"), ("point", True, [8, 9, 10])]

    image, truth, inside = hippocampus
    _, first = _prompt(tmp_path, image, "first.nii.gz", "--point", *inside)
    over = (first == 1) & ~truth
    assert over.any()  # the first click spills over (Dice about 0.7)
    fp = tuple(int(v) for v in np.unravel_index(np.argmax(ndimage.distance_transform_edt(over)), over.shape))
    _, corrected = _prompt(tmp_path, image, "corrected.nii.gz", "--point", *inside, "--negative-point", *fp)
    assert corrected[fp] == 0 and corrected[inside] == 1 and np.sum(corrected) < np.sum(first)


def test_world_coordinates_on_an_oblique_anisotropic_file_match_voxel_indices(tmp_path, hippocampus):
    """The same scan with a scanner-like affine (axis swap, flips, 1.5 x 1.5 x 2 mm): a click given in RAS mm
    lands on the voxel it names and gives the mask the click at that voxel index gives."""
    image, truth, inside = hippocampus
    affine = oblique_affine()
    oblique = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(str(image)).dataobj, np.float32), affine), str(oblique))
    world = (affine @ np.append(inside, 1.0))[:3] + 0.3  # a little off the voxel centre: rounds back to it
    _, by_index = _prompt(tmp_path, oblique, "index.nii.gz", "--point", *inside)
    out, by_world = _prompt(tmp_path, oblique, "world.nii.gz", "--world", "--point", *world)
    np.testing.assert_array_equal(by_world, by_index)
    assert by_index[inside] == 1  # (the fake affine stretches the anatomy: Dice is not the point here)
    np.testing.assert_allclose(nib.load(str(out)).affine, affine)


def test_a_box_then_a_scribble_file_and_an_initial_mask(tmp_path, hippocampus):
    image, truth, inside = hippocampus
    idx = np.argwhere(truth)
    lo, hi = idx.min(0), idx.max(0)
    _, boxed = _prompt(tmp_path, image, "box.nii.gz", "--box", *lo, *hi)
    assert _dice(boxed == 1, truth) > 0.5
    assert not np.any(boxed[: lo[0] - 3]) and not np.any(boxed[hi[0] + 4:])  # nothing far outside the box
    stroke = np.zeros(truth.shape, np.uint8)
    stroke[inside[0], inside[1] - 3: inside[1] + 4, inside[2]] = 1
    stroke &= truth
    ref = nib.load(str(image))
    nib.save(nib.Nifti1Image(stroke, ref.affine), str(tmp_path / "stroke.nii.gz"))
    _, scribbled = _prompt(tmp_path, image, "scribble.nii.gz", "--scribble", tmp_path / "stroke.nii.gz")
    assert np.all(scribbled[stroke != 0] == 1) and _dice(scribbled == 1, truth) > 0.5
    _, kept = _prompt(tmp_path, image, "kept.nii.gz", "--initial-mask", tmp_path / "box.nii.gz")
    np.testing.assert_array_equal(kept, boxed)  # no prompt: the initial mask as it was


@pytest.mark.parametrize("options, message", [
    (["--point", 99, 5, 5], r"prompt 1 \(point .*\): point \(99, 5, 5\) lies outside the volume of shape 35x51x35"),
    (["--point", 5, 5, 5, "--box", 3, 3, 3, 3, 3, 3], r"prompt 2 \(box .*\): .*"),
    ([], "no prompt: give at least one --point"),
    (["--point", 5, 5, 5, "--label-value", 0], "--label-value must be 1..65535"),
    (["--scribble", "WRONG_GRID"], "scribble .*grid|scribble .*shape"),
])
def test_bad_prompts_are_refused_by_name_and_nothing_is_written(tmp_path, hippocampus, capsys, options, message):
    image, _, _ = hippocampus
    if "WRONG_GRID" in options:
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), str(tmp_path / "small.nii.gz"))
        options = ["--scribble", tmp_path / "small.nii.gz"]
    out = tmp_path / "never.nii.gz"
    assert main(["prompt", "--checkpoint", str(BUNDLED), "--input", str(image), "--output", str(out),
                 "--device", "cpu", "--quiet", *[str(o) for o in options]]) == 2
    assert re.search(f"mambahome prompt: error: .*{message}", capsys.readouterr().err)
    assert not out.exists()


def test_a_segmentation_checkpoint_the_input_as_output_and_a_bad_number_are_refused(tmp_path, hippocampus, capsys):
    image, _, inside = hippocampus
    default = REPO_ROOT / "napari_mambahome" / "models" / "default.safetensors"
    assert main(["prompt", "--checkpoint", str(default), "--input", str(image), "--output", str(tmp_path / "m.nii.gz"),
                 "--point", *map(str, inside), "--device", "cpu"]) == 2
    assert "is not an interactive model" in capsys.readouterr().err
    before = image.read_bytes()
    assert main(["prompt", "--checkpoint", str(BUNDLED), "--input", str(image), "--output", str(image),
                 "--point", *map(str, inside)]) == 2
    assert "this output is an input" in capsys.readouterr().err and image.read_bytes() == before
    with pytest.raises(SystemExit):
        main(["prompt", "--checkpoint", str(BUNDLED), "--input", str(image), "--output", str(tmp_path / "m.nii.gz"),
              "--point", "9", "x", "11"])
    assert "--point takes 3 numbers, got 9 x 11" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()


# ---------------------------------------------------------------- worklists
def _worklist(tmp_path, rows):
    path = tmp_path / "list" / "worklist.csv"
    path.parent.mkdir(exist_ok=True)
    path.write_text("image,label,prompt\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return path


def test_a_worklist_writes_one_label_map_per_image_and_reports_the_image_that_failed(tmp_path, hippocampus, capsys):
    import shutil

    image, truth, inside = hippocampus
    local = tmp_path / "list" / "scans"
    local.mkdir(parents=True)
    shutil.copy(image, local / "a.nii.gz")  # a relative path in the worklist is taken from the worklist's folder
    second = image.parent / "hippocampus_003.nii.gz"
    path = _worklist(tmp_path, [("scans/a.nii.gz", 1, "point " + " ".join(map(str, inside))),
                                (second, 2, "point 18 30 11"),
                                ("scans/a.nii.gz", 3, "point " + " ".join(map(str, inside))),  # same place, later
                                ("scans/missing.nii.gz", 1, "point 1 1 1"),
                                (second, 2, "-point 18 22 11")])
    out = tmp_path / "masks"
    assert main(["prompt", "--checkpoint", str(BUNDLED), "--worklist", str(path), "--output-dir", str(out),
                 "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    text = captured.out
    # the log says where a later object lost voxels to an earlier one (it reported the whole mask before)
    assert re.search(r"a.nii.gz: label 3: \d+ voxels from 1 prompt\(s\) \((\d+) of them already taken by earlier "
                     r"labels, kept there\)", captured.err)
    assert "2 label map(s)" in text and "1 image(s) failed" in text and "missing.nii.gz: file not found" in text
    assert "(worklist.csv line 5)" in text  # the row to mend
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "hippocampus_003.nii.gz"]
    a = np.asarray(nib.load(str(out / "a.nii.gz")).dataobj)
    _, alone = _prompt(tmp_path, image, "alone.nii.gz", "--point", *inside)
    np.testing.assert_array_equal(a == 1, alone == 1)  # the first object as the single command makes it
    assert set(np.unique(a)) <= {0, 1, 3} and a[inside] == 1  # the later object fills only what was free
    b = np.asarray(nib.load(str(out / "hippocampus_003.nii.gz")).dataobj)
    assert set(np.unique(b)) == {0, 2} and b[18, 30, 11] == 2
    np.testing.assert_array_equal(nib.load(str(out / "a.nii.gz")).affine, nib.load(str(image)).affine)


@pytest.mark.parametrize("rows, message", [
    ([("a.nii.gz", 1, "point 1 2")], r"worklist.csv line 2: a point takes 3 numbers, got 1 2"),
    ([("a.nii.gz", 1, "point 1 2 3"), ("a.nii.gz", 0, "point 1 2 3")], r"line 3: label 0 must be 1..65535"),
    ([("a.nii.gz", 1, "circle 1 2 3")], r"line 2: unknown prompt 'circle'"),
    ([("a.nii.gz", "x", "point 1 2 3")], r"line 2: label 'x' is not a whole number"),
    # every bad row at once, not the first per run
    ([("a.nii.gz", 1, "pont 18 37 15"), ("a.nii.gz", 1, "point 1 1 1"), ("a.nii.gz", "x", "point 1 1 1")],
     r"worklist.csv: 2 rows cannot be used; nothing was segmented:\n  worklist.csv line 2: unknown prompt 'pont'.*\n"
     r"  worklist.csv line 4: label 'x' is not a whole number"),
])
def test_bad_worklist_rows_are_named_by_line_before_any_image_is_read(tmp_path, capsys, rows, message):
    if not BUNDLED.is_file():
        pytest.skip("the bundled interactive model is not in this checkout")
    path = _worklist(tmp_path, rows)
    assert main(["prompt", "--checkpoint", str(BUNDLED), "--worklist", str(path), "--output-dir",
                 str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_worklist_without_its_columns_or_with_single_object_options_is_refused(tmp_path, capsys):
    path = tmp_path / "w.csv"
    path.write_text("file,prompt\na.nii.gz,point 1 2 3\n")
    assert main(["prompt", "--checkpoint", str(BUNDLED), "--worklist", str(path), "--output-dir", str(tmp_path)]) == 2
    assert "needs the columns image, label, prompt (header line); missing image, label" in capsys.readouterr().err
    assert main(["prompt", "--checkpoint", str(BUNDLED), "--worklist", str(path), "--output-dir", str(tmp_path),
                 "--point", "1", "2", "3"]) == 2
    assert "--worklist takes its images and prompts from the file" in capsys.readouterr().err
    assert main(["prompt", "--checkpoint", str(BUNDLED), "--point", "1", "2", "3"]) == 2
    assert "give --input and --output (one object), or --worklist and --output-dir" in capsys.readouterr().err
