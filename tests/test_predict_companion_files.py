"""A detached header's data file is an output too, and an input's data file is an input.

A new user's data loss (files as under /tmp/newuser/r/mhd2):

1. ``mambahome predict --input in.mha --output seg.mhd`` replaced an existing ``seg.zraw`` without ``--overwrite``:
   the existing-output check looked at the ``.mhd`` header only. The same for ``.nhdr`` and its ``.raw.gz``.
2. An input ``a.mhd`` whose header says ``ElementDataFile = b.zraw``, predicted with ``--output b.mhd``, had its voxels
   replaced by the labels' (``--overwrite`` or not: ``b.mhd`` did not exist); the next read said "a.mhd is truncated
   ... b.zraw holds only 1324". The same for a detached NRRD (``data file: b.raw.gz``), and through a symbolic link.
3. A folder where every input failed ended with "the other 0 were written to <folder>", a folder never made.

``engine.io.save_volume`` (which predict, ``prompt``, the napari writer and the case store all write volumes with)
now writes the header and its data file all-or-nothing and keeps both; ``check_output_paths`` refuses them before the
network runs.
"""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.io import OutputExistsError, Volume, VolumeError, WriteError, load_label, load_volume, save_volume
from train_support import tiny_ct_model_and_scan

AFFINE = np.diag([-2.0, -2.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Mamba-HoME checkpoint (3 classes, CT) and a 16x18x16 CT image as ``scan.mha``."""
    return tiny_ct_model_and_scan(tmp_path_factory.mktemp("ckpt"), (16, 18, 16), "scan.mha")


def _predict(ckpt, src, dst, *extra):
    from engine.cli import main

    return main(["predict", "--checkpoint", str(ckpt), "--input", str(src), "--output", str(dst),
                 "--device", "cpu", "--quiet", *extra])


def _files(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def _image(value: float = 0.0, shape=(6, 7, 5)) -> Volume:
    data = np.full(shape, value, np.float32)
    data[1:3, 2:5, 1:4] = value + 100.0
    return Volume.from_array(data, AFFINE)


def _mhd_whose_data_is(folder: Path, header: str, data_file: str) -> np.ndarray:
    """``folder/header`` (.mhd) keeping its voxels in ``folder/data_file``, as SimpleITK writes it then renamed; returns
    its voxels."""
    import SimpleITK as sitk

    voxels = np.arange(6 * 7 * 5, dtype=np.int16).reshape(5, 7, 6)
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(folder / "orig.mhd"), True)
    text = (folder / "orig.mhd").read_text().replace("ElementDataFile = orig.zraw", f"ElementDataFile = {data_file}")
    (folder / header).write_text(text)
    (folder / "orig.zraw").rename(folder / data_file)
    (folder / "orig.mhd").unlink()
    return load_volume(folder / header).data


def _nhdr_whose_data_is(folder: Path, header: str, data_file: str) -> np.ndarray:
    """``folder/header`` (.nhdr) keeping its voxels in ``folder/data_file`` (gzip), written by pynrrd."""
    import nrrd

    voxels = np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5)
    nrrd.write(str(folder / header), voxels, {"encoding": "gzip", "space": "left-posterior-superior",
                                                "space directions": np.eye(3) * 2.0, "space origin": np.zeros(3)},
               detached_header=str(folder / data_file), index_order="F")
    assert f"data file: {data_file}" in (folder / header).read_text()
    return load_volume(folder / header).data


# ----------------------------------------------------------------------------- which files an output is
@pytest.mark.parametrize("name", ["seg.mhd", "seg.raw.mhd", "SEG.MHD", "MR head.mhd", "seg.nhdr", "SEG.NHDR",
                                  "MR head.nhdr", "case.v2.nhdr", "seg.nii.gz", "seg.mha", "seg.nrrd"])
def test_the_files_an_output_is_made_of_are_known_before_it_is_written(tmp_path, name):
    """predict checks an output's data file before the network runs: the name it checks is the one written (ITK
    wrote ``SEG.MHD`` as ``SEG.mhd`` + ``SEG.zraw``, pynrrd ``SEG.NHDR`` as one attached file)."""
    from engine.formats import written_files

    image = _image()
    out = save_volume(tmp_path / name, (image.data > 50).astype(np.uint8), image)
    assert out == tmp_path / name
    assert _files(tmp_path) == sorted(p.name for p in written_files(tmp_path / name))
    if name != "SEG.MHD":  # ITK reads MetaImage headers named .mhd only
        np.testing.assert_array_equal(load_label(out).data, (image.data > 50).astype(np.uint8))


# ----------------------------------------------------------------------------- save_volume keeps the data file
@pytest.mark.parametrize("name, data", [("seg.mhd", "seg.zraw"), ("seg.nhdr", "seg.raw.gz")])
def test_an_existing_data_file_is_kept_without_overwrite(tmp_path, name, data):
    (tmp_path / data).write_bytes(b"somebody's voxels")
    image = _image()
    with pytest.raises(OutputExistsError) as info:
        save_volume(tmp_path / name, np.ones(image.shape, np.uint8), image, overwrite=False)
    assert str(tmp_path / data) in str(info.value)
    assert (tmp_path / data).read_bytes() == b"somebody's voxels"
    assert _files(tmp_path) == [data]  # no header, no hidden temporary folder or file


@pytest.mark.parametrize("name", ["seg.mhd", "seg.nhdr"])
def test_overwrite_replaces_the_pair(tmp_path, name):
    image = _image()
    save_volume(tmp_path / name, np.ones(image.shape, np.uint8), image)
    before = _files(tmp_path)
    save_volume(tmp_path / name, np.full(image.shape, 2, np.uint8), image, overwrite=True)
    assert _files(tmp_path) == before
    assert np.all(load_label(tmp_path / name).data == 2)


@pytest.mark.parametrize("make, name, data", [(_mhd_whose_data_is, "b.mhd", "b.zraw"),
                                              (_nhdr_whose_data_is, "b.nhdr", "b.raw.gz")])
def test_labels_never_replace_the_data_file_of_their_image(tmp_path, make, name, data):
    """The napari writer and the case store save with the image as reference: its data file is kept too."""
    voxels = make(tmp_path, "a" + Path(name).suffix, data)
    image = load_volume(tmp_path / ("a" + Path(name).suffix))
    before = (tmp_path / data).read_bytes()
    for overwrite in (False, True):
        with pytest.raises(VolumeError, match=f"its data file .*{data} is the data file of input .*a"):
            save_volume(tmp_path / name, np.ones(image.shape, np.uint8), image, overwrite=overwrite)
    assert (tmp_path / data).read_bytes() == before
    np.testing.assert_array_equal(load_volume(tmp_path / ("a" + Path(name).suffix)).data, voxels)
    assert not (tmp_path / name).exists()
    # saving back over the reference's own file stays the caller's choice (labels opened from a file, saved again)
    save_volume(tmp_path / "c.mhd", np.ones(image.shape, np.uint8), image)
    ref = load_label(tmp_path / "c.mhd")
    save_volume(tmp_path / "c.mhd", np.full(image.shape, 3, np.uint8), ref)
    assert np.all(load_label(tmp_path / "c.mhd").data == 3)


def test_keep_protects_any_input_and_its_data_file(tmp_path):
    _mhd_whose_data_is(tmp_path, "a.mhd", "b.zraw")
    image = _image()  # another reference: keep alone names the input
    with pytest.raises(VolumeError, match="is the data file of input"):
        save_volume(tmp_path / "b.mhd", np.ones(image.shape, np.uint8), image, keep=[tmp_path / "a.mhd"])
    with pytest.raises(VolumeError, match="this output is input"):
        save_volume(tmp_path / "a.mhd", np.ones(image.shape, np.uint8), image, keep=[tmp_path / "a.mhd"])
    load_volume(tmp_path / "a.mhd")


# ----------------------------------------------------------------------------- all or nothing
def _replace_failing_on(monkeypatch, target: Path) -> None:
    """``os.replace`` fails with a full disk when it moves a file onto ``target``."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == target:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("name", ["seg.mhd", "seg.nhdr"])
def test_a_failure_moving_the_header_takes_the_data_file_back(tmp_path, monkeypatch, name):
    """The data file is moved first: a failure on the header used to leave the new data under the old header (or
    a data file without a header)."""
    image = _image()
    save_volume(tmp_path / name, np.ones(image.shape, np.uint8), image)
    old = {p: (tmp_path / p).read_bytes() for p in _files(tmp_path)}
    _replace_failing_on(monkeypatch, tmp_path / name)
    with pytest.raises(WriteError, match="no space left"):
        save_volume(tmp_path / name, np.full(image.shape, 2, np.uint8), image)
    monkeypatch.undo()
    assert {p: (tmp_path / p).read_bytes() for p in _files(tmp_path)} == old
    assert np.all(load_label(tmp_path / name).data == 1)

    # a new pair: nothing is left at all (the data file already moved is removed again)
    other = tmp_path / "new"
    other.mkdir()
    _replace_failing_on(monkeypatch, other / name)
    with pytest.raises(WriteError, match="no space left"):
        save_volume(other / name, np.ones(image.shape, np.uint8), image)
    monkeypatch.undo()
    assert _files(other) == []


@pytest.mark.parametrize("name", ["seg.mhd", "seg.nhdr"])
def test_an_interrupted_writer_leaves_nothing(tmp_path, monkeypatch, name):
    import engine.formats as formats

    def interrupted(*args, **kwargs):
        Path(args[0]).write_bytes(b"half a header")
        raise KeyboardInterrupt

    monkeypatch.setattr(formats, "_write_itk", interrupted)
    monkeypatch.setattr(formats, "_write_nrrd", interrupted)
    image = _image()
    with pytest.raises(KeyboardInterrupt):
        save_volume(tmp_path / "sub" / name, np.ones(image.shape, np.uint8), image)
    assert _files(tmp_path) == []  # the folder this write made is gone too


# ----------------------------------------------------------------------------- predict
@pytest.mark.parametrize("name, data", [("seg.mhd", "seg.zraw"), ("seg.nhdr", "seg.raw.gz")])
def test_predict_keeps_an_existing_data_file_unless_overwrite(tmp_path, tiny_checkpoint, capsys, name, data):
    ckpt, scan = tiny_checkpoint
    (tmp_path / data).write_bytes(b"an earlier result's voxels")
    assert _predict(ckpt, scan, tmp_path / name) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / data}: a data file without its header {name}" in err and "pass --overwrite" in err
    assert (tmp_path / data).read_bytes() == b"an earlier result's voxels"
    assert _files(tmp_path) == [data]
    assert _predict(ckpt, scan, tmp_path / name, "--overwrite") == 0
    assert load_label(tmp_path / name).shape == (16, 18, 16)
    assert _files(tmp_path) == sorted([name, data])


@pytest.mark.parametrize("make, suffix, data", [(_mhd_whose_data_is, ".mhd", "b.zraw"),
                                                (_nhdr_whose_data_is, ".nhdr", "b.raw.gz")])
def test_predict_never_replaces_an_inputs_data_file(tmp_path, tiny_checkpoint, capsys, make, suffix, data):
    ckpt, _ = tiny_checkpoint
    voxels = make(tmp_path, "a" + suffix, data)
    before = (tmp_path / data).read_bytes()
    for extra in ((), ("--overwrite",)):
        assert _predict(ckpt, tmp_path / ("a" + suffix), tmp_path / ("b" + suffix), *extra) == 2
        err = capsys.readouterr().err
        assert (f"{tmp_path / ('b' + suffix)}: its data file {tmp_path / data} is the data file of input "
                f"{tmp_path / ('a' + suffix)}; writing it would destroy that input") in err
    # through a symbolic link to the data file
    os.symlink(data, tmp_path / f"link{Path(data).name[1:]}")
    assert _predict(ckpt, tmp_path / ("a" + suffix), tmp_path / ("link" + suffix), "--overwrite") == 2
    assert "reached through a link" in capsys.readouterr().err
    assert (tmp_path / data).read_bytes() == before
    np.testing.assert_array_equal(load_volume(tmp_path / ("a" + suffix)).data, voxels)


def test_predict_checks_every_input_of_a_folder(tmp_path, tiny_checkpoint):
    """A folder of cases: one input's data file named like another case's output."""
    from engine.inference import OutputConflictError, check_output_paths

    _mhd_whose_data_is(tmp_path, "a.mhd", "b.zraw")
    with pytest.raises(OutputConflictError, match="is the data file of input"):
        check_output_paths([tmp_path / "x.nii.gz", tmp_path / "a.mhd"], [tmp_path / "b.mhd"], overwrite=True)
    # an output header that is an input's data file
    (tmp_path / "c.mhd").write_text((tmp_path / "a.mhd").read_text().replace("b.zraw", "d.nrrd"))
    with pytest.raises(OutputConflictError, match="this output is the data file of input"):
        check_output_paths([tmp_path / "c.mhd"], [tmp_path / "d.nrrd"], overwrite=True)
    # two outputs writing one data file
    with pytest.raises(OutputConflictError, match="would both write"):
        check_output_paths([tmp_path / "x.nii.gz"], [tmp_path / "o" / "s.mhd", tmp_path / "o" / "s.MHD"],
                           overwrite=True)


def test_input_files_lists_data_file_series(tmp_path):
    from engine.formats import volume_files

    (tmp_path / "l.mhd").write_text("NDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                                    "ElementDataFile = LIST 2D\ns0.raw\ns1.raw\n")
    (tmp_path / "n.nhdr").write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 3\nencoding: raw\n"
                                     "data file: slice%02d.raw 1 3 1 2\n")
    (tmp_path / "m.mha").write_text("NDims = 3\nElementDataFile = LOCAL\n")
    assert [p.name for p in volume_files(tmp_path / "l.mhd")] == ["l.mhd", "s0.raw", "s1.raw"]
    assert [p.name for p in volume_files(tmp_path / "n.nhdr")] == ["n.nhdr", "slice01.raw", "slice02.raw",
                                                                   "slice03.raw"]
    assert volume_files(tmp_path / "m.mha") == [tmp_path / "m.mha"]


def test_a_folder_where_every_input_fails_says_nothing_was_written(tmp_path, tiny_checkpoint, capsys):
    ckpt, _ = tiny_checkpoint
    bad = tmp_path / "badfolder"
    bad.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (bad / name).write_bytes(b"not a volume")
    out = tmp_path / "labels"
    assert _predict(ckpt, bad, out) == 2  # nothing came of the run: bad input, not "done with some left out"
    err = capsys.readouterr().err
    assert "2 of 2 inputs were not segmented" in err
    assert "nothing was written" in err and "were written to" not in err
    assert not out.exists()

    good = tmp_path / "mixed"
    good.mkdir()
    (good / "a.nii.gz").write_bytes(b"not a volume")
    image = _image(-1000.0)
    nib.save(nib.Nifti1Image(image.data, image.affine), str(good / "b.nii.gz"))
    assert _predict(ckpt, good, out) == 1
    assert f"the other 1 were written to {out}" in capsys.readouterr().err
