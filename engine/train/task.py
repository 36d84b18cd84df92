"""What the training loop optimises: a task turns each batch into (network input, target).

The loop (:mod:`engine.train.loop`) is task-agnostic: it asks the task for the network's channels,
for each step's ``(input, target)`` and, optionally, for a validation score. :class:`SegmentationTask`
is today's behaviour (the image in, the labels out). A promptable model (``engine.interactive``)
registers its own task with :func:`register_task`; a checkpoint records its task's
:meth:`TrainingTask.metadata` under ``"task"`` so fine-tuning continues the same task.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import numpy as np
import torch
from torch import nn

DEFAULT_TASK = "segmentation"


@runtime_checkable
class TrainingTask(Protocol):
    """The contract between the training loop and a task (segmentation, interactive, ...)."""

    name: str  # "segmentation" (default) or e.g. "interactive"

    def network_channels(self, image_channels: int, class_names: Sequence[str]) -> Tuple[int, int]:
        """(in_channels, out_channels) of the network for this task."""

    def make_batch(self, model: nn.Module, image: torch.Tensor, label: torch.Tensor,
                   rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B,C,D,H,W) float image, (B,1,D,H,W) integer class-id label -> (network input, target
        (B,1,D,H,W) integer) on the same device. May run the model under no_grad (simulated prompts).

        A task may also define (the loop calls each only if the task has it):

        - ``set_cuda_graphs(enabled: bool)``: the loop calls it once with its own decision for the training
          step, so the task's no-gradient forwards can be graphed too;
        - ``sample_transform() -> Optional[Callable[[Dict[str, Tensor], np.random.Generator], Dict[str, Tensor]]]``:
          per-sample work moved to the data workers. The loop runs the transform on every patch after the
          augmentation tail (:class:`engine.train.patches.PatchStream` ``item_transform``), with a generator
          seeded from the patch's position in the stream (the same draw in every worker and resumed run);
          it gets ``{"image": (C, X, Y, Z), "label": (1, X, Y, Z)}`` and returns extra fixed-shape tensors
          (new keys), which the loop collates and passes, on the CPU, as
          ``make_batch(model, image, label, rng, extra={key: (B, ...)})``. Without the hook (or when it
          returns None) ``make_batch`` is called with the four arguments above."""

    def metadata(self) -> Dict[str, Any]:
        """JSON stored in checkpoint metadata under "task" (e.g. {"name": "interactive", "encoding": {...}})."""

    def validate(self, model: nn.Module, cases: Sequence[Any], device: torch.device) -> Optional[float]:
        """Validation score in [0,1] for model selection, or None to use the default segmentation validation."""


class SegmentationTask:
    """Semantic segmentation: the image is the input, the class-id label the target (one output per class)."""

    name = DEFAULT_TASK

    def network_channels(self, image_channels: int, class_names: Sequence[str]) -> Tuple[int, int]:
        """``(image channels, number of classes including background)``."""
        return int(image_channels), len(class_names)

    def make_batch(self, model: nn.Module, image: torch.Tensor, label: torch.Tensor,
                   rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch as it is (draws nothing from ``rng``)."""
        return image, label

    def metadata(self) -> Dict[str, Any]:
        return {"name": self.name}

    def validate(self, model: nn.Module, cases: Sequence[Any], device: torch.device) -> Optional[float]:
        """None: the loop's sliding-window Dice validation is this task's."""
        return None


TaskFactory = Callable[[Dict[str, Any]], TrainingTask]
_REGISTRY: Dict[str, TaskFactory] = {DEFAULT_TASK: lambda meta: SegmentationTask()}
# Tasks that live in optional packages: get_task imports the package, whose import registers the task.
_PROVIDERS = {"interactive": "engine.interactive.task"}


class UnknownTaskError(ValueError):
    """A task name that no registered factory (nor a known provider package) answers."""


def register_task(name: str, factory: TaskFactory) -> None:
    """Make ``get_task(name)`` build tasks with ``factory(metadata)`` (``metadata``: the checkpoint's
    ``"task"`` entry, or ``{"name": name}``). Registering a name again replaces its factory."""
    _REGISTRY[str(name)] = factory


def registered_tasks() -> Sequence[str]:
    return sorted(_REGISTRY)


def known_tasks() -> Sequence[str]:
    """Every task name :func:`get_task` answers: the registered ones and those of the provider packages (registered
    when first asked for)."""
    return sorted(set(_REGISTRY) | set(_PROVIDERS))


def check_task_name(name: Any) -> None:
    """Refuse a task name that no registered factory nor provider package answers, listing the known ones; it
    imports nothing, so a command checks it before reading a checkpoint or a dataset (``--task bogus`` was met as
    "trained for task 'interactive'; fine-tuning keeps it (asked for 'bogus')", which never said it is no task).

    Raises:
        UnknownTaskError: the name and the known tasks.
    """
    if str(name) not in known_tasks():
        raise UnknownTaskError(f"unknown training task {str(name)!r}; the tasks are {', '.join(known_tasks())}")


def get_task(name_or_metadata: Union[str, Mapping[str, Any], None]) -> TrainingTask:
    """The task for a name (``"segmentation"``) or a checkpoint's ``"task"`` metadata (``{"name": ...}``).

    Raises:
        UnknownTaskError: no such task (the message lists the registered ones).
    """
    if name_or_metadata is None:
        name_or_metadata = DEFAULT_TASK
    meta = {"name": name_or_metadata} if isinstance(name_or_metadata, str) else dict(name_or_metadata)
    name = str(meta.get("name", DEFAULT_TASK))
    if name not in _REGISTRY and name in _PROVIDERS:
        # The one deferred import of the training package: the provider imports this module to
        # register itself, so importing it at the top would be an import circle.
        try:
            importlib.import_module(_PROVIDERS[name])
        except ModuleNotFoundError as exc:
            if exc.name is None or not _PROVIDERS[name].startswith(exc.name):
                raise
            raise UnknownTaskError(f"task {name!r} needs the package {_PROVIDERS[name]}, which is not "
                                   "installed in this build") from exc
    if name not in _REGISTRY:
        raise UnknownTaskError(f"unknown training task {name!r}; registered: {registered_tasks()}")
    return _REGISTRY[name](meta)
