"""The run folder: whether a run in it starts or resumes, its logs and plot (``log.jsonl``, ``log.csv``,
one record per step, and ``curves.png``).

A run killed before its first save leaves ``train_config.json``, ``split.json`` and empty logs but no
resume state and no checkpoint. Nothing in such a folder is worth keeping, so a fresh start reuses it and
a ``--resume`` starts over; only a folder with saved results is protected. Temporary files of writes that
were killed outright are removed at every start (a run folder has one writer).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Union

from matplotlib.figure import Figure  # the object API draws off-screen: no pyplot, no GUI backend

from engine.io import atomic_write, remove_stale_temps, write_text_atomic
from engine.locks import LockTimeout, folder_lock
from engine.train.config import BEST_FILE, CONFIG_FILE, LAST_FILE, LOG_CSV, LOG_JSONL


def write_logs(run_dir: Path, history: List[Dict[str, Any]]) -> None:
    """Rewrite ``log.jsonl`` and ``log.csv`` from the history (atomic, so a resumed run's logs never
    show steps that the resume state does not contain)."""
    write_text_atomic(run_dir / LOG_JSONL, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "loss", "lr", "seconds", "val_dice"])
    for r in history:
        writer.writerow([r["step"], f"{r['loss']:.6g}", f"{r['lr']:.6g}", f"{r['seconds']:.2f}",
                         "" if r.get("val_dice") is None else f"{r['val_dice']:.6g}"])
    write_text_atomic(run_dir / LOG_CSV, buf.getvalue())


def append_log(run_dir: Path, record: Dict[str, Any]) -> None:
    with open(run_dir / LOG_JSONL, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    with open(run_dir / LOG_CSV, "a", newline="") as f:
        csv.writer(f).writerow([record["step"], f"{record['loss']:.6g}", f"{record['lr']:.6g}",
                                f"{record['seconds']:.2f}",
                                "" if record.get("val_dice") is None else f"{record['val_dice']:.6g}"])


def plot_curves(history: Sequence[Dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss (left) and validation Dice (right) against the step, as a PNG (matplotlib Agg)."""
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_dice = fig.subplots(1, 2)
    steps = [r["step"] for r in history]
    ax_loss.plot(steps, [r["loss"] for r in history], lw=0.8)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("DiceCE loss")
    ax_loss.set_yscale("log" if all(r["loss"] > 0 for r in history) and history else "linear")
    val = [(r["step"], r["val_dice"]) for r in history if r.get("val_dice") is not None]
    if val:
        ax_dice.plot([s for s, _ in val], [d for _, d in val], "o-")
    ax_dice.set_xlabel("step")
    ax_dice.set_ylabel("validation Dice (foreground mean)")
    ax_dice.set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


class RunFolderError(ValueError):
    """A run folder that cannot be started or resumed as asked; the message says what to do."""


@contextlib.contextmanager
def run_folder_lock(run_dir: Union[str, Path], main: bool = True, create: bool = True) -> Iterator[None]:
    """Hold the run folder for one training run: a second run into it (a ``--resume`` started while the first still
    trains, two napari windows) is refused at once; both wrote the same checkpoints and interleaved their logs. The
    kernel releases the lock when its holder dies, so a killed run's folder resumes.

    A folder made here for the lock is removed again when the run leaves it empty (refused for its data or
    settings), as a run that writes nothing leaves no folder.

    Args:
        run_dir: the run folder (may not exist yet; a file there is left for :func:`prepare_run_folder` to refuse).
        main: the process that holds it (the other ranks of a distributed run share the main one's folder).
        create: make a missing folder to lock it; False (a resume) leaves a missing folder to
            :func:`prepare_run_folder`, which says that there is nothing to resume.

    Raises:
        RunFolderError: another run holds the folder.
    """
    root = Path(run_dir)
    if not main or (root.exists() and not root.is_dir()) or (not create and not root.exists()):
        yield
        return
    made = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(folder_lock(root, timeout_s=0))
            except LockTimeout:
                raise RunFolderError(f"{root}: another training run is writing into this folder now (a run still "
                                     "going, or a --resume of it started twice); wait for it to end or stop it, or "
                                     "choose another --out") from None
            yield
    finally:
        if made:
            with contextlib.suppress(OSError):
                root.rmdir()  # only when empty


def prepare_run_folder(run_dir: Union[str, Path], resume: bool, resume_file: str = "resume.safetensors",
                       result_files: Sequence[str] = ("last.safetensors", "best.safetensors"),
                       remove_temps: bool = True, finished: bool = True) -> bool:
    """Decide whether a run in ``run_dir`` resumes, and sweep the folder's stale temporary files.

    Args:
        run_dir: the run folder (may not exist yet).
        resume: the user asked to resume (``--resume``).
        resume_file: name of the resume state inside the folder.
        result_files: names of the checkpoints a run saves.
        remove_temps: delete temporary files of killed writes (pass False on all but the main process
            of a distributed run).
        finished: the folder's log says its run reached its last step (:func:`run_finished`). A run
            killed between its first checkpoint and its first resume state has checkpoints but no
            state; when it did not finish it starts over (the same seeded run rewrites them).

    Returns:
        True to resume from ``resume_file``; False to start a new run (the folder is new, empty, or
        holds only the files of a run that stopped before its first save; with ``resume`` asked this
        is said in a ``UserWarning``).

    Raises:
        RunFolderError: ``run_dir`` is a file; a new run asked for in a folder with saved results (pass
            resume or choose another folder); a resume asked for where checkpoints exist but the resume state is gone,
            or where the folder does not exist.
    """
    root = Path(run_dir)
    if root.exists() and not root.is_dir():  # else the run failed after minutes of work with "File exists"
        raise RunFolderError(f"{root}: is a file, not a run folder; choose a folder (new or a run's) for --out")
    if remove_temps:
        remove_stale_temps(root)
    has_state = (root / resume_file).is_file()
    results = [n for n in result_files if (root / n).is_file()]
    if results and not has_state and not (root / CONFIG_FILE).is_file() and not (root / LOG_JSONL).is_file():
        # no run wrote these (a run writes its settings before its first checkpoint): a model the user keeps here,
        # which "starting the run over" replaced without a word
        raise RunFolderError(f"{root} holds {', '.join(results)} but no training run ({CONFIG_FILE} and {LOG_JSONL} "
                             "are missing): a run here would overwrite them; choose a new --out")
    if results and not has_state and not finished:
        warnings.warn(f"{root}: the run was stopped before its first resume state ({', '.join(results)} "
                      "exist from its first steps); starting it over", stacklevel=2)
        return False
    if resume:
        if has_state:
            return True
        if results:  # results without a resume state reach here only when the run finished (above)
            # a finished run removes its resume state: "cannot be resumed exactly" read as if something broke
            raise RunFolderError(f"{root}: the run is finished (it completed its steps, so it keeps "
                                 f"{', '.join(results)} and no {resume_file}); nothing to resume. To train further, "
                                 f"fine-tune from its checkpoint (mambahome finetune --checkpoint "
                                 f"{root / handed_on(root, results)}) or start a new --out")
        if not root.is_dir():
            raise RunFolderError(f"{root}: run folder not found; nothing to resume (check --out)")
        warnings.warn(f"{root}: the run stopped before its first save, so there is nothing to resume; "
                      "starting it over", stacklevel=2)
        return False
    if has_state:
        raise RunFolderError(f"{root} already holds a training run; pass --resume to continue it or choose a new --out")
    if results:
        # a finished run keeps no resume state: --resume cannot continue it, so do not suggest it
        raise RunFolderError(f"{root} already holds a finished training run ({', '.join(results)}); choose a new "
                             f"--out, or fine-tune from its checkpoint (mambahome finetune --checkpoint "
                             f"{root / handed_on(root, results)})")
    return False


def handed_on(run_dir: Union[str, Path], results: Sequence[str]) -> str:
    """Which of a finished run's checkpoint files ``results`` it handed on (``RunResult.checkpoint``, as
    :func:`engine.train.loop.train` chose): ``last.safetensors`` when its ``train_config.json`` says ``select``
    last or its log holds no validation score (``--val-fraction 0``: best is a copy of last), else
    ``best.safetensors``; the last of ``results`` when neither is among them."""
    root = Path(run_dir)
    try:
        select = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8")).get("select", "best")
    except (OSError, ValueError, AttributeError):
        select = "best"
    try:
        records = [json.loads(line) for line in (root / LOG_JSONL).read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        scored = any(isinstance(r, dict) and r.get("val_dice") is not None for r in records)
    except (OSError, ValueError):
        scored = True  # unknown: the run's default choice
    name = LAST_FILE if select == "last" or not scored else BEST_FILE
    return name if name in results else results[-1]


def run_finished(run_dir: Union[str, Path], steps: int) -> bool:
    """Whether ``run_dir``'s log records its run's last step; unreadable logs count as finished,
    so a folder that cannot be judged is protected rather than restarted.

    The last step is the one the folder's own ``train_config.json`` recorded (the run that wrote the folder),
    else ``steps`` (the new run's): a finished 40-step run must not read as "stopped early" to a new command
    asking for 400 steps in the same folder, which would then overwrite its checkpoints."""
    root = Path(run_dir)
    log = root / LOG_JSONL
    if not log.is_file():
        return False
    config = root / CONFIG_FILE
    try:
        if config.is_file():
            recorded = json.loads(config.read_text(encoding="utf-8")).get("steps")
            if recorded is not None:
                steps = int(recorded)
        lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        return bool(lines) and int(json.loads(lines[-1])["step"]) >= int(steps)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True


def keep_one_checkpoint(run_dir: Union[str, Path], keep: Union[str, Path]) -> None:
    """Delete every checkpoint of a finished run folder but ``keep``: a fine-tuned version is one file (the napari
    dock and the server list every checkpoint of a models folder, and listed ``best`` and ``last`` as two versions)."""
    for path in Path(run_dir).glob("*.safetensors"):
        if path.resolve() != Path(keep).resolve():
            path.unlink(missing_ok=True)
