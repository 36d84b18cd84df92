"""The interactive task's simulation split: per-sample draws in the data workers, corrective rounds in the
training process (``engine.interactive.simulate``: draw_sample / SampleDrawTransform / simulate_rounds)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.datasets import load_dataset
from engine.interactive import InteractiveTask, simulate
from engine.interactive.robot import dice
from engine.interactive.simulate import (DRAW_KEYS, PRIOR_EMPTY, PRIOR_FROM_ROUNDS, PRIOR_NEAR, SimulationConfig,
                                         simulate_rounds, unpack_prompts)
from engine.preprocess import Preprocessing
from engine.progress import CancelToken, Cancelled
from engine.synth import write_phantom_dataset
from engine.train.config import TrainConfig
from engine.train.loop import train
from engine.train.patches import PatchStream, augmentation_tail, preprocess_cases

PATCH = (32, 32, 32)
SIM = SimulationConfig(max_rounds=2, p_near_prior=0.4, p_empty_prior=0.2)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=3,
                                 shape=(32, 32, 32), seed=4, spacing=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def streams(phantoms):
    """(stream with the interactive draws, the same stream without them)."""
    pp = Preprocessing.for_modality("CT", target_spacing=(1.0, 1.0, 1.0))
    cached = preprocess_cases(load_dataset(phantoms).cases, pp, range(4))
    tail = augmentation_tail(pp, PATCH, 1.0, 1.0)
    task = InteractiveTask(simulation=SIM, patch_size=PATCH)
    return (PatchStream(cached, tail, seed=9, item_transform=task.sample_transform()),
            PatchStream(cached, augmentation_tail(pp, PATCH, 1.0, 1.0), seed=9))


def _batch(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_the_draw_of_item_i_is_the_same_in_loader_workers_and_in_process(streams):
    stream, plain = streams
    items = [stream[i] for i in range(8)]
    assert set(DRAW_KEYS) <= set(items[0]) and torch.equal(items[3]["sim_object"], stream[3]["sim_object"])
    for i, item in enumerate(items):  # the draws leave the patches themselves unchanged
        assert torch.equal(item["image"], plain[i]["image"]) and torch.equal(item["label"], plain[i]["label"])
    loader = torch.utils.data.DataLoader(stream, batch_sampler=[[0, 1, 2, 3], [4, 5, 6, 7]], num_workers=2)
    batches = list(loader)
    for j, batch in enumerate(batches):
        expected = _batch(items[4 * j:4 * j + 4])
        assert batch.keys() == expected.keys()
        for k in expected:
            assert torch.equal(batch[k], expected[k]), k
    assert not all(torch.equal(items[0][k], items[1][k]) for k in DRAW_KEYS)  # items draw independently


def test_worker_draws_are_one_object_with_its_first_prompt_and_prior_kind(streams):
    stream, _ = streams
    modes = set()
    for i in range(24):
        item = stream[i]
        obj = item["sim_object"][0].numpy().astype(bool)
        label = item["label"][0].numpy()
        mode, rounds = int(item["sim_prior_mode"]), int(item["sim_rounds"])
        modes.add(mode)
        prompts = unpack_prompts({k: v[None] for k, v in item.items()})[0]
        assert item["sim_object"].dtype == torch.uint8 and item["sim_object"].shape == (1, *PATCH)
        if not obj.any():
            assert prompts[0].kind == "point" and not prompts[0].positive and mode != PRIOR_NEAR
            continue
        assert len(np.unique(label[obj])) == 1 and label[obj][0] != 0  # one class (or one component of it)
        first = prompts[0]
        assert first.positive
        if first.kind == "box":
            lo, hi = first.voxels
            assert obj[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].any()
        else:
            assert obj[tuple(first.voxels.T)].all()  # a point or scribble inside the object
        prior = item["sim_prior"][0].numpy().astype(bool)
        if mode == PRIOR_NEAR:
            assert rounds == 0 and len(prompts) <= 2 and dice(prior, obj) > 0.3 and not np.array_equal(prior, obj)
        else:
            assert 0 <= rounds <= SIM.max_rounds and len(prompts) == 1 and not prior.any()
    assert modes == {PRIOR_FROM_ROUNDS, PRIOR_NEAR, PRIOR_EMPTY}


def test_rounds_on_worker_draws_compose_the_batch(streams, monkeypatch):
    stream, _ = streams
    task = InteractiveTask(simulation=SIM, patch_size=PATCH)
    from engine.config import ModelConfig
    from engine.model.mambahome import MambaHoME

    torch.manual_seed(0)
    in_ch, out_ch = task.network_channels(1, ["background", "organ"])
    model = MambaHoME(ModelConfig.preset("tiny", in_channels=in_ch, num_classes=out_ch)).train()
    batch = _batch([stream[i] for i in range(6)])
    extra = {k: v for k, v in batch.items() if k not in ("image", "label")}
    shapes = []

    def forward(x):
        shapes.append(tuple(x.shape))
        return model(x)

    x, y = task.make_batch(model, batch["image"], batch["label"], np.random.default_rng(1), extra=extra)
    assert model.training
    assert x.shape == (6, 1 + task.encoding.num_channels, *PATCH) and y.shape == (6, 1, *PATCH)
    assert y.dtype == torch.int64 and torch.equal(y, batch["sim_object"].long())
    torch.testing.assert_close(x[:, :1], batch["image"])
    prev = 1 + task.encoding.channels.index("previous_mask")
    for b in range(6):
        assert x[b, 1:].max() == 1.0  # the newest prompt drawn at full strength
        mode = int(batch["sim_prior_mode"][b])
        if mode == PRIOR_NEAR:  # the drawn near prior is the previous mask
            assert torch.equal(x[b, prev] > 0.5, batch["sim_prior"][b, 0].bool())
        elif mode == PRIOR_EMPTY or int(batch["sim_rounds"][b]) == 0:
            assert not (x[b, prev] > 0.5).any()
    again = task.make_batch(model, batch["image"], batch["label"], np.random.default_rng(1), extra=extra)
    torch.testing.assert_close(again[0], x, rtol=0, atol=0)
    # the given forward sees the whole batch every round, as many rounds as the largest draw asks
    x2, _ = simulate_rounds(
        model, batch["image"], extra, task.encoding, task.simulation, np.random.default_rng(1), forward=forward)
    assert int(batch["sim_rounds"].max()) > 0 and len(shapes) == int(batch["sim_rounds"].max()) and all(s == tuple(x.shape) for s in shapes)
    torch.testing.assert_close(x2, x, rtol=0, atol=0)
    # redrawing only the samples that changed is exactly redrawing every sample every round
    full_redraw = simulate._RoundInputs.__call__
    monkeypatch.setattr(simulate._RoundInputs, "__call__",
                        lambda self, prompts, priors, rows: full_redraw(self, prompts, priors, range(len(prompts))))
    x3, _ = simulate_rounds(model, batch["image"], extra, task.encoding, task.simulation, np.random.default_rng(1))
    torch.testing.assert_close(x3, x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sim_rounds"):
        task.make_batch(model, batch["image"], batch["label"], np.random.default_rng(1),
                        extra={k: v for k, v in extra.items() if k != "sim_rounds"})


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    merged = dict(preset="tiny", patch_size=list(PATCH), batch_size=2, device="cpu", val_every=2, seed=3,
                  val_fraction=0.0, steps=4, task="interactive", target_spacing=[1.0, 1.0, 1.0],
                  task_options={"simulation": {"max_rounds": 1, "p_near_prior": 0.3}})
    merged.update(kw)
    return TrainConfig(dataset=str(data), out=str(out), **merged)


def _weights_equal(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_interactive_training_is_the_same_with_loader_workers_and_resumes_exactly(phantoms, tmp_path):
    """The draws depend on the stream position only: 0 or 2 data workers train the same weights, and a run
    stopped after 2 of 4 steps and resumed ends bit for bit where the uninterrupted one does."""
    full = train(_cfg(phantoms, tmp_path / "full", num_workers=0))
    workers = train(_cfg(phantoms, tmp_path / "workers", num_workers=2))
    assert [r["loss"] for r in workers.history] == [r["loss"] for r in full.history]
    _weights_equal(full.last_checkpoint, workers.last_checkpoint)

    cancel = CancelToken()

    def stop_after_two(record):
        if record["step"] == 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        train(_cfg(phantoms, tmp_path / "split", num_workers=0), cancel=cancel, on_log=stop_after_two)
    resumed = train(_cfg(phantoms, tmp_path / "split", num_workers=2, resume=True))
    assert resumed.steps_done == 4
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    _weights_equal(full.last_checkpoint, resumed.last_checkpoint)
