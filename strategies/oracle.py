"""Oracle: a multi-branch network whose clients are told their true mode (the upper bound of FedTKM).

Not from a paper: FedTKM with perfect clustering (FEDTKM.md section 6, "an oracle that is told each client's
mode"). The server reads each client's mode from the scenario (``ClientSpec.mode``) and tells it to train
branch = mode with FedTKM's loss, CE(y, head_mode) + label_smooth_w * mean KL(smooth(y) || softmax(other
heads)). At test time each mode's examples use their mode's branch: the true mode, which a deployed device
does not know, so every protocol scores the same and routing accuracy is 1.

Parameters (defaults):
    label_smooth_w (0.0), label_smooth_eps (0.2): as in fedtkm, so that the two differ only in how the
        branch is chosen.
    server_optimizer: name (sgd), lr (1.0), momentum (0.9), beta1 (0.9), beta2 (0.999), eps (1e-8).

The model has one branch per mode. With label_smooth_w = 0 a client trains and sends the trunk and its own
head, so each head is averaged among the clients of its mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from fedshift.clients.base import TrainTask

from fedshift.evaluation import votes

from .base import STRATEGIES, ClientInstruction, ClientJob, ClientReply, ClientResult, ClientSpec
from .multibranch import LabelSmoothingParams, MultiBranchStrategy, branch_loss, one_hot

BRANCH = "oracle.branch"


@STRATEGIES.register
class Oracle(MultiBranchStrategy):
    """Oracle: branch = the client's true mode, in training and at test time."""

    name = "oracle"
    Params = LabelSmoothingParams

    @classmethod
    def num_branches(cls, params, num_modes: int) -> int:
        return num_modes

    def configure_train(self, server_round: int, cohort: Sequence[ClientSpec]) -> list[ClientInstruction]:
        return [ClientInstruction(c.cid, self.opt.arrays, {BRANCH: c.mode}) for c in cohort]

    def aggregate_train(self, server_round: int, replies: Sequence[ClientReply]) -> dict[str, float]:
        self.apply_updates(replies)
        return self.round_metrics(replies)

    def evaluate(self, test_sets, batch_size: int) -> dict[str, float]:
        def by_mode(output, labels, mode):  # the true mode: knowledge a deployed device does not have
            return votes(torch.full((len(labels),), mode, dtype=torch.long, device=labels.device),
                         output.logits.shape[1])

        return self.evaluate_route(by_mode, test_sets, batch_size)

    def client_update(self, job: ClientJob) -> ClientResult:
        p = self.params
        branch = int(job.config[BRANCH])
        k = job.model.num_branches
        names = job.model.parameter_names(None if p.label_smooth_w > 0 else [branch])
        metrics = job.train(TrainTask(branch=branch, loss_fn=branch_loss(one_hot(branch, k), p.label_smooth_w,
                                                                          p.label_smooth_eps),
                                      trainable=None if p.label_smooth_w > 0 else names))
        return ClientResult(job.trained_arrays(names), num_examples=len(job.data),
                            metrics=metrics | {"branch": float(branch)})
