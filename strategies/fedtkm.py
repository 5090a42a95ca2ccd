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
4. with the trained model (``stats_model: received``: the received one, whose votes are reused): mean
   feature mu, the client's center k* by the same scaled vote, and stats
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

Parameters: ``FedTKMParams`` below (each described once, in its ``Field``; docs/scenario-reference.md renders
them). The defaults reproduce the reference; ``center_lr`` < 1, ``anchor`` and ``stats_model: received`` go
beyond it (opt-in; with a small ``geo_lr`` they are the anchored configuration). Why the reference's clustering
does not separate the modes, and what each option changes, measured: docs/strategies.md.

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
from fedshift.clients.base import TrainTask
from pydantic import Field

from fedshift.core.checkpoint_io import as_numpy
from fedshift.core.errors import ScenarioError
from fedshift.evaluation import majority_vote
from fedshift.nets.models import ModelOutput

from .base import STRATEGIES, ClientInstruction, ClientJob, ClientReply, ClientResult, ClientSpec
from .multibranch import (
    ClusterParams,
    MultiBranchStrategy,
    TemporalPrior,
    branch_loss,
    center_metrics,
    clip_update,
    cluster_count,
    initial_centers,
    local_features,
    mean_stat,
    nearest,
    one_hot,
    scaled_distances,
    summed_stat,
)

CENTERS, SCALES, ANCHORED = "fedtkm.centers", "fedtkm.scales", "fedtkm.anchored"
ROWS, COUNTS, ASSIGNED = "fedtkm.center_rows", "fedtkm.center_counts", "fedtkm.assigned"


class FedTKMParams(ClusterParams):
    eval_scaled: bool = Field(True, description="scale the distance to each center by s at test time")
    center_lr: float = Field(1.0, gt=0, le=1, description="floor of the center step: C_k += max(center_lr, 1/u_k) "
                                                          "(mean of its clients' means - C_k), u_k = rounds center "
                                                          "k had clients (1 = the reference's full k-means step)")
    anchor: float | None = Field(None, gt=0.5, le=1, description="in a round whose expected share of one mode "
                                                                 "is at least this, every client takes that "
                                                                 "mode's center instead of voting (None = never); "
                                                                 "exact schedule knowledge: with 0.95 and a linear "
                                                                 "schedule these are the pure rounds")


@STRATEGIES.register
class FedTKM(MultiBranchStrategy):
    """FedTKM (Zhu et al., ICLR 2022): federated k-means on features picks each client's branch; a temporal
    prior on the share of clients per center ties center k to mode k. See the module docstring."""

    name = "fedtkm"
    Params = FedTKMParams

    @classmethod
    def num_branches(cls, params, num_modes: int) -> int:
        return cluster_count(params, num_modes)

    @classmethod
    def check_scenario(cls, params: FedTKMParams, scenario: Any) -> list[tuple[str, str]]:
        """With ``anchor``, every center must be anchored at least once in the run: its steering starts only
        then."""
        if params.anchor is None:
            return []
        from fedshift.shift import build_schedule

        try:
            schedule = build_schedule(scenario)
        except ScenarioError:
            return []  # a bad trace is reported by the shift checks
        k = cluster_count(params, len(scenario.modes))
        prior = TemporalPrior(params, schedule, k)
        peak = np.max([prior.expected(r, lag=0) for r in range(scenario.rounds)], axis=0)
        short = [c for c in range(k) if peak[c] < params.anchor]
        if not short:
            return []
        highest = ", ".join(f"{peak[c]:.3f}" for c in short)
        return [("strategy.anchor", f"is {params.anchor}, but the prior's expected share of center(s) {short} "
                                    f"never reaches it in {scenario.rounds} rounds (highest: {highest}), so their "
                                    "steering would never start; set anchor at most that, or null")]

    # ---- server half
    def initialize(self, model) -> None:
        super().initialize(model)
        k = model.num_branches
        self.centers = initial_centers(self.setup, k, model.feature_dim, self.params.center_init_std)
        self.scales = np.ones(k)
        self.center_updates = np.zeros(k)
        self.prior = TemporalPrior(self.params, self.setup.schedule, k)

    def configure_train(self, server_round: int, cohort: Sequence[ClientSpec]) -> list[ClientInstruction]:
        extra = {CENTERS: self.centers, SCALES: torch.tensor(self.scales, dtype=torch.float32)}
        anchored = self.anchored_center(server_round)
        if anchored is not None:
            extra[ANCHORED] = torch.tensor(anchored)
        return [ClientInstruction(c.cid, self.opt.arrays, extra=extra) for c in cohort]

    def aggregate_train(self, server_round: int, replies: Sequence[ClientReply]) -> dict[str, float]:
        ok = replies
        metrics = self.round_metrics(ok)
        shares = None
        if ok:
            self.apply_updates(ok)
            rows, n = summed_stat(ok, ROWS), summed_stat(ok, COUNTS)
            self.center_updates += (n > 0).numpy()
            lr = np.maximum(self.params.center_lr, 1.0 / np.maximum(self.center_updates, 1))
            move = torch.from_numpy(lr)[:, None] * rows / n.clamp(min=1e-7)[:, None]
            self.centers = (self.centers.double() + move).float()
            shares = mean_stat(ok, ASSIGNED).numpy()
            step, expected = self.prior.log_step(server_round, shares)
            if self.params.anchor is None or self.center_updates.all():
                self.scales = self.scales * np.exp(step)
            metrics["cluster/ratio"] = float(shares[0])
        else:
            expected = self.prior.expected(server_round)
        if self.params.anchor is not None:
            anchored = self.anchored_center(server_round)
            metrics["cluster/anchored"] = float("nan") if anchored is None else float(anchored)
        return metrics | center_metrics(self.centers, self.scales, shares, expected)

    def anchored_center(self, server_round: int) -> int | None:
        """The center every client of this round takes with ``anchor``: the one whose mode the prior schedule
        expects to make up at least ``anchor`` of this round's cohort (the schedule at round r itself, not the
        lagged q_hat of the steering step); None if no mode does or ``anchor`` is unset."""
        if self.params.anchor is None:
            return None
        share = self.prior.expected(server_round, lag=0)
        k = int(np.argmax(share))
        return k if share[k] >= self.params.anchor else None

    def select_branches(self, output: ModelOutput) -> torch.Tensor:
        scales = torch.tensor(self.scales if self.params.eval_scaled else np.ones_like(self.scales))
        return nearest(scaled_distances(output.features, self.centers, scales))

    def state_dict(self) -> dict[str, Any]:
        # tensors, not numpy arrays: checkpoints load with torch.load(weights_only=True)
        return super().state_dict() | {"centers": self.centers, "scales": torch.from_numpy(np.array(self.scales)),
                                       "center_updates": torch.from_numpy(np.array(self.center_updates))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # scales and center_updates: tensors, or numpy arrays (older checkpoints)
        self.centers, self.scales = state["centers"], as_numpy(state["scales"])
        self.center_updates = as_numpy(state.get("center_updates", np.zeros(len(self.scales))))

    # ---- client half
    def client_update(self, job: ClientJob) -> ClientResult:
        p = self.params
        model, data = job.model, job.data
        centers, scales = job.extra[CENTERS], job.extra[SCALES]
        k = model.num_branches
        anchored = int(job.extra[ANCHORED]) if ANCHORED in job.extra else None

        def vote(feats: torch.Tensor) -> int:
            return majority_vote(nearest(scaled_distances(feats, centers, scales)), k)

        received = local_features(model, data) if anchored is None or p.stats_model == "received" else None
        branch = anchored if anchored is not None else vote(received)
        names = model.parameter_names(None if p.label_smooth_w > 0 else [branch])
        before = job.trained_arrays(names) if p.clip_norm is not None else {}
        metrics = job.train(TrainTask(branch=branch, loss_fn=branch_loss(one_hot(branch, k), p.label_smooth_w,
                                                                          p.label_smooth_eps),
                                      trainable=None if p.label_smooth_w > 0 else names))
        arrays = clip_update(before, job.trained_arrays(names), p.clip_norm)

        if p.stats_model == "received":
            feats, chosen = received, branch  # the votes' features: no second inference pass
        else:
            feats = local_features(model, data)
            chosen = anchored if anchored is not None else vote(feats)
        n = len(data)
        rows = torch.zeros(k, feats.shape[1])
        rows[chosen] = n * (feats.mean(0).cpu() - centers[chosen].cpu())
        counts = torch.zeros(k)
        counts[chosen] = n
        return ClientResult(arrays, num_examples=n, metrics=metrics | {"branch": float(branch)},
                            stats={ROWS: rows, COUNTS: counts, ASSIGNED: one_hot(chosen, k)})
