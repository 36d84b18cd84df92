"""kill -9 at every stage of a training run, then resume: the final weights equal an uninterrupted run's
(issue 19: a run folder is resumable or restartable from any kill point, never a dead end)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.synth import write_phantom_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--preset", "tiny", "--patch-size", "32", "32", "32", "--batch-size", "1", "--device", "cpu",
         "--steps", "6", "--val-every", "2", "--save-every", "2", "--val-fraction", "0.25", "--seed", "3",
         "--keep-resume", "--quiet"]


def _run(data: Path, out: Path, pattern: str = "never", nth: int = 1, resume: bool = False) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "tests" / "kill_during_write.py"), pattern, str(nth), "--",
           *TRAIN, "--dataset", str(data), "--out", str(out)] + (["--resume"] if resume else [])
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600).returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    data = write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=4,
                                 shape=(32, 32, 24), seed=11)
    out = tmp_path_factory.mktemp("ref") / "run"
    assert _run(data, out) == 0
    return data, load_file(str(out / "last.safetensors"))


# (what is being written when the process dies, which occurrence)
STAGES = [
    ("train_config.json", 1),   # before anything of the run exists
    ("split.json", 1),          # before the first checkpoint
    ("last.safetensors", 1),    # during the first checkpoint
    ("resume.safetensors", 1),  # during the first resume state
    ("curves.png", 1),          # during the plot, after the first save
    ("last.safetensors", 2),    # between checkpoints: during the second one
    ("resume.safetensors", 2),  # during a later resume state
]


@pytest.mark.slow
@pytest.mark.parametrize("pattern,nth", STAGES, ids=[f"{p}#{n}" for p, n in STAGES])
def test_kill_during_write_then_resume_equals_uninterrupted(reference, tmp_path, pattern, nth):
    data, expected = reference
    out = tmp_path / "run"
    assert _run(data, out, pattern, nth) == -signal.SIGKILL, "the run was not killed where asked"
    # what the user does next: --resume (it starts over when nothing was saved yet), until it completes
    assert _run(data, out, resume=True) == 0
    got = load_file(str(out / "last.safetensors"))
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name], "temporary files left behind"
