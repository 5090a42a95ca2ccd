"""Pluralistic averaging: one separate model per mode, each averaged only among clients of its mode.

Eichner, Koren, McMahan, Srebro, Talwar, "Semi-Cyclic Stochastic Gradient Descent", ICML 2019: under a
block-cyclic shift, train one model per block ("pluralistic" solution) instead of a single consensus
model. Here the blocks are the modes and the mode is known: the server keeps one full model per mode
(trunk and head: nothing is shared) with its own server optimizer, sends each client its mode's model
(read from the scenario, ``ClientSpec.mode``), and averages each model's updates among that mode's clients
only. A round without clients of a mode leaves that mode's model untouched. At test time each mode's
examples use their mode's model.

Parameters (defaults):
    server_optimizer: name (sgd), lr (1.0), momentum (0.9), beta1 (0.9), beta2 (0.999), eps (1e-8); one
        optimizer per mode.

Each per-mode model is the scenario's architecture with one branch. ``global_model`` (what the run saves
as model.pt) is mode 0's model; every mode's weights are in ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedshift.clients.base import TrainTask

from .base import (
    STRATEGIES,
    ClientInstruction,
    ClientJob,
    ClientReply,
    ClientResult,
    ClientSpec,
    ServerStrategy,
    mean_metric,
)
from .server_optimizer import ServerOptimizer, mean_update


@STRATEGIES.register
class Pluralistic(ServerStrategy):
    """Pluralistic averaging (Eichner et al., ICML 2019): one model per mode, mode known."""

    name = "pluralistic"
    one_model_per_mode = True

    def initialize(self, model) -> None:
        super().initialize(model)
        self.opts = [ServerOptimizer(self.params.server_optimizer, model.state_dict())
                     for _ in self.setup.mode_names]

    def configure_train(self, server_round: int, cohort: Sequence[ClientSpec]) -> list[ClientInstruction]:
        return [ClientInstruction(c.cid, self.opts[c.mode].arrays) for c in cohort]

    def aggregate_train(self, server_round: int, replies: Sequence[ClientReply]) -> dict[str, float]:
        for mode, opt in enumerate(self.opts):
            mine = [r for r in replies if r.mode == mode]
            if mine:
                opt.step(mean_update(opt.arrays, mine))
        return {"train/loss": mean_metric(replies, "loss")}

    def model_of_mode(self, mode: int):
        self.model.load_state_dict(self.opts[mode].arrays)
        return self.model

    def global_model(self):
        return self.model_of_mode(0)

    def evaluate(self, test_sets, batch_size: int) -> dict[str, float]:
        # each mode's test set with its mode's model: the true mode, which a deployed device does not know
        return self.evaluate_route(lambda output, labels, mode: None, test_sets, batch_size, self.model_of_mode)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.opts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for opt, s in zip(self.opts, state["optimizers"], strict=True):
            opt.load_state_dict(s)

    def client_update(self, job: ClientJob) -> ClientResult:
        metrics = job.train(TrainTask(branch=0))
        return ClientResult(job.trained_arrays(), num_examples=len(job.data), metrics=metrics)
