"""Fine-tune panel: fine-tune the selected model on the saved cases, then score before/after per class.

Two jobs, one after the other: the fine-tune (the new version is listed the moment it exists), then
the before/after Dice (:func:`engine.evaluation.score_on_cases`). The new version is selected once scored, unless it
scores below the model it would replace on the same cases: that model then stays selected and the new one stays in
the list (:meth:`FinetunePanel._select_if_not_weaker`), so the next Segment never uses a weaker model unnoticed.
An interactive (promptable) model is fine-tuned the same way, its task taken from the checkpoint; it is
class-agnostic (every class of the cases is an object to prompt), and it is scored by the robot user
(:func:`engine.interactive.robot.robot_scores_on_cases`: Dice after
:data:`engine.scoring.ROBOT_CLICKS` clicks per object).

From an automatic model the section can also make a promptable one (:attr:`FinetunePanel.promptable_check`):
the same job with ``task="interactive"`` (:func:`engine.train.finetune.finetune` warm-starts it from the
automatic model's weights and trains it with simulated clicks). The new version is then prompted with in the
Interactive section while the automatic model stays the one that segments, and the comparison is the robot
user's Dice of the promptable model in use until then (:attr:`Session.prompt_model`, by default the bundled
one) against the new one: the automatic parent segments without clicks, so it is not a "before". Connected to a
server, the same option makes the promptable model there (``POST /finetune`` with ``task="interactive"``) from
the server's automatic model and its saved cases, and the server scores it the same way (its job's ``scores``
and ``warning``), shown here as a local result is; so is a plain fine-tune on the server, scored there against its
parent. Both score through :mod:`engine.scoring`.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from qtpy.QtWidgets import (
    QAbstractItemView, QCheckBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QHeaderView, QLabel, QListView,
    QListWidget, QMessageBox, QProgressBar, QPushButton, QSpinBox, QTableWidget, QTableWidgetItem, QWidget,
)

# the robot user's clicks per object and the words for the cases scored on: the server scores and says them too
from engine.class_names import brief_names
from engine.scoring import ROBOT_CLICKS, scored_where
# each class's before/after as text: the 3D Slicer module (which imports no engine) shows the same
from mambahome_client.client import MAX_FINETUNE_STEPS
from mambahome_client.scores import per_class_rows

from .. import _settings
from .._models import ModelEntry, read_entry
from ._parts import LossPlot
from .._session import Session
from ._base import Panel

HELD_OUT_MIN_CASES = 6
"""With at least this many saved cases a fifth is held out of fine-tuning and scored; fewer are all
trained on, and the before/after Dice is then labelled as measured on training cases."""
HELD_OUT_FRACTION = 0.2
REMOTE_MAX_STEPS = MAX_FINETUNE_STEPS
"""The most steps a server's fine-tune job takes (``mambahome serve``): asked for when a time limit ends the job."""
PROMPTABLE_TASK = "interactive"
"""The engine task of a promptable model (``mambahome train --task interactive``)."""
STOP_TIP = ("End the running fine-tune now and keep what it has learnt so far, as if its time limit had been reached: "
            "the model of the step under way is validated, saved and selected as a new version, then scored against "
            "the model it started from. Cancel discards the run instead.")
REMOTE_STOP_TIP = ("Not available on this server: it is older than Stop and keep (its /version lacks the "
                   "finetune_stop capability), so its fine-tune jobs can only be cancelled (Cancel, which keeps no "
                   "model). Update the server, or give a server fine-tune a Time limit to end it with a finished "
                   "model.")
"""Stop and keep's tooltip while connected to a server that cannot stop a fine-tune job and keep its model."""
PROMPTABLE_TIP = ("Train a promptable model (clicks, boxes, scribbles in the Interactive section) from the selected "
                  "automatic model's weights on the saved cases, with simulated clicks; usually much better than "
                  "one trained from scratch. The automatic model is kept as it is and still segments.")


def finetune_defaults() -> Tuple[int, float]:
    """The engine's default fine-tuning steps and learning rate (the engine decides them, once)."""
    from engine.train.config import FINETUNE_DEFAULTS

    return int(FINETUNE_DEFAULTS["steps"]), float(FINETUNE_DEFAULTS["lr"])


def _worse_note(old: Optional[Any], scores: Dict[str, Any], where: str = "in the Interactive section",
                interactive: bool = True, kept: bool = False) -> str:
    """A warning when a new model scores below the one it would replace (``old``: that model's entry or version).

    With ``kept`` ``old`` stayed selected (:meth:`FinetunePanel._select_if_not_weaker`, or a server's job in
    :meth:`.remote.RemoteBackend.finetune`): the note says so and where to select the new one anyway
    (:func:`engine.scoring.kept_note`). Without it the new model was selected (another model had been chosen meanwhile,
    so none was selected again), so the annotator must hear it to switch back: the engine's
    :func:`engine.scoring.weaker_note`, as the server words it for its own jobs.

    Args:
        old: the model compared with (its entry or version), or None: no warning.
        scores: :func:`engine.scoring.before_after`'s answer.
        where: where the annotator chooses ``old`` again (with ``kept``: the new model).
        interactive: promptable models (prompted with), else automatic ones (they segment).
        kept: ``old`` stayed selected.
    """
    from engine.scoring import kept_note, weaker_note

    if old is None:
        return ""
    name = getattr(old, "version", old)
    note = (kept_note(name, scores, where=where, interactive=interactive) if kept else
            weaker_note(name, scores, where=where, interactive=interactive))
    return f" {note}" if note else ""


def _finds_nothing_note(old: Optional[str], scores: Dict[str, Any], interactive: bool) -> str:
    """A warning when the new version scores 0 on every class it was scored on: it is selected all the same, and
    finds none of them (an empty mask, or one in the wrong place). Classes new to the model start untrained, so its
    parent scored 0 on them too and "scores below" (:func:`_worse_note`) says nothing; a short CPU budget (a few steps
    on 3 hippocampus cases) makes such a model."""
    after = scores.get("after") or {}
    if not after or any(float(value or 0.0) > 0.0 for value in after.values()):
        return ""
    use = "prompting with it" if interactive else "segmenting with it"
    back = f", or choose {old} in the Versions list to go back to it" if old else ""
    # Dice 0 is an empty mask or one elsewhere (a short run can label a large wrong region): both are "not found"
    return (f" The new model finds none of {', '.join(after)} on these cases (Dice 0: its masks are empty or in the "
            f"wrong place), so {use} does not find them yet: fine-tune it again to train longer (more Steps, or a "
            f"Time limit){back}.")


def stopped_on_request(result: Any) -> bool:
    """Whether a fine-tune ended early because Stop and keep asked it to (not by its steps or time limit).

    The engine's :class:`engine.train.config.RunResult` says so (``stopped_on_request``); from an engine whose result
    does not carry it, the provenance of the run's last checkpoint does (the engine marks the checkpoint of a stopped
    run ``stopped_on_request``; ``best`` may be an earlier, unmarked step's). Call it in the worker (it may read a
    checkpoint header) and before :func:`keep_one_checkpoint` removes ``last``.
    """
    flag = getattr(result, "stopped_on_request", None)
    if flag is not None:
        return bool(flag)
    from engine.checkpoint import CheckpointError, read_checkpoint_metadata

    path = getattr(result, "last_checkpoint", None) or getattr(result, "best_checkpoint", None)
    if path is None:
        return False
    try:
        provenance = read_checkpoint_metadata(path).get("provenance") or {}
    except (CheckpointError, OSError):
        return False
    return bool(provenance.get("stopped_on_request"))


SCORES_FILE = "scores.json"
"""Beside a fine-tuned version's checkpoint: its per-class Dice, so the Versions list shows it again next session
(the scores lived only in the session before, and a restart listed every version without them)."""


def save_version_scores(entry: ModelEntry, scores: Dict[str, Any], compared_with: Optional[str], where: str,
                        scored_on: Optional[List[str]] = None) -> None:
    """Keep a local fine-tuned version's scores in its run folder (a few hundred bytes: fine on the GUI thread).

    A folder that cannot be written only loses the remembered scores, never the version, so errors are ignored.
    ``scored_on``: the ids of the cases scored (the Versions list tells scores of other case sets apart).
    """
    if entry.origin != "fine-tuned" or not Path(entry.path).is_file():
        return
    record = {"version": entry.version, "after": scores.get("after") or {}, "before": scores.get("before") or {},
              "compared_with": compared_with, "metric": scores.get("metric") or "dice", "where": where,
              "scored_on": sorted(scored_on) if scored_on is not None else None}
    try:
        (Path(entry.path).parent / SCORES_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    except OSError:
        pass


def load_version_scores(entry: ModelEntry) -> Optional[Dict[str, float]]:
    """The per-class Dice saved with a fine-tuned version (``None``: never scored, or not readable)."""
    saved = load_version_record(entry)
    return saved[0] if saved is not None else None


def load_version_record(entry: ModelEntry) -> Optional[Tuple[Dict[str, float], Optional[Tuple[str, ...]]]]:
    """The per-class Dice saved with a fine-tuned version and the ids of the cases it was scored on (``None`` for
    scores saved before those were recorded); ``None``: never scored, or not readable."""
    if entry.origin != "fine-tuned":
        return None
    try:
        record = json.loads((Path(entry.path).parent / SCORES_FILE).read_text(encoding="utf-8"))
        if record.get("version") != entry.version:  # another version's file copied here: not its scores
            return None
        after = {str(k): float(v) for k, v in (record.get("after") or {}).items()}
        cases = record.get("scored_on")
        return after, (tuple(sorted(str(c) for c in cases)) if isinstance(cases, list) else None)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


class FinetunePanel(Panel):
    """Steps, learning rate and time limit, Fine-tune/Stop and keep/Cancel, the live loss, the result and the version list
    (rollback)."""

    name = "finetune"
    title = "Fine-tune"

    def __init__(self, session: Session, parent: Optional[QWidget] = None) -> None:
        super().__init__(session, parent)
        self._pending_scoring: Optional[Tuple[ModelEntry, ModelEntry, List[Any], str]] = None
        form = QFormLayout(self)
        default_steps, default_lr = finetune_defaults()
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100_000)
        self.steps_spin.setValue(default_steps)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1e-1)
        self.lr_spin.setSingleStep(1e-5)
        self.lr_spin.setValue(default_lr)
        # A time limit is what an annotator knows ("5 minutes before the next scan"), not steps; the learning rate
        # then anneals to it, so a stopped run is a finished model, unlike a cancelled one.
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setDecimals(1)
        self.minutes_spin.setRange(0.0, 24 * 60.0)
        self.minutes_spin.setSingleStep(1.0)
        self.minutes_spin.setValue(0.0)
        self.minutes_spin.setSpecialValueText("no limit")
        self.minutes_spin.setSuffix(" min")
        self.minutes_spin.setToolTip("Fine-tune for this many minutes, then stop with a finished model (the learning "
                                     "rate follows the time); with a limit the time decides, not the steps. The "
                                     "limit is the training's: scoring the new and the old version on the saved "
                                     "cases follows (about two segmentations of each scored case)")
        self.minutes_spin.valueChanged.connect(lambda value: self.steps_spin.setEnabled(value <= 0))
        # (start, seconds) of a running job that its time limit ends: its progress is shown in time
        self._time_limit: Optional[Tuple[Optional[float], float]] = None  # (first step's time, seconds)
        self._cancelling = False  # Cancel pressed, the job not yet stopped
        self._stopping = False  # Stop and keep pressed, the run not yet ended
        # the fine-tune job running now (local, or a server's): the only job Stop and keep applies to
        self._finetune_job: Any = None
        self._jobs: "weakref.WeakSet[Any]" = weakref.WeakSet()  # this section's jobs (fine-tune, scoring)
        self.promptable_check = QCheckBox("Make a promptable (click/box) model from it")
        self.promptable_check.setChecked(False)
        self.finetune_button = QPushButton("Fine-tune on saved cases")
        self.finetune_button.clicked.connect(self.finetune)
        self.finetune_cancel_button = QPushButton("Cancel")
        self.finetune_cancel_button.setEnabled(False)
        self.finetune_cancel_button.clicked.connect(self.cancel)
        # A run of many minutes whose loss has flattened is worth keeping: Cancel threw it away, and only a time
        # limit set before the start ended a run with a model.
        self.finetune_stop_button = QPushButton("Stop and keep")
        self.finetune_stop_button.setEnabled(False)
        self.finetune_stop_button.clicked.connect(self.stop)
        buttons = QHBoxLayout()
        buttons.addWidget(self.finetune_button)
        buttons.addWidget(self.finetune_stop_button)
        buttons.addWidget(self.finetune_cancel_button)
        self.finetune_progress = QProgressBar()
        self.finetune_progress.setRange(0, 1)
        self.finetune_progress.setValue(0)
        self.loss_plot = LossPlot()
        self.finetune_result = QLabel("")
        self.finetune_result.setWordWrap(True)
        self.scores_table = QTableWidget(0, 3)
        self.scores_table.setHorizontalHeaderLabels(["class", "before", "after"])
        self.scores_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.scores_table.verticalHeader().setVisible(False)
        self.scores_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.scores_table.setMaximumHeight(130)
        self.scores_table.setVisible(False)
        self.versions_list = QListWidget()
        self.versions_list.setMaximumHeight(110)
        self.versions_list.setWordWrap(True)
        self.versions_list.setResizeMode(QListView.ResizeMode.Adjust)
        self.use_version_button = QPushButton("Use selected version (roll back)")
        self.use_version_button.clicked.connect(self._use_selected_version)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Learning rate", self.lr_spin)
        form.addRow("Time limit", self.minutes_spin)
        form.addRow(self.promptable_check)
        form.addRow(buttons)
        form.addRow(self.finetune_progress)
        form.addRow(self.loss_plot)
        form.addRow(self.finetune_result)
        form.addRow(self.scores_table)
        form.addRow(QLabel("Versions"))
        form.addRow(self.versions_list)
        form.addRow(self.use_version_button)
        session.models_changed.connect(self._refresh_versions)
        session.model_changed.connect(lambda *_: self._refresh_versions())
        session.model_changed.connect(lambda *_: self._offer_promptable())
        session.remote_changed.connect(lambda *_: self._offer_promptable())
        session.remote_changed.connect(lambda *_: self._offer_stop())
        session.busy_changed.connect(self._busy)
        self._offer_promptable()
        self._offer_stop()

    # ------------------------------------------------------------------ fine-tune
    def _offer_promptable(self) -> None:
        """Offer "make a promptable model" for an automatic model, local or on a server; otherwise disable it
        and say why."""
        entry = self.session.current_model
        if entry is None:
            why = "select an automatic model first (Model section)"
        elif entry.is_interactive:
            why = f"{entry.version} is already a promptable model: fine-tuning it keeps its task"
        else:
            why = None
        if why is not None:
            self.promptable_check.setChecked(False)
        self.promptable_check.setEnabled(why is None)
        self.promptable_check.setToolTip(PROMPTABLE_TIP if why is None else f"Not available: {why}.")

    def _server_can_stop(self) -> bool:
        """Whether the connected server takes Stop and keep for its fine-tune jobs (``finetune_stop``; no request)."""
        remote = self.session.remote
        return remote is not None and bool(getattr(remote, "can_stop_jobs", False))

    def _offer_stop(self) -> None:
        """Enable Stop and keep only while this section's fine-tune runs (not a local run's scoring, not another
        section's job), locally or on a server that can stop its jobs; on a server before the stop (its jobs can only
        be cancelled) say why it stays off."""
        job = self._finetune_job
        running = job is not None and job.running and self.session.job is job and not self._stopping
        older_server = self.session.remote is not None and not self._server_can_stop()
        self.finetune_stop_button.setEnabled(running and not self._cancelling and not older_server)
        self.finetune_stop_button.setToolTip(REMOTE_STOP_TIP if older_server else STOP_TIP)

    @property
    def max_minutes(self) -> Optional[float]:
        """The time limit asked for, or None (``no limit``)."""
        value = float(self.minutes_spin.value())
        return value if value > 0 else None

    @property
    def makes_promptable(self) -> bool:
        """Whether Fine-tune will make a promptable model from the selected automatic one."""
        return self.promptable_check.isEnabled() and self.promptable_check.isChecked()

    def _prompt_reference(self) -> Optional[ModelEntry]:
        """The promptable model a new one is compared with: the Interactive section's, else the bundled one."""
        prompt_model = self.session.prompt_model
        if prompt_model is not None and prompt_model.is_interactive:
            return prompt_model
        return next((e for e in self.session.entries if e.is_interactive and e.origin == "bundled"), None)

    def finetune(self) -> Optional[Any]:
        """Fine-tune the selected model on the saved cases in a worker; select the new version on success.

        With :attr:`makes_promptable` the job makes a promptable (interactive) model from the selected
        automatic one instead; the Interactive section then prompts with it.

        Returns:
            The started job, or ``None`` when refused (no model, no cases, no case folder).
        """
        session = self.session
        entry = session.current_model
        self.finetune_result.setText("")  # the last run's outcome must not read as this one's
        if entry is None:
            session.error("no model selected to fine-tune")
            return None
        if session.remote is not None:  # a server job: start, poll progress and loss, cancel
            task = PROMPTABLE_TASK if self.makes_promptable and not entry.is_interactive else None
            records = [r for r in session.remote.case_records() if getattr(r, "class_names", None)]
            # the server trains on whatever classes its cases hold: the question is asked here, as locally
            if (records and not entry.is_interactive and task is None
                    and not self._classes_agree(entry, records, f"the server's case folder ({session.remote.url})")):
                return None
            self.loss_plot.set_values([])
            self.scores_table.setVisible(False)
            # the server scores a new promptable model against the Interactive section's (else its own choice)
            reference = self._prompt_reference() if task else None
            compare_with = reference.model_id if reference is not None and session.remote.owns(reference) else None
            # the server takes at most a million steps: more than any time limit reaches
            steps = REMOTE_MAX_STEPS if self.max_minutes else int(self.steps_spin.value())
            doing = f"making a promptable model from {entry.version}" if task else f"fine-tuning {entry.version}"
            failed = (f"{doing} on the server {session.remote.url} failed (the error is in the notification); "
                      f"{entry.version} stays selected, no new version was made")
            job = session.remote.finetune(entry, steps, float(self.lr_spin.value()),
                                          on_progress=self._progress, on_log=self._log_loss,
                                          on_result=self.finetune_result.setText,
                                          # else the last progress line ("starting…") stayed, read as a live job
                                          on_finished=lambda outcome: self._finished(outcome, failed),
                                          task=task, compare_with=compare_with, on_scores=self._server_scores,
                                          max_minutes=self.max_minutes)
            if job is not None:
                self._own_job(job)
                self._finetune_job = job  # Stop and keep applies to it where the server can stop (_offer_stop)
                self.finetune_progress.setRange(0, 0)
                self._start_time_limit()
            self._offer_stop()
            return job
        store = session.case_store()
        if store is None:
            return None
        records = store.list()
        if not records:
            session.error(f"no saved cases in {store.root}: correct a segmentation and press "
                          "'Save as training case' first")
            return None
        from engine.cases import label_set_conflict

        for r in records:  # the engine reads the store as one dataset and would refuse it only after the question
            conflict = label_set_conflict(r.class_names, ((o.case_id, o.class_names) for o in records))
            if conflict is not None:
                session.error(f"the saved cases in {store.root} are labelled differently: case {r.case_id!r} has "
                              f"{brief_names(r.class_names[1:])}, case {conflict[0]!r} {brief_names(conflict[1][1:])}; "
                              "a case folder holds one "
                              "label set: move one of them to another folder (or save it again with the other's "
                              "class names)")
                return None
        promptable = self.makes_promptable and not entry.is_interactive
        reference = self._prompt_reference() if promptable else None
        # an interactive model is class-agnostic: each class of the cases is an object, nothing to map
        # (so is the promptable model made from an automatic one)
        if not entry.is_interactive and not promptable and not self._classes_agree(entry, records, str(store.root)):
            return None
        max_minutes = self.max_minutes
        # with a time limit the engine runs as many steps as it allows (steps None)
        steps = None if max_minutes else int(self.steps_spin.value())
        lr, device = float(self.lr_spin.value()), session.device
        held_out = len(records) >= HELD_OUT_MIN_CASES
        # The run folder name becomes the version name ("ft-<time>-step<N>"); the parent is in its metadata.
        prefix = "promptable" if promptable else "ft"
        out_dir = _settings.models_dir() / f"{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        # None: the parent's task; "interactive" on an automatic parent is the engine's warm start
        task = PROMPTABLE_TASK if promptable else None
        what = f"making a promptable model from {entry.version}" if promptable else f"fine-tuning {entry.version}"
        self.loss_plot.set_values([])
        self.scores_table.setVisible(False)

        def run(progress: Callable[[int, int, str], None], cancel: Any, log: Callable[[Any], None]) -> Dict[str, Any]:
            from .._jobs import import_engine

            import_engine("engine.train.finetune")  # the training code too, under the lock a prompting worker takes
            from engine.train.finetune import finetune
            from engine.train.run_folder import keep_one_checkpoint

            # CUDA graphs are the engine's default on one GPU (each step replayed with one launch).
            start = time.perf_counter()
            try:
                result = finetune(entry.path, store, out_dir, steps=steps, lr=lr, device=device, task=task,
                                  max_minutes=max_minutes, val_fraction=HELD_OUT_FRACTION if held_out else 0.0,
                                  progress=progress, cancel=cancel, on_log=log,
                                  command="napari-mambahome fine-tune "
                                          + (f"max_minutes={max_minutes:g}" if max_minutes else f"steps={steps}")
                                          + f" lr={lr}" + (f" task={task}" if task else ""))
                cancel.raise_if_cancelled()
                # read before keep_one_checkpoint removes last.safetensors, whose provenance may be the one to say it
                stopped = stopped_on_request(result)
                keep_one_checkpoint(out_dir, result.best_checkpoint)
            except BaseException:
                # The engine writes best.safetensors every steps/10, so a run stopped midway (an error, or a cancel
                # from napari closing, after which the dock's on_cancelled never runs) left a half-trained
                # "<run>/best.safetensors" that the next session listed as a finished version. Clean up here, in the
                # worker, whatever happens to the dock.
                shutil.rmtree(out_dir, ignore_errors=True)
                raise
            # Stop and keep: the engine ended the run as a time limit would, with the model of that step. Whether it
            # did is the engine's answer, not the token's flag: a stop pressed as the last step finished (or during
            # its validation and saving) found a run that ended by its own steps, and was announced as "stopped and
            # kept at step N" for a run that was never cut short.
            return {"result": result, "seconds": time.perf_counter() - start, "stopped": stopped,
                    "stop_asked": bool(getattr(cancel, "stop_requested", False))}

        def done(outcome: Dict[str, Any]) -> None:
            self._finetune_done(entry, outcome, store, held_out, reference)

        def cancelled() -> None:
            shutil.rmtree(out_dir, ignore_errors=True)  # our own run folder; the selected model is untouched
            token = getattr(self._finetune_job, "token", None)
            if self._stopping and token is not None and not token.cancelled:
                # Stop and keep before the first step ended: the engine kept nothing rather than pass the parent's
                # weights off as a new version
                self.finetune_result.setText(f"{what} stopped before its first training step finished: nothing was "
                                             f"learnt yet, so no new version was made; {entry.version} stays selected "
                                             "(the saved cases and earlier versions are unchanged)")
                session.status.emit(f"{what} stopped before its first step: nothing to keep, no new version")
                return
            self.finetune_result.setText(f"{what} cancelled; {entry.version} stays selected, no new version was made "
                                         "(the saved cases and earlier versions are unchanged)")

        job = session.start_job(run, what=what, on_done=done, on_progress=self._progress,
                                on_log=self._log_loss, on_cancelled=cancelled,
                                on_finished=lambda outcome: self._finished(
                                    outcome, f"{what} failed (the error is in the notification); {entry.version} "
                                             "stays selected, no new version was made (the saved cases and earlier "
                                             "versions are unchanged)"))
        if job is not None:
            self._own_job(job)
            self._finetune_job = job
            self.finetune_progress.setRange(0, 0)
            self._start_time_limit()
        self._offer_stop()
        return job

    def _server_scores(self, state: Dict[str, Any], new: ModelEntry, seconds: float, kept: bool = False) -> None:
        """A model made and scored on the server: its scores shown as a local job's are (the table, the text, the
        warning when it is weaker than the model it was compared with): a fine-tuned model's against its parent, a
        promptable model made from an automatic one against the promptable model in use.

        Args:
            state: the finished job (``GET /finetune/{job}``) with its ``scores``.
            new: the new model's entry (selected, a promptable one in the Interactive section, unless ``kept``).
            seconds: the job's wall time seen from here (training and scoring).
            kept: it scored below the model it was compared with, which stayed selected (``new`` is listed only).
        """
        session, scores = self.session, state["scores"]
        remote = session.remote
        by_id = {getattr(e, "model_id", None): e for e in session.entries}
        compared_id = scores.get("compared_with")
        compared = by_id.get(compared_id) if compared_id is not None else None
        compared_version = compared.version if compared is not None else scores.get("compared_with_version")
        parent = state.get("parent") or "?"
        parent_entry = by_id.get(parent)
        parent_version = parent_entry.version if parent_entry is not None else parent
        # made from an automatic model: compared with a promptable model, not with its parent
        promptable = new.is_interactive and not (parent_entry is not None and parent_entry.is_interactive)
        cases = list(scores.get("scored_on") or [])
        held_out = bool(scores.get("held_out"))
        saved = len(remote.cases) if remote is not None and remote.cases else len(cases)
        where = scores.get("where") or scored_where(len(cases), held_out, saved)  # a server before "where": the same
        on_server = f"the server {remote.url}" if remote is not None else "the server"
        stopped_at = int(state["stopped_at"]) if state.get("stopped_at") is not None else None
        session.last_finetune = {"old": parent_version, "new": new.version, "result": state,
                                 "train_seconds": seconds, "scored_on": cases, "held_out": held_out,
                                 "dice": scores, "promptable": promptable, "compared_with": compared_version,
                                 "server": remote.url if remote is not None else None, "stopped_at": stopped_at}
        self._record_scores(compared_version, new.version, scores, cases)
        self._refresh_versions()
        timing = (f"Training and scoring on the server {seconds:.1f} s (scoring {float(scores.get('seconds') or 0):.1f}"
                  " s" + (f"; stopped and kept at step {stopped_at}" if stopped_at is not None else "") + "). ")
        if promptable:
            self.show_promptable_result(compared_version, new.version, parent_version, scores, where, timing,
                                        server=f" on {on_server}", kept=kept)
        else:
            self.show_finetune_result(compared_version, new.version, scores, where, timing,
                                      server=f" (fine-tuned on {on_server})", kept=kept)

    def _log_loss(self, record: Dict[str, Any]) -> None:
        if record.get("loss") is not None:
            self.loss_plot.append(float(record["loss"]))

    def _start_time_limit(self) -> None:
        limit = self.max_minutes
        # the clock starts at the first training step (None until then), as the engine's budget does: counted from
        # the job's start, preparing the cases took part of the limit here and not there ("0.3 of 0.3 min" beside
        # the engine's "0.1/0.3 min", the bar full while training went on)
        self._time_limit = (None, limit * 60.0) if limit else None

    def _progress(self, done: int, total: int, message: str) -> None:
        if self._cancelling or self._stopping:  # a step reported after the click must not hide "cancelling…"
            return
        if self._time_limit is not None and done <= 0:  # preparing: the step total is only a cap, not shown
            self.finetune_progress.setRange(0, 0)
            self.finetune_result.setText(message)
            return
        if self._time_limit is not None:  # training under a time limit: progress in time
            start, seconds = self._time_limit
            if start is None:
                start = time.perf_counter()
                self._time_limit = (start, seconds)
            elapsed = min(time.perf_counter() - start, seconds)
            self.finetune_progress.setRange(0, 1000)
            self.finetune_progress.setValue(int(1000 * elapsed / seconds))
            self.finetune_result.setText(f"training: step {done}, {elapsed / 60:.1f} of {seconds / 60:g} min")
            return
        self.finetune_progress.setRange(0, max(total, 0))
        self.finetune_progress.setValue(done if total else 0)
        # the engine's messages often count already ("step 1/200 loss ...", "case 1/3"): a second count read as
        # "step 1/200 loss 2.17 1/200"; the bar shows the overall count
        counted = not total or re.search(r"\d+/\d+", message) is not None
        self.finetune_result.setText(message if counted else f"{message} {done}/{total}")

    def _finished(self, outcome: str, failed: str = "") -> None:
        """A job of this section ended; ``failed``: what the result line says when it ended in an error (it kept
        the last step's loss, which read as a run still going or one that ended well)."""
        self._time_limit = None
        self._cancelling = self._stopping = False
        self._finetune_job = None
        self._offer_stop()
        if outcome == "error" and failed:
            self.finetune_result.setText(failed)
        self.finetune_progress.setRange(0, 1)
        self.finetune_progress.setValue(1 if outcome == "done" else 0)
        pending, self._pending_scoring = self._pending_scoring, None
        if pending is not None:
            self._start_scoring(*pending)

    def _classes_agree(self, entry: ModelEntry, records: List[Any], root: str) -> bool:
        """Whether to go on when the saved cases' classes differ from the model's (the user decides).

        ``records`` are the case store's, or a server's (``class_names``, ``label_counts``); ``root`` says where
        they are (the case folder, or "the server <url>").

        Only the classes painted in some case count (``label_counts``; a case saved before those were recorded counts
        all its classes): a class table names every value it knows (a dataset.json's 13 organs, "label 4" made up for a
        value painted once and erased, a class added and never used), and those unpainted names were listed as "new
        classes that start untrained", and asked about when nothing the annotator drew differed from the model.
        """
        from engine.class_names import class_mapping  # no torch: asked on the GUI thread

        case_classes = max((r.class_names for r in records), key=len)
        try:
            mapping = class_mapping(entry.class_names, case_classes)
        except ValueError as exc:
            self.session.error(f"cannot fine-tune {entry.version} on the cases in {root}: {exc}")
            return False
        painted = set()
        for r in records:
            counts = list(r.label_counts or [])
            painted.update(i for i in range(1, len(r.class_names))
                           if not counts or (i < len(counts) and counts[i] > 0))
        labelled = [case_classes[i] for i in sorted(painted) if i < len(case_classes)]
        added = [case_classes[i] for i in sorted(painted) if 0 < i < len(case_classes) and i not in mapping]
        dropped = [entry.class_names[i] for i in range(1, len(entry.class_names)) if i not in mapping.values()]
        if not added and not dropped:
            return True
        consequences = ([f"new {brief_names(added)} start untrained and are learnt from these cases alone, which takes far more "
                         "training than refining classes the model knows (on a CPU the default 200 steps learnt "
                         "nothing of a new anatomy from the bundled model: raise Steps or give a Time limit of tens "
                         "of minutes; the promptable model of the Interactive section needs no new classes)"]
                        if added else []) + ([f"{brief_names(dropped)} will no longer be segmented"] if dropped else [])
        answer = QMessageBox.question(
            self, "Classes differ",
            f"The saved cases in {root} are labelled {brief_names(labelled)} but {entry.version} segments "
            f"{brief_names(entry.class_names[1:])}.\nClasses are matched by name: " + "; ".join(consequences) + ".\n"
            "Fine-tune anyway?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        if answer == QMessageBox.StandardButton.Yes:
            return True
        self.session.warning(f"fine-tuning not started: the cases in {root} are labelled {brief_names(labelled)}, "
                             f"the model {entry.version} segments {brief_names(entry.class_names[1:])}")
        return False

    def _finetune_done(self, old: ModelEntry, outcome: Dict[str, Any], store: Any, held_out: bool,
                       reference: Optional[ModelEntry] = None) -> None:
        session, result = self.session, outcome["result"]
        try:
            new = read_entry(Path(result.best_checkpoint), origin="fine-tuned")
        except ValueError as exc:
            session.error(f"fine-tuning wrote an unreadable model: {exc}")
            return
        promptable = new.is_interactive and not old.is_interactive
        # listed now, selected once scored (_select_if_not_weaker): selected at once and taken back when it scored
        # lower, it ended the object being prompted on and then left the annotator without the model they had
        new = session.add_entry(new, select=False)
        from engine.scoring import held_out_cases

        try:
            records = store.list()
        except OSError as exc:
            # The case folder went away during training (deleted, unmounted). The new version exists and stays
            # selected; before this check the error escaped this slot and the annotator heard nothing of scoring.
            self._select_new(new, promptable)
            session.warning(f"{new.version} selected (training {outcome['seconds']:.1f} s) but not scored: the "
                            f"case folder {store.root} can no longer be read ({exc.strerror or exc})")
            self.finetune_result.setText(f"{new.version} selected; not scored: case folder {store.root} is gone")
            return
        scored_on, was_held_out = held_out_cases(records, result.run_dir if held_out else None)
        where = scored_where(len(scored_on), was_held_out, len(records))
        # a promptable model made from an automatic one is compared with the promptable model in use until now
        before = (reference if promptable else old)
        stopped_at = int(result.steps_done) if outcome.get("stopped") else None
        session.last_finetune = {"old": old.version, "new": new.version, "result": result,
                                 "train_seconds": outcome["seconds"], "scored_on": [r.case_id for r in scored_on],
                                 "held_out": was_held_out, "dice": None, "promptable": promptable,
                                 "compared_with": before.version if before is not None else None,
                                 "stopped_at": stopped_at}
        # a version made by Stop and keep says so: its step count alone reads like a run that was asked for it
        training = (f"training {outcome['seconds']:.1f} s" if stopped_at is None else
                    f"stopped and kept at step {stopped_at}, training {outcome['seconds']:.1f} s")
        if stopped_at is None and outcome.get("stop_asked"):
            # Stop and keep pressed as the run was ending (its last step, validation or saving): it was not cut short
            training = (f"the run had reached its end (step {int(result.steps_done)}) when Stop and keep was "
                        f"pressed, nothing was cut short; {training}")
        if promptable:
            self.finetune_result.setText(
                f"{new.version} (promptable, made from {old.version}, {training}): scoring on {where}… It is "
                "selected in the Interactive section "
                + (f"unless it scores below {before.version}" if before is not None else "once scored")
                + f"; {old.version} still segments")
            session.status.emit(f"promptable model {new.version} made from {old.version} in "
                                f"{outcome['seconds']:.1f} s: scoring it before it is selected")
        else:
            self.finetune_result.setText(f"{new.version} made ({training}). Scoring before/after on {where}… It is "
                                         f"selected unless it scores below {old.version}")
            session.status.emit(f"{new.version} made in {outcome['seconds']:.1f} s of fine-tuning"
                                + (f" (stopped and kept at step {stopped_at})" if stopped_at is not None else "")
                                + ": scoring it before it is selected")
        # the job slot frees when this job finishes: scoring starts from _finished
        self._pending_scoring = (before, new, scored_on, where)

    def _start_scoring(self, old: Optional[ModelEntry], new: ModelEntry, records: List[Any],
                       where: str) -> Optional[Any]:
        """Before/after Dice per class of the cases' classes, as a job after the fine-tune.

        Args:
            old: the model scored as "before": the fine-tuned model's parent, or for a promptable model made
                from an automatic one the promptable model in use until then (``None``: none to compare with).
            new: the new version.
            records: the saved cases scored on.
            where: words naming them, for the result text.

        Returns:
            The started job, or ``None`` (slot busy).
        """
        session, device = self.session, self.session.device
        info = session.last_finetune
        promptable = bool(info.get("promptable"))
        # a promptable model is scored by prompting it, and so is what it is compared with
        interactive = new.is_interactive and (promptable or (old is not None and old.is_interactive))

        def run(progress: Callable[[int, int, str], None], cancel: Any) -> Dict[str, Any]:
            from engine.scoring import before_after

            # a promptable model is scored by prompting it: the robot user's clicks
            return before_after(old.path if old is not None else None, new.path, records, interactive,
                                device=device, clicks=ROBOT_CLICKS, progress=progress, cancel=cancel)

        def done(scores: Dict[str, Any]) -> None:
            info["dice"] = scores
            cases = [r.case_id for r in records]
            self._record_scores(old.version if old is not None else None, new.version, scores, cases)
            save_version_scores(new, scores, old.version if old is not None else None, where, cases)
            kept = not self._select_if_not_weaker(old, new, scores, promptable)
            info["kept"] = old.version if kept else None
            self._refresh_versions()
            stopped = (f" (stopped and kept at step {info['stopped_at']})" if info.get("stopped_at") is not None
                       else "")
            timing = f"Training {info['train_seconds']:.1f} s{stopped}, scoring {scores['seconds']:.1f} s. "
            if promptable:
                self.show_promptable_result(old.version if old is not None else None, new.version, info["old"],
                                            scores, where, timing, kept=kept)
            else:
                self.show_finetune_result(old.version if old is not None else None, new.version, scores, where,
                                          timing, kept=kept)
            session.status.emit(f"{new.version}: before/after Dice per class on {where} scored in "
                                f"{scores['seconds']:.1f} s (Fine-tune section)"
                                + (f"; it scores below {old.version}, which stays selected" if kept else ""))

        def cancelled() -> None:
            self._select_new(new, promptable)  # not known to be weaker: the model trained is the one used
            self.finetune_result.setText(f"{new.version} selected (training {info['train_seconds']:.1f} s); "
                                         "before/after scoring cancelled")

        def finished(outcome: str) -> None:
            if outcome == "error":
                self._select_new(new, promptable)
            self._finished(outcome, f"{new.version} selected (training {info['train_seconds']:.1f} s); "
                                    "before/after scoring failed (the error is in the notification)")

        job = session.start_job(run, what="scoring before/after", on_done=done, on_progress=self._progress,
                                on_cancelled=cancelled, on_finished=finished,
                                cancelled_text=f"before/after scoring cancelled; {new.version}, the model trained, is "
                                               "selected unscored")
        if job is not None:
            self._own_job(job)
        else:
            self._select_new(new, promptable)  # no scoring (the slot was taken): used unscored, as before
        return job

    def _select_new(self, new: ModelEntry, promptable: bool) -> None:
        """Select the new version: a promptable one in the Interactive section only (selecting it makes that section
        prompt with it), the automatic model that segments staying selected."""
        session = self.session
        if new not in session.entries:
            return
        segmenting = session.current_model
        session.select_model(new)
        if promptable and segmenting is not None and segmenting is not new and segmenting in session.entries:
            session.select_model(segmenting)

    def _select_if_not_weaker(self, old: Optional[ModelEntry], new: ModelEntry, scores: Dict[str, Any],
                              promptable: bool) -> bool:
        """Select the new version unless it scores below ``old`` on the cases both were scored on; a weaker one
        stays in the lists, to be selected by hand, so a short, weaker fine-tune is never what the next Segment
        uses. A local fine-tune (a server's job is kept from being selected the same way:
        :meth:`.remote.RemoteBackend.finetune`).

        Args:
            old: the model compared with: the parent, or for a promptable model made from an automatic one the
                promptable model in use until then (``None``: nothing compared, the new one is selected).
            new: the new version.
            scores: :func:`engine.scoring.before_after`'s answer.
            promptable: ``new`` is a promptable model made from the automatic model that still segments.

        Returns:
            Whether the new version was selected (False: ``old`` stays, what the result text says).
        """
        from engine.scoring import weaker

        if old is not None and weaker(scores) is not None and old in self.session.entries:
            return False
        self._select_new(new, promptable)
        return True

    def show_promptable_result(self, compared: Optional[str], new: str, parent: str, scores: Dict[str, Any],
                               where: str, timing: str, server: str = "", kept: bool = False) -> None:
        """The scores of a promptable model made from an automatic one, made here or on a server: the table,
        the result text and the warning when it scores below the promptable model in use until then.

        Args:
            compared: the version of the promptable model it was compared with (``None``: none).
            new: the new promptable model's version.
            parent: the automatic model it was made from (it still segments; not compared).
            scores: :func:`engine.scoring.before_after`'s answer (``before``/``after`` per class, ``clicks``).
            where: words naming the cases scored on.
            timing: the training and scoring times, a sentence.
            server: ``" on the server URL"`` when the server made and scored it, else ``""``.
            kept: it scored below ``compared``, which stayed selected in the Interactive section.
        """
        clicks = scores.get("clicks") or ROBOT_CLICKS
        kind = f"Robot-user Dice after {clicks} clicks"
        self.show_scores(scores["before"], scores["after"],
                         ("promptable in use" if compared is not None else "(none)", "new promptable"))
        versus = (f"the promptable model in use until now ({compared}, left) and the new one ({new}, right)"
                  if compared is not None else
                  f"the new promptable model {new} (no other promptable model to compare with)")
        chosen = ("added to the Interactive section's models but not selected" if kept else
                  "selected in the Interactive section")
        self.finetune_result.setText(
            f"{new} (promptable, made from {parent}{server}) {chosen}; {parent} still segments. {timing}"
            + (f"{kind} per class on {where}, {versus}. {parent} is not compared: it segments without clicks."
               if scores["after"] else f"No labelled class to score on {where}.")
            + _worse_note(compared, scores, kept=kept))

    def show_finetune_result(self, old: Optional[str], new: str, scores: Dict[str, Any], where: str, timing: str,
                             server: str = "", kept: bool = False) -> None:
        """The before/after scores of a fine-tuned model (its parent's task), made here or on a server: the table,
        the result text and the warning when it scores below its parent.

        Args:
            old: the parent's version (the model compared with; ``None``: none).
            new: the new version.
            scores: :func:`engine.scoring.before_after`'s answer: the Dice of automatic segmentation (``metric``
                ``"dice"``) or, for a promptable model, the robot user's (``"robot_dice"``, after ``clicks`` clicks).
            where: words naming the cases scored on (:func:`engine.scoring.scored_where`).
            timing: the training and scoring times, a sentence.
            server: ``" (fine-tuned on the server URL)"`` when the server made and scored it, else ``""``.
            kept: it scored below ``old``, which stayed selected (a local fine-tune, :meth:`_select_if_not_weaker`).
        """
        interactive = scores.get("metric") == "robot_dice"
        kind = f"Robot-user Dice after {scores.get('clicks') or ROBOT_CLICKS} clicks" if interactive else "Dice"
        self.show_scores(scores["before"], scores["after"])
        # the warning before the scores line, whose colon leads to the table
        warning = _worse_note(old, scores, interactive=interactive, kept=kept,
                              where="in the Model section or the Versions list" if kept else "in the Versions list")
        if not warning:
            warning = _finds_nothing_note(old, scores, interactive=interactive)
        chosen = "added to the Versions list but not selected" if kept else "selected"
        self.finetune_result.setText(
            f"{new}{server} {chosen}. {timing}" + (f"{warning.strip()} " if warning else "")
            + (f"{kind} per class on {where}:" if scores["after"] else f"No labelled class to score on {where}."))

    def show_scores(self, before: Dict[str, float], after: Dict[str, float],
                    columns: Tuple[str, str] = ("before", "after")) -> None:
        """Fill the before/after table: one row per scored class.

        Args:
            before: ``{class: Dice}`` of the model compared with (a class it was not scored on shows "n/a").
            after: ``{class: Dice}`` of the new version.
            columns: the headers of the two score columns.
        """
        rows = per_class_rows(before, after)  # the cells Slicer's status line shows too
        self.scores_table.setHorizontalHeaderLabels(["class", *columns])
        self.scores_table.setRowCount(len(rows))
        for row, cells in enumerate(rows):
            for column, text in enumerate(cells):
                self.scores_table.setItem(row, column, QTableWidgetItem(text))
        self.scores_table.setVisible(bool(rows))

    # ------------------------------------------------------------------ versions
    def _record_scores(self, before: Optional[str], after: str, scores: Dict[str, Any], cases: List[str]) -> None:
        """Keep a before/after scoring's per-class Dice for the Versions list, with the cases scored on.

        The model compared with gets this scoring's "before", replacing any score it had: it used to keep the first
        one (``setdefault``), so after a second fine-tune on more cases the list showed the parent's Dice on 2 cases
        beside the new version's on 6, which read as a comparison and was none. This "before" was measured on the
        very cases the new version was, at no extra cost (the scoring job scored both); re-scoring every older
        version would take a GPU job each time, so those keep the score of their own case set and the list says
        so (:meth:`_refresh_versions`): an annotator trusts numbers side by side only when they were measured alike.
        """
        # a server that does not say which cases it scored: the set is not known (None), not an empty one
        session, on = self.session, (tuple(sorted(str(c) for c in cases)) if cases else None)
        if before is not None:
            session.scores_by_version[before] = scores["before"]
            session.scored_on_by_version[before] = on
        session.scores_by_version[after] = scores["after"]
        session.scored_on_by_version[after] = on
        session.latest_scored_on = on

    def _refresh_versions(self) -> None:
        session = self.session
        self.versions_list.clear()
        for entry in session.entries:
            if entry.version not in session.scores_by_version:
                saved = load_version_record(entry)  # scored in an earlier session
                if saved is not None:
                    session.scores_by_version[entry.version], session.scored_on_by_version[entry.version] = saved
        reference = self._reference_cases()
        for entry in session.entries:
            scores = session.scores_by_version.get(entry.version)
            text, tip = entry.label, ""
            if scores:
                text += "  Dice " + ", ".join(f"{name} {value:.2f}" for name, value in sorted(scores.items()))
                on = session.scored_on_by_version.get(entry.version)
                tip = (f"Dice on {len(on)} case(s): {', '.join(on[:20])}{' …' if len(on) > 20 else ''}"
                       if on is not None else
                       "Dice on cases not recorded (scored by an older version of the plugin)")
                if reference is not None and on != reference:
                    text += (f"  (on another case set: {len(on)} case(s), not the {len(reference)} of the latest "
                             "scoring; not comparable)" if on is not None else
                             "  (case set not recorded; not comparable)")
            if entry is session.current_model:
                text = "● " + text
            self.versions_list.addItem(text)
            if tip:
                self.versions_list.item(self.versions_list.count() - 1).setToolTip(tip)

    def _reference_cases(self) -> Optional[Tuple[str, ...]]:
        """The case set the Versions list's scores are compared on: the latest scoring's (this session), else the
        selected model's, else that of the last version scored; ``None`` when no score says its cases."""
        session = self.session
        if session.latest_scored_on is not None:
            return session.latest_scored_on
        current = session.current_model
        if current is not None and session.scored_on_by_version.get(current.version) is not None:
            return session.scored_on_by_version[current.version]
        known = [session.scored_on_by_version.get(e.version) for e in session.entries]
        known = [k for k in known if k is not None]
        return known[-1] if known else None

    def _use_selected_version(self) -> None:
        row = self.versions_list.currentRow()
        if 0 <= row < len(self.session.entries):
            entry, remote = self.session.entries[row], self.session.remote
            if (remote is None or not remote.owns(entry)) and not Path(entry.path).is_file():
                # its run folder was deleted on disk: selecting it only failed later, at Segment, with a bare error
                self.session.error(f"version {entry.version} cannot be used: its file {entry.path} is gone "
                                   "(deleted on disk?); the selected model is unchanged")
                return
            previous = self.session.current_model
            self.session.select_model(entry)
            if remote is None or not remote.owns(entry):  # (a server's choice is said when the server answered)
                # the click changed which model segments and fine-tunes, but nothing on the status line said so
                what = ("it answers prompts and is what Fine-tune starts from; Segment needs a segmentation model"
                        if entry.is_interactive else "Segment and Fine-tune use it now")
                self.session.status.emit(f"version {entry.version} selected"
                                         + (f" instead of {previous.version}" if previous not in (None, entry) else "")
                                         + f": {what}")
            return
        # a click with no row chosen did nothing at all: say what the button needs
        self.session.warning("choose a version in the Versions list first, then press 'Use selected version'")

    def cancel(self) -> None:
        """Ask the running job to stop, and say so here at once.

        The engine stops at its next step, seconds later on a CPU; meanwhile the button stayed enabled and the
        last step's loss stayed on screen, so the annotator could not tell the click was taken and pressed again.
        """
        if not self.session.busy or self.session.job not in self._jobs:  # another section's job: its own Cancel
            return
        self.session.cancel_job()
        self._cancelling = True
        self.finetune_cancel_button.setEnabled(False)
        self._offer_stop()  # a discarded run has nothing left to keep
        self._time_limit = None
        self.finetune_result.setText("cancelling… (the step under way finishes first); the saved cases and the "
                                     "existing versions are kept")

    def stop(self) -> None:
        """Stop and keep: ask the running fine-tune to end at its next step as its time limit would, keeping the
        model trained so far; it then ends through the usual path (new version selected, then scored).

        On a server (one that can stop its jobs) only the job's token is set here: its worker sends the stop, as it
        sends a cancel, so the GUI thread never waits for the server.

        Pressed before the first step ended, the engine keeps nothing (no new version) and the result line says so.
        Cancel stays available and still discards the run.
        """
        job = self._finetune_job
        if job is None or not job.running or self.session.job is not job or self._cancelling:
            return
        remote = self.session.remote
        if remote is not None and not self._server_can_stop():
            return
        job.token.request_stop()
        self._stopping = True
        self._time_limit = None
        self._offer_stop()
        if remote is not None:
            self.finetune_result.setText(f"stopping… the server {remote.url} finishes the step under way, then its "
                                         "model is validated, saved, scored and selected as a new version; none "
                                         "if the first training step has not finished (Cancel still discards the "
                                         "run)")
            self.session.status.emit("stopping the fine-tune on the server: the model trained so far will be kept")
            return
        self.finetune_result.setText("stopping… the step under way finishes, then its model is validated, saved and "
                                     "selected as a new version; none if the first training step has not finished "
                                     "(Cancel still discards the run)")
        self.session.status.emit("stopping the fine-tune: the model trained so far will be kept")

    def _own_job(self, job: Any) -> None:
        """``job`` (just started) is this section's: its Cancel stops it."""
        self._jobs.add(job)
        self.finetune_cancel_button.setEnabled(self.session.busy and self.session.job is job)

    def _busy(self, busy: bool) -> None:
        self.finetune_button.setEnabled(not busy)
        self.use_version_button.setEnabled(not busy)
        # this section's jobs only (a Segment or a case save is cancelled in its own section); a job starting now is
        # added to _jobs when start_job returns, and Cancel enabled then (_own_job)
        self.finetune_cancel_button.setEnabled(busy and self.session.job in self._jobs)
        if not busy:
            self.finetune_stop_button.setEnabled(False)
