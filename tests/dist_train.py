"""``python -m training`` for the multi-process test (tests/test_train.py), run under
``torch.distributed.run``. After every optimizer step each process also writes to
``$LEFFA_TEST_OUT/fingerprint-rank{N}.pt`` a fingerprint of its parameters (one float64 sum
per tensor) and of the batches it has trained on."""

import os
import sys
from pathlib import Path

import torch

from training import trainer as train
from tests.conftest import param_fingerprint

_release, _training_step = train._TrainingModule.release, train.training_step
batches: list[torch.Tensor] = []


def _training_step_noting_the_batch(module, vae, scheduler, batch, *args, **kwargs):
    batches.append(batch["src_image"].double().sum())
    return _training_step(module, vae, scheduler, batch, *args, **kwargs)


def _release_and_fingerprint(self: train._TrainingModule) -> None:
    _release(self)
    torch.save({"params": param_fingerprint(self.model), "batches": torch.stack(batches)},
               Path(os.environ["LEFFA_TEST_OUT"]) / f"fingerprint-rank{os.environ['RANK']}.pt")


train.training_step = _training_step_noting_the_batch
train._TrainingModule.release = _release_and_fingerprint
sys.exit(train.main(sys.argv[1:]))
