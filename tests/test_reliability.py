"""What the engine promises about the user's files (docs/ARCHITECTURE.md, Reliability): outputs never replace inputs,
every write is atomic and cleaned up, full disks and read-only folders give one clear line, names from
records cannot leave their folder, concurrent case-store writers never fail on each other.

Full disks are real, not mocked: a process whose file size limit (RLIMIT_FSIZE) is below the file it
writes gets EFBIG from the kernel, and where mounting is allowed a tiny tmpfs gives ENOSPC and a
read-only mount EROFS. Read-only folders are tested in a process without the capability to ignore
file modes (root normally ignores them).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.cases import CaseStore, CaseStoreError
from engine.datasets import DatasetError, load_dataset
from engine.io import (TEMP_PATTERN, OutputExistsError, Volume, WriteError, _temp_sibling, atomic_write,
                       atomic_write_all, load_label, remove_stale_temps, save_volume, write_text_atomic)
from engine.names import UnsafeNameError, child_path, is_within, safe_name
from engine.train.run_folder import RunFolderError, prepare_run_folder
from train_support import tiny_ct_model_and_scan

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "organ", "vessel"]


# ----------------------------------------------------------------------------- helpers
def _python(script: str, *, prefix=(), timeout=300) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter that imports this checkout's engine."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


FSIZE_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


def _unprivileged_prefix() -> list:
    """A command prefix under which file modes apply (root without CAP_DAC_OVERRIDE), or skip."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv is missing: no way to drop the right to ignore file modes")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot drop capabilities here: {probe.stderr.decode().strip()}")
    return prefix


def _private_mount_prefix() -> list:
    """``unshare -m`` (a private mount namespace: mounts vanish with the process), or skip."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and unshare")
    probe = subprocess.run([unshare, "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"mounting is not allowed here: {probe.stderr.decode().strip()}")
    return [unshare, "-m"]


def _files(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Mamba-HoME checkpoint (3 classes, CT) and a 20x24x16 CT image file."""
    return tiny_ct_model_and_scan(tmp_path_factory.mktemp("ckpt"), (20, 24, 16), "scan.nii.gz",
                                  lambda path, image: nib.save(nib.Nifti1Image(image.data, image.affine), str(path)),
                                  CLASSES)


def _predict(ckpt, src, dst, *extra):
    from engine.cli import main

    return main(["predict", "--checkpoint", str(ckpt), "--input", str(src), "--output", str(dst),
                 "--device", "cpu", "--quiet", *extra])


def _volume(value=1, shape=(4, 5, 6)):
    ref = Volume.from_array(np.zeros(shape, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    return ref, np.full(shape, value, np.uint8)


# ----------------------------------------------------------------------------- 1. outputs never replace inputs
def test_predict_refuses_to_write_over_its_input_file(tmp_path, tiny_checkpoint, capsys):
    ckpt, scan = tiny_checkpoint
    src = tmp_path / "scan.nii.gz"
    shutil.copy(scan, src)
    before = src.read_bytes()
    assert _predict(ckpt, src, src) == 2
    err = capsys.readouterr().err
    assert "this output is an input" in err and str(src) in err and "Traceback" not in err
    assert _predict(ckpt, src, tmp_path) == 2  # a folder output: same name in the same folder
    assert _predict(ckpt, src, src, "--overwrite") == 2  # --overwrite never applies to inputs
    assert src.read_bytes() == before and _files(tmp_path) == ["scan.nii.gz"]


def test_predict_refuses_outputs_that_are_inputs_through_links(tmp_path, tiny_checkpoint, capsys):
    ckpt, scan = tiny_checkpoint
    src = tmp_path / "scan.nii.gz"
    shutil.copy(scan, src)
    before = src.read_bytes()
    (tmp_path / "soft.nii.gz").symlink_to(src)
    os.link(src, tmp_path / "hard.nii.gz")
    (tmp_path / "linkdir").symlink_to(tmp_path)
    for out in ("soft.nii.gz", "hard.nii.gz", "linkdir/scan.nii.gz"):
        assert _predict(ckpt, src, tmp_path / out, "--overwrite") == 2, out
        assert "through a link" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_predict_folder_into_itself_is_refused_and_every_scan_survives(tmp_path, tiny_checkpoint, capsys):
    ckpt, scan = tiny_checkpoint
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(scan, tmp_path / name)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert _predict(ckpt, tmp_path, tmp_path, "--overwrite") == 2
    assert "this output is an input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_predict_folder_into_a_subfolder_or_without_name_collisions_is_allowed(tmp_path, tiny_checkpoint):
    from engine.inference import OutputConflictError, Predictor, predict_paths

    ckpt, scan = tiny_checkpoint
    src = tmp_path / "imagesTs"
    src.mkdir()
    shutil.copy(scan, src / "caseA_0000.nii.gz")
    predictor = Predictor(ckpt, device="cpu")
    # inside the input folder: the input listing is not recursive, so names cannot collide
    out = predict_paths(predictor, src, src / "pred", log=lambda m: None)
    assert [p.name for p, _ in out] == ["caseA.nii.gz"] and (src / "pred" / "caseA.nii.gz").is_file()
    # nnU-Net names: case_0000 -> case, so even the input folder itself is a safe output
    out = predict_paths(predictor, src, src, log=lambda m: None)
    assert _files(src) == ["caseA.nii.gz", "caseA_0000.nii.gz", "pred"]
    # a probabilities file named like an input, or two outputs on one file, are refused before any work
    shutil.copy(scan, tmp_path / "w_probabilities.nii.gz")
    with pytest.raises(OutputConflictError, match="w_probabilities.nii.gz: this output is an input"):
        predict_paths(predictor, tmp_path / "w_probabilities.nii.gz", tmp_path / "w.nii.gz", probabilities=True,
                      log=lambda m: None)
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(scan, two / "x.nii.gz")
    shutil.copy(scan, two / "x_probabilities.nii.gz")
    with pytest.raises(OutputConflictError, match="two outputs would be written to this one file"):
        predict_paths(predictor, two, tmp_path / "o", probabilities=True, log=lambda m: None)
    assert not (tmp_path / "o").exists() and not (tmp_path / "w.nii.gz").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path, tiny_checkpoint, capsys):
    from engine.inference import OutputConflictError, Predictor, predict_paths

    ckpt, scan = tiny_checkpoint
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"an earlier, hand-corrected result")
    assert _predict(ckpt, scan, out) == 2
    assert "exist already and are kept" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier, hand-corrected result"
    predictor = Predictor(ckpt, device="cpu")
    with pytest.raises(OutputConflictError, match="pass --overwrite"):
        predict_paths(predictor, scan, out, log=lambda m: None)
    with pytest.raises(OutputConflictError):
        predictor.predict_file(scan, out)
    assert out.read_bytes() == b"an earlier, hand-corrected result"
    predict_paths(predictor, scan, out, log=lambda m: None, overwrite=True)
    assert load_label(out).shape == (20, 24, 16)
    assert _files(tmp_path) == ["seg.nii.gz"]


# ----------------------------------------------------------------------------- 2. atomic writes
def test_interrupted_write_leaves_no_temp_and_the_old_file(tmp_path):
    target = write_text_atomic(tmp_path / "curves.png", "old")

    def interrupted(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_text() == "old" and _files(tmp_path) == ["curves.png"]


def test_checkpoint_save_interrupted_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    import engine.checkpoint as checkpoint
    from engine.networks import build_network

    model = build_network("mambahome", 1, 2, "tiny")
    path = checkpoint.save_checkpoint(tmp_path / "last.safetensors", model, {"class_names": ["bg", "fg"]})
    before = path.read_bytes()
    import safetensors.torch

    real = safetensors.torch.save_file

    def killed(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, model, {"class_names": ["bg", "fg"]})
    assert path.read_bytes() == before and _files(tmp_path) == ["last.safetensors"]


def test_group_write_is_all_or_nothing_and_created_folders_are_removed(tmp_path):
    ref, labels = _volume()
    keep = save_volume(tmp_path / "a.nii.gz", labels, ref)

    def fails(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=r"cannot write NIfTI volume .*b_probabilities.nii.gz: no space left"):
        atomic_write_all([(keep, lambda tmp: nib.save(nib.Nifti1Image(labels * 2, ref.affine), tmp)),
                          (tmp_path / "new" / "deeper" / "b_probabilities.nii.gz", fails)])
    assert _files(tmp_path) == ["a.nii.gz"]  # no temp, no new/deeper folders
    np.testing.assert_array_equal(load_label(keep).data, 1)  # the first file was not replaced either


def test_no_overwrite_keeps_an_existing_file(tmp_path):
    ref, labels = _volume()
    target = save_volume(tmp_path / "a.nii.gz", labels, ref)
    with pytest.raises(OutputExistsError, match="a.nii.gz: it already exists"):
        save_volume(target, labels * 2, ref, overwrite=False)
    np.testing.assert_array_equal(load_label(target).data, 1)
    assert save_volume(tmp_path / "b.nii.gz", labels, ref, overwrite=False).is_file()
    assert _files(tmp_path) == ["a.nii.gz", "b.nii.gz"]


def test_stale_temps_of_the_write_pattern_are_removed(tmp_path):
    temps = [_temp_sibling(tmp_path / n) for n in ("last.safetensors", "curves.png", "seg.nii.gz", "log.jsonl")]
    for t in temps:
        assert TEMP_PATTERN.match(t.name), t.name
        t.write_text("debris")
    keep = ["last.safetensors", ".hidden", ".tmp-0123456789abcdef0123456789abcdef", "x.tmp-1234abcd.png"]
    for n in keep:
        (tmp_path / n).write_text("keep")
    assert remove_stale_temps(tmp_path, older_than_s=3600) == []  # fresh: possibly another writer's
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == sorted(t.name for t in temps)
    assert _files(tmp_path) == sorted(keep)
    assert remove_stale_temps(tmp_path / "missing") == []


# ----------------------------------------------------------------------------- 3. full disk, read-only
def test_full_disk_efbig_gives_write_error_and_keeps_earlier_files(tmp_path):
    result = _python(FSIZE_LIMIT.format(limit=200_000) + f"""
import json, numpy as np, torch
from pathlib import Path
from engine.io import Volume, WriteError, save_volume
from engine.checkpoint import save_checkpoint
from engine.networks import build_network
out = Path({str(tmp_path)!r})
ref = Volume.from_array(np.zeros((64, 64, 64), np.float32), np.eye(4))
save_volume(out / "small.nii.gz", np.ones((64, 64, 64), np.uint8), ref)   # compresses to a few kB
noise = np.random.default_rng(0).normal(size=(64, 64, 64)).astype(np.float32)  # 1 MB, incompressible
report = {{}}
for name, write in [("volume", lambda: save_volume(out / "small.nii.gz", noise, ref)),
                    ("checkpoint", lambda: save_checkpoint(out / "m.safetensors",
                                                           build_network("mambahome", 1, 2, "small")))]:
    try:
        write()
        report[name] = "written"
    except WriteError as exc:
        report[name] = [str(exc), exc.errno]
print(json.dumps(report))
""")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    message, code = report["volume"]
    assert code == 27 and f"cannot write NIfTI volume {tmp_path / 'small.nii.gz'}: the file is larger" in message
    message, code = report["checkpoint"]  # safetensors' own error type, recognised by its os error
    assert code == 27 and f"cannot write checkpoint {tmp_path / 'm.safetensors'}" in message
    assert _files(tmp_path) == ["small.nii.gz"]
    np.testing.assert_array_equal(load_label(tmp_path / "small.nii.gz").data, 1)  # the earlier good file


def test_cli_predict_on_a_full_disk_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_checkpoint):
    ckpt, scan = tiny_checkpoint
    out = tmp_path / "out" / "seg.nii.gz"
    result = _python(FSIZE_LIMIT.format(limit=30_000) + f"""
import sys
from engine.cli import main
sys.exit(main(["predict", "--checkpoint", {str(ckpt)!r}, "--input", {str(scan)!r}, "--output", {str(out)!r},
               "--device", "cpu", "--quiet", "--probabilities"]))
""")
    assert result.returncode == 2, result.stderr
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in result.stderr
    assert err[0].startswith("mambahome predict: error: cannot write NIfTI volume") and "seg_probabilities" in err[0]
    assert _files(tmp_path) == []  # neither file, no temps, not even the output folder


def test_tmpfs_full_and_read_only_mount(tmp_path):
    prefix = _private_mount_prefix()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
import json, subprocess, numpy as np
from pathlib import Path
from engine.io import Volume, WriteError, save_volume
from engine.cases import CaseStore
mnt = Path({str(mnt)!r})
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], check=True)
ref = Volume.from_array(np.zeros((64, 64, 64), np.float32), np.eye(4))
store = CaseStore(mnt / "cases")
store.add(ref, np.zeros((64, 64, 64), np.uint8), modality="CT", class_names=["bg", "fg"], case_id="good")
noise = np.random.default_rng(0).normal(size=(64, 64, 64)).astype(np.float32)
report = {{}}
try:
    store.add(Volume.from_array(noise, np.eye(4)), np.zeros((64, 64, 64), np.uint8), modality="CT",
              class_names=["bg", "fg"], case_id="big")
except WriteError as exc:
    report["full"] = [str(exc), exc.errno]
report["after_full"] = sorted(p.name for p in (mnt / "cases").iterdir())
subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
try:
    save_volume(mnt / "cases" / "x.nii.gz", np.ones((64, 64, 64), np.uint8), ref)
except WriteError as exc:
    report["ro"] = [str(exc), exc.errno]
report["good"] = CaseStore(mnt / "cases", readonly=True).ids()
print(json.dumps(report))
"""
    result = _python(script, prefix=prefix)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    message, code = report["full"]
    assert code == 28 and "cannot write case 'big' into the case store" in message and "disk is full" in message
    assert report["after_full"] == ["good"]  # no half case, no temp folder
    message, code = report["ro"]
    assert code == 30 and "x.nii.gz: the file system is mounted read-only" in message
    assert report["good"] == ["good"]


def test_read_only_folders_give_one_line_and_exit_2(tmp_path, tiny_checkpoint):
    prefix = _unprivileged_prefix()
    ckpt, scan = tiny_checkpoint
    ro = tmp_path / "ro"
    ro.mkdir()
    store_dir = tmp_path / "store"
    data = tmp_path / "data"
    from engine.synth import write_phantom_dataset

    write_phantom_dataset(data, cases=2, shape=(16, 16, 16))
    ro.chmod(0o555)
    try:
        result = _python(f"""
import json, os, numpy as np
from engine.cli import main
from engine.cases import CaseStore
from engine.io import Volume, WriteError
report = {{"predict": main(["predict", "--checkpoint", {str(ckpt)!r}, "--input", {str(scan)!r},
                            "--output", {str(ro / "seg.nii.gz")!r}, "--device", "cpu", "--quiet"]),
          "train": main(["train", "--dataset", {str(data)!r}, "--out", {str(ro / "run")!r}, "--steps", "1",
                          "--device", "cpu", "--quiet", "--preset", "tiny"])}}
store = CaseStore({str(store_dir)!r})
os.chmod({str(store_dir)!r}, 0o555)
ref = Volume.from_array(np.zeros((4, 4, 4), np.float32), np.eye(4))
try:
    store.add(ref, np.zeros((4, 4, 4), np.uint8), modality="CT", class_names=["bg", "fg"], case_id="c1")
except WriteError as exc:
    report["case"] = str(exc)
print(json.dumps(report))
""", prefix=prefix)
    finally:
        ro.chmod(0o755)
        store_dir.chmod(0o755)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["predict"] == 2 and report["train"] == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("mambahome")]
    assert "Traceback" not in result.stderr
    assert lines[0] == (f"mambahome predict: error: cannot write NIfTI volume {ro / 'seg.nii.gz'}: "
                        "permission denied (the folder is not writable for this user)")
    assert lines[1].startswith("mambahome train: error: ") and str(ro / "run") in lines[1]
    assert "permission denied" in lines[1].lower()
    assert report["case"].startswith(f"cannot write case 'c1' into the case store {store_dir}: permission denied")
    assert _files(ro) == [] and _files(store_dir) == []


def test_cli_turns_a_write_into_a_file_path_into_one_line(tmp_path, tiny_checkpoint, capsys):
    ckpt, scan = tiny_checkpoint
    (tmp_path / "afile").write_text("x")
    assert _predict(ckpt, scan, tmp_path / "afile" / "seg.nii.gz") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mambahome predict: error: cannot write NIfTI volume") and "afile" in err
    assert "\n" not in err


# ----------------------------------------------------------------------------- 4. names from records
@pytest.mark.parametrize("name", ["liver01", "Patient_7.v2", "left kidney", "Leber", "a" * 128, "x-y"])
def test_safe_names_pass(name):
    assert safe_name(name, "case id") == name
    assert child_path("/store", name, "case id", ".nii.gz") == Path("/store") / (name + ".nii.gz")


@pytest.mark.parametrize("name, why", [
    ("../../../escape", "'/'"), ("..", "starts with '.'"), (".", "starts with '.'"), ("/etc/passwd", "'/'"),
    ("a\\b", "'\\\\\\\\'"), ("C:evil", "':'"), ("", "empty"), ("a" * 129, "129 characters"),
    ("tab\there", "control"), ("nul\x00", "control"), ("new\nline", "control"), (" padded", "whitespace"),
    (".hidden", "starts with '.'"), (7, "not a string"), (None, "not a string")])
def test_unsafe_names_are_refused(name, why):
    with pytest.raises(UnsafeNameError, match=why):
        safe_name(name, "case id")


def test_is_within():
    assert is_within("imagesTr/a.nii.gz", "/data/ds") and is_within("./x/../y", "/data/ds")
    assert not is_within("../other/a.nii.gz", "/data/ds") and not is_within("/etc/passwd", "/data/ds")
    assert not is_within("../ds2/a", "/data/ds")  # a sibling sharing the prefix


def _store_with_case(tmp_path):
    store = CaseStore(tmp_path / "store")
    ref, labels = _volume()
    store.add(ref, labels, modality="CT", class_names=CLASSES, case_id="good")
    return store, ref, labels


def test_tampered_case_id_is_not_listed_and_never_names_a_file(tmp_path):
    store, _, _ = _store_with_case(tmp_path)
    evil = store.root / "evil"
    shutil.copytree(store.root / "good", evil)
    meta = json.loads((evil / "case.json").read_text())
    (evil / "case.json").write_text(json.dumps(dict(meta, case_id="../../../escape")))
    other = store.root / "other"
    shutil.copytree(store.root / "good", other)
    (other / "case.json").write_text(json.dumps(dict(meta, case_id="other", class_names=["bg", "a/b"])))
    with pytest.warns(UserWarning) as caught:
        assert store.ids() == ["good"]
    messages = " ".join(str(w.message) for w in caught)
    assert "case id '../../../escape' contains '/'" in messages and "class name 'a/b'" in messages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_dataset(store.root).case_ids == ["good"]  # train-eval names predictions by these ids


def test_case_folder_linking_outside_the_store_is_not_followed(tmp_path):
    store, ref, labels = _store_with_case(tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(store.root / "good", outside)
    meta = json.loads((outside / "case.json").read_text())
    (outside / "case.json").write_text(json.dumps(dict(meta, case_id="linked")))
    (store.root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.warns(UserWarning, match="is a link to"):
        assert store.ids() == ["good"]
    assert "linked" not in store
    with pytest.raises(CaseStoreError, match="no case 'linked'"):
        store.remove("linked")
    with pytest.raises(CaseStoreError, match="already exists"):
        store.add(ref, labels, modality="CT", class_names=CLASSES, case_id="linked")
    # replacing the id replaces the link, never writes through it
    store.add(ref, labels * 2, modality="CT", class_names=CLASSES, case_id="linked", overwrite=True)
    assert not (store.root / "linked").is_symlink() and store.ids() == ["good", "linked"]
    assert json.loads((outside / "case.json").read_text())["case_id"] == "linked"
    np.testing.assert_array_equal(load_label(outside / "label.nii.gz").data, 1)
    assert sorted(p.name for p in store.root.iterdir()) == ["good", "linked"]


def _msd(tmp_path, image_entry, label_entry, labels=None):
    ref, lab = _volume()
    root = tmp_path / "ds"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    save_volume(root / "imagesTr" / "a.nii.gz", ref.data, ref)
    save_volume(root / "labelsTr" / "a.nii.gz", lab, ref)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_volume(outside / "b.nii.gz", lab, ref)
    (root / "dataset.json").write_text(json.dumps({
        "name": "t", "modality": {"0": "CT"}, "labels": labels or {"0": "background", "1": "organ"},
        "training": [{"image": image_entry, "label": label_entry}]}))
    return root


def test_dataset_entries_outside_the_folder_need_allow_outside(tmp_path):
    root = _msd(tmp_path, "./imagesTr/a.nii.gz", "../elsewhere/b.nii.gz")
    with pytest.raises(DatasetError, match=r"label '../elsewhere/b.nii.gz' lies outside the dataset folder"):
        load_dataset(root)
    ds = load_dataset(root, allow_outside=True)
    assert ds.cases[0].label == (tmp_path / "elsewhere" / "b.nii.gz").resolve()


def test_dataset_absolute_entry_and_unsafe_class_name(tmp_path):
    root = _msd(tmp_path, str(tmp_path / "elsewhere" / "b.nii.gz"), "./labelsTr/a.nii.gz")
    with pytest.raises(DatasetError, match="image .* lies outside"):
        load_dataset(root)
    shutil.rmtree(root)
    root = _msd(tmp_path / "2", "./imagesTr/a.nii.gz", "./labelsTr/a.nii.gz",
                labels={"0": "background", "1": "../../x"})
    with pytest.raises(DatasetError, match=r"dataset.json: class name '../../x' contains '/'"):
        load_dataset(root)


# ----------------------------------------------------------------------------- 5. concurrent writers
def _save_many(root: str, case_id: str, n: int, seed: int, queue) -> None:
    """One writer process: ``n`` replacing saves of ``case_id``, then 15 saves with automatic ids.
    Volumes are tiny so that the renames of the two processes overlap as often as possible."""
    ref = Volume.from_array(np.random.default_rng(seed).normal(size=(4, 4, 4)).astype(np.float32), np.eye(4))
    store = CaseStore(root)
    errors = []
    jobs = [{"case_id": case_id, "overwrite": True}] * n + [{"source_file": "/scans/auto.nii.gz"}] * 15
    for i, kwargs in enumerate(jobs):
        try:
            store.add(ref, np.full((4, 4, 4), (i + seed) % 2 + 1, np.uint8), modality="CT", class_names=CLASSES,
                      **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is the finding
            errors.append(f"{type(exc).__name__}: {exc}")
    queue.put(errors)


def test_two_processes_saving_the_same_case_never_fail(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    root = str(tmp_path / "store")
    CaseStore(root)
    procs = [ctx.Process(target=_save_many, args=(root, "shared", 40, seed, queue)) for seed in (0, 1)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [[], []]
    store = CaseStore(root)
    ids = store.ids()
    assert "shared" in ids and len(ids) == 1 + 30  # every automatic save got its own id
    assert sorted(i for i in ids if i != "shared") == sorted(["auto"] + [f"auto_{k}" for k in range(2, 31)])
    image, label, record = store.load("shared")  # the last writer's complete case
    assert record.case_id == "shared" and label.shape == (4, 4, 4)
    assert [p.name for p in Path(root).iterdir() if p.name.startswith(".")] == []


def test_saves_take_the_store_lock(tmp_path):
    from engine.locks import folder_lock

    store, ref, labels = _store_with_case(tmp_path)
    waiting = CaseStore(store.root, lock_timeout_s=0.2)
    with folder_lock(store.root):  # another writer in the middle of its rename
        with pytest.raises(CaseStoreError, match="held this folder's lock"):
            waiting.add(ref, labels, modality="CT", class_names=CLASSES, case_id="second")
        with pytest.raises(CaseStoreError, match="held this folder's lock"):
            waiting.remove("good")
    assert store.ids() == ["good"] and _files(store.root) == ["good"]
    waiting.add(ref, labels, modality="CT", class_names=CLASSES, case_id="second")
    assert store.ids() == ["good", "second"]


# ----------------------------------------------------------------------------- run folders
def _killed_run(run: Path) -> None:
    """The files a run killed before its first save leaves (plus temp files of killed writes)."""
    run.mkdir()
    for name in ("config.json", "split.json", "log.jsonl", "log.csv"):
        (run / name).write_text("{}")
    for name in ("last.safetensors", "curves.png"):
        _temp_sibling(run / name).write_bytes(b"half")


def test_run_killed_before_its_first_save_can_start_again_or_resume(tmp_path):
    run = tmp_path / "run"
    _killed_run(run)
    assert prepare_run_folder(run, resume=False) is False  # a fresh start is allowed
    assert _files(run) == ["config.json", "log.csv", "log.jsonl", "split.json"]  # temp debris gone
    _killed_run(tmp_path / "run2")
    with pytest.warns(UserWarning, match="stopped before its first save"):
        assert prepare_run_folder(tmp_path / "run2", resume=True) is False  # --resume starts over
    assert not any(p.name.startswith(".") for p in (tmp_path / "run2").iterdir())


def test_run_folder_with_saved_results_is_protected(tmp_path):
    run = tmp_path / "run"
    _killed_run(run)
    (run / "resume.safetensors").write_bytes(b"state")
    (run / "last.safetensors").write_bytes(b"weights")
    with pytest.raises(RunFolderError, match="already holds a training run; pass --resume"):
        prepare_run_folder(run, resume=False)
    assert prepare_run_folder(run, resume=True) is True
    (run / "resume.safetensors").unlink()
    with pytest.raises(RunFolderError, match="no resume.safetensors"):
        prepare_run_folder(run, resume=True)
    # a finished run (no resume state): a new run there is refused without suggesting --resume
    with pytest.raises(RunFolderError, match=r"already holds a finished training run \(last.safetensors\); "
                                             r"choose a new --out, or fine-tune") as exc:
        prepare_run_folder(run, resume=False)
    assert "--resume" not in str(exc.value)
    with pytest.raises(RunFolderError, match="not found"):
        prepare_run_folder(tmp_path / "typo", resume=True)
    assert prepare_run_folder(tmp_path / "new", resume=False) is False
