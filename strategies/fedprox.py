"""FedProx: FedAvg with a proximal term in every client's local objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks", MLSys 2020.
Client k minimises h_k(w; w^t) = F_k(w) + (mu / 2) ||w - w^t||^2 from the received global model w^t; the server
aggregates as FedAvg (example-weighted mean update, then the server optimizer).

Parameters:
    mu (0.01): weight of the proximal term (the paper tunes it over {0.001, 0.01, 0.1, 1}); 0 is FedAvg.
    server_optimizer: as FedAvg's.

The term applies under every client training strategy: its gradient mu (w - w^t) is added to the gradient of
every trained parameter before each local optimizer step (``TrainTask.proximal_mu``, clients/base.py), which is
the step the paper's objective gives. Deviation: the paper's inexact solver tolerance (gamma) and its dropping
of stragglers are not modelled; every client runs the configured local epochs.
"""

from __future__ import annotations

from fedshift.clients.base import TrainTask
from pydantic import Field

from .base import STRATEGIES, ClientJob, ClientResult, StrategyParams
from .fedavg import FedAvg


class FedProxParams(StrategyParams):
    mu: float = Field(0.01, ge=0, description="weight of the proximal term (mu / 2) ||w - w_received||^2")


@STRATEGIES.register
class FedProx(FedAvg):
    """FedProx: FedAvg whose clients add (mu / 2) ||w - w_received||^2 to their local objective."""

    name = "fedprox"
    Params = FedProxParams

    def client_update(self, job: ClientJob) -> ClientResult:
        params = dict(job.model.named_parameters())
        anchor = {n: params[n].detach().clone() for n in job.received if n in params}  # w^t, as received
        metrics = job.train(TrainTask(branch=0, proximal_mu=self.params.mu, anchor=anchor))
        return ClientResult(job.trained_arrays(), num_examples=len(job.data), metrics=metrics)
