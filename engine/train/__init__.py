"""Training: one loop for training, fine-tuning and resuming, one job a module.

Modules, lowest first (each imports only modules listed before it):

- :mod:`~engine.train.config`: :class:`TrainConfig` (every setting and its default), :class:`RunResult`,
  run-folder file names, :func:`finetune_defaults`;
- :mod:`~engine.train.task`: what a step feeds the network (:class:`TrainingTask`, the registry);
- :mod:`~engine.train.distributed`: torchrun process group and collectives;
- :mod:`~engine.train.patches`: cached cases and the patch stream;
- :mod:`~engine.train.step`: :class:`TrainStep` (CUDA graphs) and :func:`use_cuda_graphs`;
- :mod:`~engine.train.validation`, :mod:`~engine.train.resume`, :mod:`~engine.train.run_folder`;
- :mod:`~engine.train.parent`: starting from a checkpoint (class mapping, head adaptation);
- :mod:`~engine.train.prepare`: dataset, split, network of a run;
- :mod:`~engine.train.loop`: :func:`train`;
- :mod:`~engine.train.finetune`: ``finetune`` (import it from there: the module has the same name);
- :mod:`~engine.train.cli`: ``mambahome train`` / ``finetune``.

The names below are imported on first use, so ``from engine.train.config import finetune_defaults``
stays cheap for the plugin.
"""
from __future__ import annotations

from engine.lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "engine.train.config",
    "RunResult": "engine.train.config",
    "TrainingDataError": "engine.train.config",
    "finetune_defaults": "engine.train.config",
    "train_defaults": "engine.train.config",
    "train": "engine.train.loop",
    "TrainingTask": "engine.train.task",
    "register_task": "engine.train.task",
    "get_task": "engine.train.task",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
