"""The ``interactive`` training task: a network that segments the object the prompts point at.

:class:`InteractiveTask` implements the training-task protocol of ``engine.train.task`` (``register()`` adds it to
the trainer's registry): the network takes the image channels plus the guidance
channels of a :class:`~engine.interactive.encoding.PromptEncoding` and predicts one binary,
class-agnostic object (2 outputs); batches carry simulated interactions
(:mod:`engine.interactive.simulate`: the per-sample draws in the data workers through
:meth:`InteractiveTask.sample_transform`, the corrective rounds in :meth:`InteractiveTask.make_batch`); the checkpoint records
``metadata["task"] = {"name": "interactive", "encoding": {...}, "simulation": {...}}`` so sessions
draw prompts exactly as in training; validation is the robot user's mean Dice.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from engine.interactive.encoding import PromptEncoding
from engine.interactive.simulate import SampleDrawTransform, SimulationConfig, simulate_batch, simulate_rounds
from engine.model.graphs import CudaGraphed
from engine.train.task import register_task

TASK_NAME = "interactive"
OBJECT_CLASS_NAMES = ("background", "object")


class InteractiveTask:
    """Training with simulated interactions.

    Args:
        encoding: the guidance channels (default :class:`PromptEncoding`).
        simulation: how interactions are simulated (default :class:`SimulationConfig`).
        patch_size: window of the validation sessions (the training patch size).
        val_interactions: robot interactions per object in :meth:`validate`.
    """

    name = TASK_NAME

    def __init__(self, encoding: Optional[PromptEncoding] = None, simulation: Optional[SimulationConfig] = None,
                 patch_size: Sequence[int] = (64, 64, 64), val_interactions: int = 3) -> None:
        self.encoding = encoding or PromptEncoding()
        self.simulation = simulation or SimulationConfig()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.val_interactions = int(val_interactions)
        self.cuda_graphs = False
        self._round_forward: Optional[Tuple[nn.Module, Any]] = None  # (model, its graphed eval forward)

    def network_channels(self, image_channels: int, class_names: Sequence[str]) -> Tuple[int, int]:
        """``(1 + guidance channels, 2)``: class-agnostic, whatever the dataset's classes.

        Raises:
            TrainingDataError: ``image_channels`` is not 1: a session (and this task's validation) gives the
                network one image channel, so a multi-channel model could be trained but never prompted.
        """
        if int(image_channels) != 1:
            from engine.train.config import TrainingDataError

            raise TrainingDataError(f"the interactive task takes one image channel, but the dataset has "
                                    f"{int(image_channels)}: an interactive session prompts one image at a time; "
                                    "train on a single-channel dataset (one sequence or contrast)")
        return int(image_channels) + self.encoding.num_channels, len(OBJECT_CLASS_NAMES)

    def set_cuda_graphs(self, enabled: bool) -> None:
        """Replay the corrective rounds' forward as a CUDA graph (the training loop passes its decision for
        its own step: one CUDA GPU, no DDP, no compilation)."""
        self.cuda_graphs = bool(enabled)
        self._round_forward = None

    def sample_transform(self) -> SampleDrawTransform:
        """The per-patch part of the simulation, for the data workers (optional part of the task protocol):
        ``transform(item, rng)`` adds the packed draw (``sim_*`` keys,
        :func:`engine.interactive.simulate.pack_draw`) that :meth:`make_batch` reads from ``extra``."""
        return SampleDrawTransform(self.simulation)

    def make_batch(self, model: nn.Module, image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator,
                   extra: Optional[Mapping[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, X, Y, Z)`` image and ``(B, 1, X, Y, Z)`` class ids -> (input with guidance, binary object
        target ``(B, 1, X, Y, Z)``).

        With ``extra`` (the batch's collated ``sim_*`` draws of :meth:`sample_transform`, made in the data
        workers) only the corrective rounds run here (:func:`engine.interactive.simulate.simulate_rounds`);
        without, the whole simulation (:func:`engine.interactive.simulate.simulate_batch`). After
        ``set_cuda_graphs(True)`` the corrective rounds' no-gradient forward (always the whole batch, one static
        shape) is replayed as a CUDA graph: eagerly, up to five small-kernel forwards a step cost more
        than the graphed training step itself."""
        forward = None
        if self.cuda_graphs and image.device.type == "cuda":
            if self._round_forward is None or self._round_forward[0] is not model:
                def eval_forward(x: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
                    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                        return model(x)
                self._round_forward = (model, CudaGraphed(eval_forward, warmup=2, max_graphs=1))
            forward = self._round_forward[1]
        if extra is not None:
            return simulate_rounds(model, image, extra, self.encoding, self.simulation, rng, forward=forward)
        return simulate_batch(model, image, label, self.encoding, self.simulation, rng, forward=forward)

    def metadata(self) -> Dict[str, Any]:
        """``{"name": "interactive", "encoding": {...}, "simulation": {...}}`` for checkpoint ``metadata["task"]``.
        The checkpoint's ``class_names`` must be ``["background", "object"]``."""
        return {"name": TASK_NAME, "encoding": self.encoding.to_dict(), "simulation": self.simulation.to_dict()}

    def validate(self, model: nn.Module, cases: Sequence[Any], device: torch.device) -> Optional[float]:
        """Mean Dice of the robot user (point prompts, ``val_interactions`` interactions) over every object
        of the validation cases, in [0, 1].

        Args:
            cases: the run's validation cases (:class:`engine.train.patches.CachedCase`) or mappings with ``image`` ``(C, X, Y, Z)`` (already normalised, network space) and ``label``
                ``(1, X, Y, Z)`` or ``(X, Y, Z)`` class ids (arrays or tensors), e.g. from
                :func:`engine.preprocess.eval_transforms`.

        Returns:
            The score, or None when ``cases`` hold no image and label (the default validation then applies).
        """
        from engine.interactive.robot import robot_session

        def field(case: Any, name: str) -> Any:
            return case.get(name) if isinstance(case, Mapping) else getattr(case, name, None)

        if not cases or any(field(c, "image") is None or field(c, "label") is None for c in cases):
            return None
        metadata = {"task": self.metadata(), "patch_size": list(self.patch_size)}
        was_training = model.training
        scores = []
        try:
            for case in cases:
                image = np.asarray(torch.as_tensor(field(case, "image")).detach().cpu(), dtype=np.float32)
                label = np.asarray(torch.as_tensor(field(case, "label")).detach().cpu())
                if image.ndim == 4:
                    image = image[0]  # the session takes one image channel
                label = label.reshape(label.shape[-3:]).astype(np.int64)
                result = robot_session((model, metadata), image, label, prompt="point",
                                       max_interactions=self.val_interactions, device=device, normalize=False)
                scores.extend(obj["dice"][-1] for obj in result)
        finally:
            model.train(was_training)
        return float(np.mean(scores)) if scores else None


def make_interactive_task(options: Optional[Mapping[str, Any]] = None) -> InteractiveTask:
    """Task factory for the registry: ``options`` is the task metadata (or CLI options) with optional
    ``encoding``, ``simulation`` and ``patch_size``."""
    options = dict(options or {})
    encoding = PromptEncoding.from_dict(options["encoding"]) if options.get("encoding") else None
    simulation = SimulationConfig.from_dict(options["simulation"]) if options.get("simulation") else None
    return InteractiveTask(encoding, simulation, patch_size=options.get("patch_size") or (64, 64, 64))


def register() -> None:
    """Register ``interactive`` with the trainer's task registry.

    """
    register_task(TASK_NAME, make_interactive_task)


register()  # importing this module (the trainer's registry does, by name) makes the task known
