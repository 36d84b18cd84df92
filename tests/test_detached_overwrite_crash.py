"""A header + data pair (``.nhdr`` / ``.mhd``) replaced by a process killed outright at any point.

``engine.io._write_detached`` moves the new data file into place, then the new header. A process killed (SIGKILL,
power loss) between the two renames used to leave the NEW data under the OLD header - a volume that opens silently
when shape and dtype match, with the wrong voxels on the wrong grid - and the old data only under a hidden name that
``remove_stale_temps`` later deleted. Now a journal in the write's hidden folder records the replacement before the
first rename, and every recovery point (``remove_stale_temps``, every read of the pair, the next write of it) makes
the pair entirely old or entirely new, never deleting the old files before that.

The kills are real: a driver process forks one child per kill point; the child counts the file system operations
the write makes (``os.replace``, ``os.link``, ``os.unlink``, ``os.rmdir``) and SIGKILLs itself before the
``n``-th, logging every operation that completed. The write is new exactly when the header's rename completed.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import engine.io as eio
from engine.formats import detached_data_file, read_raw
from engine.io import (PAIR_JOURNAL, TEMP_FOLDER_PATTERN, OutputExistsError, Volume, VolumeError, load_label,
                       recover_interrupted_write, remove_stale_temps, save_volume)

pytest.importorskip("SimpleITK")
pytest.importorskip("nrrd")
if not hasattr(os, "fork"):
    pytest.skip("the kills are made in forked children", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
SHAPE = (5, 6, 7)
OLD_AFFINE = [[-0.8, 0.0, 0.0, 12.0], [0.0, -0.9, 0.0, -7.5], [0.0, 0.0, 2.5, 30.0], [0, 0, 0, 1]]
NEW_AFFINE = [[-0.5, 0.0, 0.0, 2.0], [0.0, -0.6, 0.0, 4.5], [0.0, 0.0, 1.5, -3.0], [0, 0, 0, 1]]
NEWEST_AFFINE = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0, 0, 0, 1]]


def _old_labels():
    return np.ones(SHAPE, np.uint8)


def _new_labels():  # same shape and dtype as the old ones: a mixed pair opens without a word
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 3).astype(np.uint8)


def _newest_labels():
    return np.full(SHAPE, 2, np.uint8)


def _ref(affine):
    return Volume.from_array(np.zeros(SHAPE, np.float32), np.array(affine, dtype=np.float64))


# The driver: for n = 0, 1, ... forks a child that writes the new pair over the scenario folder's (old pair or
# nothing) and SIGKILLs itself before its n-th file system operation, until a child finishes unkilled.
DRIVER = textwrap.dedent("""
    import hashlib, json, os, signal, sys
    sys.path.insert(0, {repo!r})
    import numpy as np
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_detached_overwrite_crash import _new_labels, _old_labels, _ref, NEW_AFFINE, OLD_AFFINE
    from engine.io import save_volume

    cfg = json.loads(sys.argv[1])
    root, name, routes = Path(cfg["root"]), cfg["name"], cfg["routes"]
    results = []
    n = 0
    while True:
        killed_any = False
        for route in routes:
            folder = root / f"kill-{{n:02d}}-{{route}}"
            folder.mkdir(parents=True)
            old = {{}}
            if cfg["old"]:
                save_volume(folder / name, _old_labels(), _ref(OLD_AFFINE))
                old = {{f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in os.listdir(folder)}}
            log = root / f"kill-{{n:02d}}-{{route}}.log"
            pid = os.fork()
            if pid == 0:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                count = [0]

                def hook(op, real, fail=False):
                    def wrapped(*args, **kwargs):
                        if fail:
                            raise PermissionError(1, "Operation not permitted")  # no hard links here (FAT)
                        if count[0] == n:
                            os.kill(os.getpid(), signal.SIGKILL)
                        result = real(*args, **kwargs)
                        count[0] += 1
                        os.write(fd, (json.dumps([op] + [str(a) for a in args]) + "\\n").encode())
                        return result
                    return wrapped

                os.replace = hook("replace", os.replace)
                os.link = hook("link", os.link, fail=cfg["no_links"])
                os.unlink = hook("unlink", os.unlink)
                os.rmdir = hook("rmdir", os.rmdir)
                save_volume(folder / name, _new_labels(), _ref(NEW_AFFINE), overwrite=cfg["overwrite"])
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            assert killed or os.WEXITSTATUS(status) == 0, status
            killed_any |= killed
            results.append({{"n": n, "route": route, "folder": str(folder), "log": str(log), "killed": killed,
                             "old": old}})
        if not killed_any:
            break
        n += 1
    print(json.dumps(results))
""")


def _crash_at_every_point(root: Path, name: str, *, old: bool, overwrite: bool = True, no_links: bool = False,
                          routes=("sweep", "read", "write")):
    cfg = {"root": str(root), "name": name, "old": old, "overwrite": overwrite, "no_links": no_links,
           "routes": list(routes)}
    script = DRIVER.format(repo=str(REPO), tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script, json.dumps(cfg)], capture_output=True, text=True,
                            timeout=300, cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _completed_ops(log: Path):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _digest(folder: Path):
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in os.listdir(folder)
            if (folder / f).is_file()}


def _hidden(folder: Path):
    return sorted(f for f in os.listdir(folder) if f.startswith("."))


def _journaled(folder: Path):
    return [f for f in os.listdir(folder) if TEMP_FOLDER_PATTERN.match(f) and (folder / f / PAIR_JOURNAL).exists()]


def _assert_pair(folder: Path, name: str, expected: str, old_digest):
    """The pair in ``folder`` is exactly the old one (byte for byte; or nothing when there was none) or exactly the
    new one (its voxels and grid), with no other file beside it."""
    pair = sorted([name, detached_data_file(folder / name).name])
    if expected == "old" and not old_digest:
        assert os.listdir(folder) == []
        return
    assert sorted(os.listdir(folder)) == pair
    vol = load_label(folder / name)
    if expected == "old":
        assert _digest(folder) == old_digest
        np.testing.assert_array_equal(vol.data, _old_labels())
        np.testing.assert_allclose(vol.affine, OLD_AFFINE, atol=1e-6)
    else:
        np.testing.assert_array_equal(vol.data, _new_labels())
        np.testing.assert_allclose(vol.affine, NEW_AFFINE, atol=1e-6)


CASES = [  # (name, an older pair there, overwrite, no hard links)
    pytest.param("seg.nhdr", True, True, False, id="nhdr-over-old"),
    pytest.param("seg.mhd", True, True, False, id="mhd-over-old"),
    pytest.param("SEG.NHDR", True, True, True, id="nhdr-over-old-no-hard-links"),
    pytest.param("seg.mhd", True, True, True, id="mhd-over-old-no-hard-links"),
    pytest.param("seg.nhdr", False, True, False, id="nhdr-new"),
    pytest.param("SEG.MHD", False, False, False, id="mhd-new-no-overwrite"),
]


@pytest.mark.parametrize("name,old,overwrite,no_links", CASES)
def test_a_kill_at_any_point_leaves_the_old_or_the_new_pair_after_recovery(tmp_path, name, old, overwrite,
                                                                            no_links):
    results = _crash_at_every_point(tmp_path / "runs", name, old=old, overwrite=overwrite, no_links=no_links)
    points = {r["n"] for r in results}
    # every step was a kill point: the journal's rename; per file (data, then header) the old file's hard link or
    # move aside and the new file's move (no overwrite: its hard link and the temporary name's removal); then the
    # clean-up (the old files, the journal, the folder); the last n is the write left to finish
    assert max(points) == (9 if old else 5 if overwrite else 7), points
    seen = set()
    for r in results:
        folder, log = Path(r["folder"]), Path(r["log"])
        ops = _completed_ops(log)
        header = folder / name
        # the header's move into place is the commit point: new exactly when it completed
        expected = "new" if any(op[0] in ("replace", "link") and op[2] == str(header) for op in ops) else "old"
        seen.add((expected, r["killed"]))
        where = f"kill point {r['n']} ({r['route']}), ops done: {[op[0] + ' ' + Path(op[-1]).name for op in ops]}"
        if r["route"] == "sweep":  # a run start's sweep
            removed = remove_stale_temps(folder)
            assert all(TEMP_FOLDER_PATTERN.match(p.name) for p in removed), where
        elif r["route"] == "read":  # a read of the pair, before any sweep
            if expected == "old" and not r["old"]:
                with pytest.raises(VolumeError, match="file not found"):
                    load_label(header)
            else:
                vol = load_label(header)
                want = (_old_labels(), OLD_AFFINE) if expected == "old" else (_new_labels(), NEW_AFFINE)
                np.testing.assert_array_equal(vol.data, want[0], err_msg=where)
                np.testing.assert_allclose(vol.affine, want[1], atol=1e-6, err_msg=where)
            assert _journaled(folder) == [], where  # the read finished the interrupted replacement
            remove_stale_temps(folder)  # a write killed before its first move leaves only new files: swept
        else:  # the next write of the pair
            save_volume(header, _newest_labels(), _ref(NEWEST_AFFINE))
            assert _journaled(folder) == [], where
            vol = load_label(header)
            np.testing.assert_array_equal(vol.data, _newest_labels())
            np.testing.assert_allclose(vol.affine, NEWEST_AFFINE, atol=1e-6)
            remove_stale_temps(folder)  # a write killed before its first move leaves only new files: swept
            assert sorted(os.listdir(folder)) == sorted([name, detached_data_file(header).name]), where
            continue
        try:
            _assert_pair(folder, name, expected, r["old"])
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from exc
        assert _hidden(folder) == [], where
    assert ("old", True) in seen and ("new", True) in seen and ("new", False) in seen  # killed before and after


def test_the_mixed_state_is_real_and_never_read(tmp_path):
    """The kill right after the data file's move: on disk the new voxels lie under the old header (the raw reader
    shows the mix: a gzip data file has no size in the header), yet every engine read gets the old pair, put back."""
    results = _crash_at_every_point(tmp_path / "runs", "seg.nhdr", old=True, routes=("read",))
    mixed = None
    for r in results:
        ops = _completed_ops(Path(r["log"]))
        folder = Path(r["folder"])
        data = detached_data_file(folder / "seg.nhdr")
        if ops and ops[-1][0] == "replace" and ops[-1][2] == str(data):
            mixed = r
    assert mixed is not None
    folder = Path(mixed["folder"])
    raw = read_raw(folder / "seg.nhdr")  # the formats reader, below the recovery
    np.testing.assert_array_equal(raw.data, _new_labels())  # the new voxels...
    np.testing.assert_allclose(raw.affine, OLD_AFFINE, atol=1e-6)  # ...on the old grid
    assert len(_journaled(folder)) == 1
    vol = load_label(folder / "seg.nhdr")
    np.testing.assert_array_equal(vol.data, _old_labels())
    np.testing.assert_allclose(vol.affine, OLD_AFFINE, atol=1e-6)
    assert _digest(folder) == mixed["old"] and _hidden(folder) == []


def _interrupted_pair(tmp_path: Path, name: str = "seg.nhdr") -> Path:
    """A folder whose pair a killed write left as new data under the old header, journal and old data kept."""
    results = _crash_at_every_point(tmp_path / "runs", name, old=True, routes=("sweep",))
    for r in results:
        ops = _completed_ops(Path(r["log"]))
        folder = Path(r["folder"])
        if ops and ops[-1][0] == "replace" and ops[-1][2] == str(detached_data_file(folder / name)):
            return Path(r["folder"])
    raise AssertionError("no kill point between the two moves")


def test_a_replacement_in_progress_is_neither_read_nor_swept(tmp_path, monkeypatch):
    """While the writer is alive (it holds the journal's lock) the pair is mixed for a moment: a read waits, then
    refuses naming the file; the sweeps keep the folder and the old files it holds, whatever their age."""
    import fcntl

    folder = _interrupted_pair(tmp_path)
    (pending,) = _journaled(folder)
    before = _digest(folder)
    fd = os.open(folder / pending / PAIR_JOURNAL, os.O_RDONLY)  # "the writer", alive
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        monkeypatch.setattr(eio, "PAIR_WAIT_S", 0.2)
        with pytest.raises(VolumeError, match=r"seg\.nhdr: another process is replacing this file right now"):
            load_label(folder / "seg.nhdr")
        assert remove_stale_temps(folder) == []
        assert remove_stale_temps(folder, older_than_s=3600) == []
        assert _digest(folder) == before and _journaled(folder) == [pending]
        assert sorted(os.listdir(folder / pending)) == ["journal.json", "old-data.old", "seg.nhdr"]
    finally:
        os.close(fd)  # "the writer" killed: its lock goes with it
    vol = load_label(folder / "seg.nhdr")
    np.testing.assert_array_equal(vol.data, _old_labels())
    assert _hidden(folder) == []


def test_without_file_locks_a_read_refuses_and_the_sweep_goes_by_age(tmp_path, monkeypatch):
    folder = _interrupted_pair(tmp_path, "seg.mhd")
    monkeypatch.setattr(eio, "_try_lock", lambda fd: None)  # Windows: no flock
    with pytest.raises(VolumeError, match=r"seg\.mhd: a write of this file was interrupted .*remove_stale_temps"):
        load_label(folder / "seg.mhd")
    assert remove_stale_temps(folder, older_than_s=3600) == []  # fresh: maybe a write in progress
    assert len(_journaled(folder)) == 1
    (removed,) = remove_stale_temps(folder)
    assert TEMP_FOLDER_PATTERN.match(removed.name)
    vol = load_label(folder / "seg.mhd")
    np.testing.assert_array_equal(vol.data, _old_labels())
    np.testing.assert_allclose(vol.affine, OLD_AFFINE, atol=1e-6)
    assert _hidden(folder) == []


def test_a_journal_that_is_not_a_pairs_is_kept_and_named(tmp_path):
    save_volume(tmp_path / "seg.mhd", _old_labels(), _ref(OLD_AFFINE))
    odd = tmp_path / ".seg.mhd.tmp-0123abcd"
    odd.mkdir()
    (odd / PAIR_JOURNAL).write_text(json.dumps({"version": 1, "header": "../etc.mhd", "data": "x", "new": {}}))
    (odd / "old-data.old").write_bytes(b"keep me")
    with pytest.raises(VolumeError, match="not the journal of seg.mhd"):
        recover_interrupted_write(tmp_path / "seg.mhd")
    assert remove_stale_temps(tmp_path) == []
    assert (odd / "old-data.old").read_bytes() == b"keep me"
    save_volume(tmp_path / "seg.mhd", _new_labels(), _ref(NEW_AFFINE))  # a write is not blocked by it
    with pytest.raises(VolumeError, match=r"check them, then delete .*\.seg\.mhd\.tmp-0123abcd"):
        load_label(tmp_path / "seg.mhd")  # a read is: the pair may be mixed, and this cannot tell
    assert (odd / "old-data.old").read_bytes() == b"keep me"
    shutil.rmtree(odd)
    np.testing.assert_array_equal(load_label(tmp_path / "seg.mhd").data, _new_labels())


def test_a_failure_after_the_header_moved_puts_the_whole_old_pair_back(tmp_path, monkeypatch):
    """An exception (here Ctrl-C) right after the header's move, inside the writer: the caller is told the write
    failed, so the pair is the old one again, not the new header with the old data file."""
    save_volume(tmp_path / "seg.nhdr", _old_labels(), _ref(OLD_AFFINE))
    before = _digest(tmp_path)
    real_replace = os.replace

    def interrupted(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if Path(dst) == tmp_path / "seg.nhdr" and Path(src).parent != tmp_path and not raised:
            raised.append(dst)
            raise KeyboardInterrupt

    raised = []

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_volume(tmp_path / "seg.nhdr", _new_labels(), _ref(NEW_AFFINE))
    monkeypatch.undo()
    assert _digest(tmp_path) == before
    np.testing.assert_array_equal(load_label(tmp_path / "seg.nhdr").data, _old_labels())


def test_no_overwrite_still_refuses_after_a_committed_killed_write(tmp_path):
    """A write killed after its header's move is complete: the pair is the new one, and it counts as existing."""
    results = _crash_at_every_point(tmp_path / "runs", "seg.mhd", old=False, routes=("sweep",))
    committed = [r for r in results if r["killed"] and any(op[0] == "replace" and op[2].endswith("seg.mhd")
                                                          for op in _completed_ops(Path(r["log"])))]
    assert committed
    folder = Path(committed[0]["folder"])
    with pytest.raises(OutputExistsError):
        save_volume(folder / "seg.mhd", _newest_labels(), _ref(NEWEST_AFFINE), overwrite=False)
    np.testing.assert_array_equal(load_label(folder / "seg.mhd").data, _new_labels())
    assert _hidden(folder) == []


def test_a_copied_interrupted_folder_keeps_the_old_data_and_refuses(tmp_path):
    """A copy (or a backup restore) of a folder a killed write left mixed gives every file a new inode number, so the
    journal cannot tell the old files from the new: nothing is moved, the old data stays kept, and the read refuses
    naming the file instead of handing over new voxels under the old header."""
    import shutil

    folder = _interrupted_pair(tmp_path)
    copy = shutil.copytree(folder, tmp_path / "copied", symlinks=True)
    (pending,) = _journaled(copy)
    with pytest.raises(VolumeError, match=r"seg\.nhdr: .*cannot tell whether it is the old or the new file"):
        load_label(copy / "seg.nhdr")
    assert (copy / pending / "old-data.old").is_file()  # the only copy of the old voxels is kept
    assert remove_stale_temps(copy) == [] and (copy / pending / "old-data.old").is_file()
    # the original folder, inode numbers intact, is put back as it was
    vol = load_label(folder / "seg.nhdr")
    np.testing.assert_array_equal(vol.data, _old_labels())


def test_a_whole_pair_in_a_read_only_folder_reads_though_its_journal_cannot_be_removed(tmp_path, monkeypatch):
    """A write killed after its journal was made but before any file moved leaves the pair whole: on a read-only
    mount the read goes ahead (the journal stays for a later recovery) instead of being refused."""
    results = _crash_at_every_point(tmp_path / "runs", "seg.nhdr", old=True, routes=("sweep",))
    folder = None
    for r in results:
        ops = _completed_ops(Path(r["log"]))
        if ops and ops[-1][0] == "replace" and ops[-1][2].endswith(PAIR_JOURNAL):
            folder = Path(r["folder"])
    assert folder is not None
    real_unlink = os.unlink

    def read_only(path, *args, **kwargs):
        if Path(path).parent.parent == folder:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(eio.os, "unlink", read_only)
    vol = load_label(folder / "seg.nhdr")
    np.testing.assert_array_equal(vol.data, _old_labels())
    assert len(_journaled(folder)) == 1
    monkeypatch.setattr(eio.os, "unlink", real_unlink)
    load_label(folder / "seg.nhdr")
    assert _hidden(folder) == []
