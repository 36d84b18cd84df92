"""The run folder's logs and plot: ``log.jsonl``, ``log.csv`` (one record per step) and ``curves.png``."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from matplotlib.figure import Figure  # the object API draws off-screen: no pyplot, no GUI backend

from engine.io import atomic_write, write_text_atomic
from engine.train.config import LOG_CSV, LOG_JSONL


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
