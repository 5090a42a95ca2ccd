"""FedAvg with a server optimizer: one model for every mode.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017;
server momentum / Adam as in Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

Parameters:
    server_optimizer: name (sgd | momentum | adam, default sgd), lr (1.0), momentum (0.9), beta1 (0.9),
        beta2 (0.999), eps (1e-8), eps_convention (torch | keras: where adam's eps enters, see
        ServerOptimizerConfig). sgd with lr 1.0 is McMahan's example-weighted average.

Every client trains the single branch with cross-entropy from logits (the reference code's double softmax
is not copied). Failed clients and updates with a non-finite entry never reach it: the round loop screens
them out and counts them.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedshift.clients.base import TrainTask

from .base import STRATEGIES, ClientInstruction, ClientJob, ClientReply, ClientResult, ClientSpec, mean_metric
from .server_optimizer import ModelStrategy, mean_update


@STRATEGIES.register
class FedAvg(ModelStrategy):
    """FedAvg: example-weighted averaging of client updates, with an optional server optimizer."""

    name = "fedavg"

    def configure_train(self, server_round: int, cohort: Sequence[ClientSpec]) -> list[ClientInstruction]:
        return [ClientInstruction(c.cid, self.opt.arrays) for c in cohort]

    def aggregate_train(self, server_round: int, replies: Sequence[ClientReply]) -> dict[str, float]:
        if replies:
            self.opt.step(mean_update(self.opt.arrays, replies))
        return {"train/loss": mean_metric(replies, "loss")}

    def client_update(self, job: ClientJob) -> ClientResult:
        metrics = job.train(TrainTask(branch=0))
        return ClientResult(job.trained_arrays(), num_examples=len(job.data), metrics=metrics)
