"""IFCA: the Iterative Federated Clustering Algorithm on a multi-branch network.

Ghosh, Chung, Yin, Ramchandran, "An Efficient Framework for Clustered Federated Learning", NeurIPS 2020,
in its weight-sharing form (shared trunk, one head per cluster). Each round a client evaluates every head on
its local labelled data with the received model, picks the head with the lowest mean loss (ties to the lower
index), trains the trunk and that head (cross-entropy), and sends them back; the server averages the trunk
over all clients and each head among the clients that picked it. Nothing ties a head to a mode: the
branch/mode correspondence is whatever the clustering settles on.

Test time: a deployed test client has no labels, so by default (``test_route: inputs``) each example picks the
head with the lowest loss against its own prediction (the most confident head: the largest max softmax), and a
test client picks the head with the lowest such loss summed over its inputs. The paper's own evaluation picks
by the loss on the test labels (the clients' labelled local data, as in training): ``test_route: labels``
reproduces it and reads labels a deployed device does not have.

Parameters (defaults):
    k (None = one per mode): number of heads (clusters).
    test_route (inputs): how test examples choose a head: inputs (own-prediction loss) or labels (the paper's).
    server_optimizer: name (sgd), lr (1.0), momentum (0.9), beta1 (0.9), beta2 (0.999), eps (1e-8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from fedshift.clients.base import ClientData, TrainTask
from pydantic import Field

from fedshift.core.tensors import UNLABELLED, eval_mode
from fedshift.evaluation import Routing
from fedshift.nets.models import ModelOutput, MultiBranchNet

from .base import STRATEGIES, ClientInstruction, ClientJob, ClientReply, ClientResult, ClientSpec, StrategyParams
from .multibranch import MultiBranchStrategy


class IFCAParams(StrategyParams):
    k: int | None = Field(None, ge=2, description="heads (clusters); default one per mode")
    test_route: Literal["inputs", "labels"] = Field(
        "inputs", description="how test examples choose a head: inputs (the lowest loss against the head's own "
                              "prediction, i.e. the most confident head; what a device without labels can do) or "
                              "labels (the lowest loss on the test labels, as the paper evaluates)")


def head_losses(output: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every head for every example, [B, K] (summed over the tokens of a sequence)."""
    losses = torch.stack([F.cross_entropy(output.logits[:, k], labels, reduction="none", ignore_index=UNLABELLED)
                          for k in range(output.logits.shape[1])], dim=1)
    return losses.reshape(losses.shape[0], losses.shape[1], -1).sum(2)


def local_head_losses(model: MultiBranchNet, data: ClientData, batch_size: int = 1024) -> torch.Tensor:
    """Mean loss of every head over the client's labelled examples (or tokens), [K]."""
    total = torch.zeros(model.num_branches, device=data.x.device)
    with eval_mode(model):
        for i in range(0, len(data), batch_size):
            total += head_losses(model(data.x[i:i + batch_size]), data.y[i:i + batch_size]).sum(0)
    return total / max(int((data.y != UNLABELLED).sum()), 1)


@STRATEGIES.register
class IFCA(MultiBranchStrategy):
    """IFCA (Ghosh et al., NeurIPS 2020): each client trains the head with its lowest local loss."""

    name = "ifca"
    Params = IFCAParams

    @classmethod
    def num_branches(cls, params, num_modes: int) -> int:
        return params.k or num_modes

    def configure_train(self, server_round: int, cohort: Sequence[ClientSpec]) -> list[ClientInstruction]:
        return [ClientInstruction(c.cid, self.opt.arrays) for c in cohort]

    def aggregate_train(self, server_round: int, replies: Sequence[ClientReply]) -> dict[str, float]:
        self.apply_updates(replies)
        return self.round_metrics(replies)

    def evaluate(self, test_sets, batch_size: int) -> dict[str, float]:
        use_labels = self.params.test_route == "labels"

        def lowest_loss(output, labels, mode):
            if use_labels:
                losses = head_losses(output, labels)
            else:  # the loss against each head's own prediction: -log of its largest probability
                losses = -output.logits.log_softmax(2).amax(2).reshape(len(labels), output.logits.shape[1], -1).sum(2)
            return Routing(losses.argmin(1), -losses.double())

        return self.evaluate_route(lowest_loss, test_sets, batch_size)

    def client_update(self, job: ClientJob) -> ClientResult:
        branch = int(local_head_losses(job.model, job.data).argmin())
        names = job.model.parameter_names([branch])
        metrics = job.train(TrainTask(branch=branch, trainable=names))
        return ClientResult(job.trained_arrays(names), num_examples=len(job.data),
                            metrics=metrics | {"branch": float(branch)})
