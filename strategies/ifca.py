"""IFCA: the Iterative Federated Clustering Algorithm on a multi-branch network.

Ghosh, Chung, Yin, Ramchandran, "An Efficient Framework for Clustered Federated Learning", NeurIPS 2020,
in its weight-sharing form (shared trunk, one head per cluster). Each round a client evaluates every head on
its local labelled data with the received model, picks the head with the lowest mean loss (ties to the lower
index), trains the trunk and that head (cross-entropy), and sends them back; the server averages the trunk
over all clients and each head among the clients that picked it. Nothing ties a head to a mode: the
branch/mode correspondence is whatever the clustering settles on.

Test time, the same way: each example picks the head with its lowest loss (``accuracy_per_example``), each
group of up to ``eval.batch_size`` examples of one mode picks the head with the lowest mean loss over the
group (``accuracy``). Like the paper's own evaluation this reads the test labels to choose the head.

Parameters (defaults):
    k (None = one per mode): number of heads (clusters).
    server_optimizer: name (sgd), lr (1.0), momentum (0.9), beta1 (0.9), beta2 (0.999), eps (1e-8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from fedshift.clients.base import ClientData, TrainTask
from fedshift.data.federation import UNLABELLED
from fedshift.evaluation import evaluate_routed
from fedshift.models import ModelOutput, MultiBranchNet

from .base import STRATEGIES, ClientInstruction, ClientJob, ClientReply, ClientResult, ClientSpec, StrategyParams
from .multibranch import MultiBranchStrategy, usable_replies


class IFCAParams(StrategyParams):
    k: int | None = Field(None, ge=2, description="heads (clusters); default one per mode")


def head_losses(output: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every head for every example, [B, K] (summed over the tokens of a sequence)."""
    losses = torch.stack([F.cross_entropy(output.logits[:, k], labels, reduction="none", ignore_index=UNLABELLED)
                          for k in range(output.logits.shape[1])], dim=1)
    return losses.reshape(losses.shape[0], losses.shape[1], -1).sum(2)


@torch.no_grad()
def local_head_losses(model: MultiBranchNet, data: ClientData, batch_size: int = 1024) -> torch.Tensor:
    """Mean loss of every head over the client's labelled examples (or tokens), [K]."""
    was_training = model.training
    model.eval()
    total = torch.zeros(model.num_branches, device=data.x.device)
    for i in range(0, len(data), batch_size):
        total += head_losses(model(data.x[i:i + batch_size]), data.y[i:i + batch_size]).sum(0)
    model.train(was_training)
    return total / max(int((data.y != UNLABELLED).sum()), 1)


@STRATEGIES.register("ifca")
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
        ok, counts = usable_replies(replies)
        self.apply_updates(ok)
        return self.round_metrics(ok, counts)

    def evaluate(self, test_sets, batch_size: int) -> dict[str, float]:
        def lowest_loss(output, labels, mode):
            losses = head_losses(output, labels)
            return losses.argmin(1), int(losses.sum(0).argmin())

        model = self.global_model()
        return evaluate_routed(lambda mode: model, test_sets, lowest_loss, batch_size, self.setup.eval)

    def client_update(self, job: ClientJob) -> ClientResult:
        branch = int(local_head_losses(job.model, job.data).argmin())
        names = job.model.parameter_names([branch])
        metrics = job.train(TrainTask(branch=branch, trainable=names))
        return ClientResult(job.trained_arrays(names), num_examples=len(job.data),
                            metrics=metrics | {"branch": float(branch)})
