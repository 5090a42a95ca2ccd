"""FedTKM: multi-branch networks + federated k-means with a temporal prior.

Zhu, Xu, Chen, Konečný, Hard, Goldstein, "Diurnal or Nocturnal? Federated Learning of Multi-branch Networks
from Periodically Shifting Distributions", ICLR 2022; reference code google-research/federated,
periodic_distribution_shift. The algorithm is FEDTKM.md section 3, one round:

Client (receives the model w, centers C [K, D] and distance scales s [K] as arrays ``fedtkm.centers``,
``fedtkm.scales``):
1. branch choice with the received model: each local example votes for the center with the smallest
   s_k ||f(x) - C_k||; the branch b is the majority vote (ties to the higher index: with K = 2 branch 0
   needs a strict majority, as in the reference);
2. one local training pass (the scenario's client training strategy) on
   CE(y, head_b) + label_smooth_w * mean over the other heads of KL(smooth(y) || softmax(head)), with
   smooth(y) = (1 - eps) onehot(y) + eps / C. With label_smooth_w > 0 trunk and every head train and are
   sent; with 0 only the trunk and head b train and are sent;
3. optional clipping of the update to a global norm;
4. with the trained model: mean feature mu, the client's center k* by the same scaled vote, and stats
   ``fedtkm.center_rows`` (n (mu - C_k*) in row k*), ``fedtkm.center_counts`` (n at k*), ``fedtkm.assigned``
   (one-hot k*).

Server: (1) the server optimizer steps on the example-weighted mean update, each parameter averaged among
the clients that sent it (failed clients and non-finite updates or statistics get weight 0 and are counted
in ``clients/nonfinite``; the run goes on); (2) C_k += (sum of rows k) / max(sum of counts k, 1e-7);
(3) the temporal prior: share_k = unweighted mean of the clients' one-hot k*, expected share q_hat_k = the
prior schedule's weight of mode k at round r - 1 (one round late, as the reference), and
s_k <- s_k exp(glr_k (share_k - q_hat_k)) for every center but the last, whose scale stays 1;
glr_k = geo_lr, or geo_lr |2 q_hat_k - 1| with zero_mid. For K = 2 this is the reference exactly: only
center 0's distance is scaled, s <- s exp(glr (ratio - q_hat)). Too many clients on center 0 makes s grow,
so center 0 looks farther and fewer choose it; that is what ties center 0 / branch 0 to mode 0 ("day").
For K > 2 each center k < K - 1 is steered towards mode k's expected share in the same way, and the last
center takes whatever is left.

Test time: each example's branch is its nearest scaled center; the paper's protocol lets each group of up
to ``eval.batch_size`` examples of one mode majority-vote one branch (see fedshift.evaluation).

Parameters (defaults):
    k (None = one per mode): branches and cluster centers; with the prior, k <= number of modes.
    geo_lr (0.2): step of the temporal prior; 0 = plain federated k-means (no prior).
    zero_mid (False): glr = geo_lr * |2 q_hat - 1|, so no step in mid-transition (q_hat = 0.5).
    prior ("scenario"): the expected schedule: the scenario's own, or linear | cosine | block with the
        scenario's period and phase.
    prior_power (1.0): power of a named prior (the reference's prior ignores the shift's power).
    label_smooth_w (0.0), label_smooth_eps (0.2): the KL term on the unchosen branches (the reference's
        defaults; its EMNIST example uses 0.5 / 0.1, CIFAR 0.1 / 0.5 with zero_mid).
    center_init_std (0.1): centers start N(0, std^2), drawn from the scenario seed.
    clip_norm (None): clip each client's update to this global norm (Stack Overflow: 1.0).
    eval_scaled (True): scale distances by s at test time, as FEDTKM.md says (the reference's flag
        ``rescale_eval`` defaults to False).
    server_optimizer: name (sgd), lr (1.0), momentum (0.9), beta1 (0.9), beta2 (0.999), eps (1e-8); the
        paper uses adam, lr 0.1, eps 1e-4.

Deliberate deviations from the reference: a head nobody trained this round takes no server step (the
reference averages zero updates of unchosen heads in when label_smooth_w = 0, shrinking their step by the
share of clients that trained them); a client whose update or statistics are non-finite is dropped whole
(the reference still adds its center statistics); features for voting are taken in eval mode (no dropout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field

from fedshift.clients.base import TrainTask
from fedshift.evaluation import majority_vote
from fedshift.models import ModelOutput

from .base import STRATEGIES, ClientInstruction, ClientJob, ClientReply, ClientResult, ClientSpec
from .multibranch import (ClusterParams, MultiBranchStrategy, TemporalPrior, branch_loss, center_metrics,
                          clip_update, cluster_count, initial_centers, local_features, mean_stat, nearest, one_hot,
                          scaled_distances, summed_stat, usable_replies)

CENTERS, SCALES = "fedtkm.centers", "fedtkm.scales"
ROWS, COUNTS, ASSIGNED = "fedtkm.center_rows", "fedtkm.center_counts", "fedtkm.assigned"


class FedTKMParams(ClusterParams):
    eval_scaled: bool = Field(True, description="scale the distance to each center by s at test time")


@STRATEGIES.register("fedtkm")
class FedTKM(MultiBranchStrategy):
    """FedTKM (Zhu et al., ICLR 2022): federated k-means on features picks each client's branch; a temporal
    prior on the share of clients per center ties center k to mode k. See the module docstring."""

    name = "fedtkm"
    Params = FedTKMParams

    @classmethod
    def num_branches(cls, params, num_modes: int) -> int:
        return cluster_count(params, num_modes)

    # ---- server half
    def initialize(self, model) -> None:
        super().initialize(model)
        k = model.num_branches
        self.centers = initial_centers(self.setup, k, model.feature_dim, self.params.center_init_std)
        self.scales = np.ones(k)
        self.prior = TemporalPrior(self.params, self.setup, k)

    def configure_train(self, server_round: int, cohort: Sequence[ClientSpec]) -> list[ClientInstruction]:
        arrays = {**self.opt.arrays, CENTERS: self.centers, SCALES: torch.tensor(self.scales, dtype=torch.float32)}
        return [ClientInstruction(c.cid, arrays) for c in cohort]

    def aggregate_train(self, server_round: int, replies: Sequence[ClientReply]) -> dict[str, float]:
        ok, counts = usable_replies(replies)
        metrics = self.round_metrics(ok, counts)
        shares = None
        if ok:
            self.apply_updates(ok)
            rows, n = summed_stat(ok, ROWS), summed_stat(ok, COUNTS)
            self.centers = (self.centers.double() + rows / n.clamp(min=1e-7)[:, None]).float()
            shares = mean_stat(ok, ASSIGNED).numpy()
            step, expected = self.prior.log_step(server_round, shares)
            self.scales = self.scales * np.exp(step)
            metrics["cluster/ratio"] = float(shares[0])
        else:
            expected = self.prior.expected(server_round)
        return metrics | center_metrics(self.centers, self.scales, shares, expected)

    def select_branches(self, output: ModelOutput) -> torch.Tensor:
        scales = torch.tensor(self.scales if self.params.eval_scaled else np.ones_like(self.scales))
        return nearest(scaled_distances(output.features, self.centers, scales))

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"centers": self.centers, "scales": self.scales}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.centers, self.scales = state["centers"], np.asarray(state["scales"])

    # ---- client half
    def client_update(self, job: ClientJob) -> ClientResult:
        p = self.params
        model, data = job.model, job.data
        centers, scales = job.extra[CENTERS], job.extra[SCALES]
        k = model.num_branches
        branch = majority_vote(nearest(scaled_distances(local_features(model, data), centers, scales)), k)
        names = model.parameter_names(None if p.label_smooth_w > 0 else [branch])
        before = job.trained_arrays(names) if p.clip_norm is not None else {}
        metrics = job.train(TrainTask(branch=branch, loss_fn=branch_loss(one_hot(branch, k), p.label_smooth_w,
                                                                          p.label_smooth_eps),
                                      trainable=None if p.label_smooth_w > 0 else names))
        arrays = clip_update(before, job.trained_arrays(names), p.clip_norm)

        feats = local_features(model, data)
        chosen = majority_vote(nearest(scaled_distances(feats, centers, scales)), k)
        n = len(data)
        rows = torch.zeros(k, feats.shape[1])
        rows[chosen] = n * (feats.mean(0).cpu() - centers[chosen].cpu())
        counts = torch.zeros(k)
        counts[chosen] = n
        return ClientResult(arrays, num_examples=n, metrics=metrics | {"branch": float(branch)},
                            stats={ROWS: rows, COUNTS: counts, ASSIGNED: one_hot(chosen, k)})
