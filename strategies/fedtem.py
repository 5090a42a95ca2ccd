"""FedTEM: multi-branch networks + a federated Gaussian mixture fitted by EM, with a temporal prior.

The EM variant named in the workshop version of Zhu et al., "Diurnal or Nocturnal? Federated Learning from
Periodically Shifting Distributions" (ICLR 2022); the reference code has only k-means (FedTKM). Our exact
formulation, for K components with isotropic covariances in the D-dimensional feature space f(x):

Server state: model w; means mu [K, D]; variances var [K]; log mixture weights a [K] (pi = softmax(a));
online sufficient statistics N [K], S [K, D], Q [K] (start at 0).

Client (receives w and ``fedtem.means``, ``fedtem.vars``, ``fedtem.log_weights``):
1. E-step with the received model: for each local example i,
   log p_ik = log pi_k - ||f_i - mu_k||^2 / (2 var_k) - D/2 log var_k, responsibilities
   gamma_ik = softmax_k(log p_ik); the client's soft assignment r_k = mean_i gamma_ik.
2. Local training on the responsibility-weighted loss sum_k r_k CE(y, head_k) + label_smooth_w *
   sum_k (1 - r_k) / (K - 1) KL(smooth(y) || softmax(head_k)) (FedTKM's loss when r is one-hot). Trunk and
   all heads train and are sent; ``fedtem.train_resp`` = r.
3. With the trained model (``stats_model: received``: the received one, the E-step of 1 reused):
   gamma'_ik as in 1, and the statistics sum_i gamma'_ik (``fedtem.resp``),
   sum_i gamma'_ik f_i (``fedtem.feat``), sum_i gamma'_ik ||f_i||^2 (``fedtem.sq``) and the soft share
   mean_i gamma'_ik (``fedtem.share``).

Server:
1. Model: the trunk takes the example-weighted mean update; head k the mean update weighted by
   n_i r_ik (each head is averaged over the clients in proportion to how much they trained it); then the
   server optimizer steps. Failed clients and non-finite updates or statistics get weight 0 and are counted.
2. M-step, online EM with forgetting (Cappé and Moulines 2009): N <- memory N + sum of the clients' resp,
   S <- memory S + sum feat, Q <- memory Q + sum sq; for every k with N_k > 1e-7:
   mu_k = S_k / N_k, var_k = max((Q_k / N_k - ||mu_k||^2) / D, min_var). The forgetting keeps a component
   that receives little mass this round (mode absent) from jumping onto the other mode's features.
3. Temporal prior on the mixture weights, the same rule as FedTKM's distance scales: share_k = unweighted
   mean over clients of their soft share, q_hat_k = the prior schedule's weight of mode k at round r - 1,
   a_k <- a_k - glr_k (share_k - q_hat_k) for every component but the last (a_{K-1} = 0 is the anchor);
   glr_k = geo_lr, or geo_lr |2 q_hat_k - 1| with zero_mid. Too much mass on component 0 lowers its weight.
   geo_lr = 0 keeps the weights uniform: plain federated EM.

Test time: each example's branch is its most probable component (argmax_k log p_ik); each group of one
mode's examples majority-votes a branch (the paper's protocol, see fedshift.evaluation).

Parameters (defaults):
    k (None = one per mode), geo_lr (0.2), zero_mid (False), prior ("scenario"), prior_power (1.0),
    label_smooth_w (0.0), label_smooth_eps (0.2), center_init_std (0.1), clip_norm (None),
        stats_model ("trained"): as in fedtkm (means start where FedTKM's centers do).
    memory (0.5): forgetting factor of the online statistics (0 = each round's statistics alone).
    init_var (1.0): every component's variance until it has statistics.
    min_var (1e-4): floor of the variances.
    server_optimizer: name (sgd), lr (1.0), momentum (0.9), beta1 (0.9), beta2 (0.999), eps (1e-8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from fedshift.clients.base import TrainTask
from pydantic import Field

from fedshift.core.checkpoint_io import as_numpy
from fedshift.nets.models import ModelOutput

from .base import STRATEGIES, ClientInstruction, ClientJob, ClientReply, ClientResult, ClientSpec
from .multibranch import (
    ClusterParams,
    MultiBranchStrategy,
    TemporalPrior,
    branch_loss,
    clip_update,
    cluster_count,
    initial_centers,
    local_features,
    mean_stat,
    summed_stat,
)

MEANS, VARS, LOG_WEIGHTS = "fedtem.means", "fedtem.vars", "fedtem.log_weights"
TRAIN_RESP, RESP, FEAT, SQ, SHARE = "fedtem.train_resp", "fedtem.resp", "fedtem.feat", "fedtem.sq", "fedtem.share"


class FedTEMParams(ClusterParams):
    memory: float = Field(0.5, ge=0, lt=1, description="forgetting factor of the online EM statistics")
    init_var: float = Field(1.0, gt=0, description="variance of every component until it has statistics")
    min_var: float = Field(1e-4, gt=0, description="floor of the component variances")


def log_posterior(features: torch.Tensor, means: torch.Tensor, variances: torch.Tensor,
                  log_weights: torch.Tensor) -> torch.Tensor:
    """log pi_k + log N(f; mu_k, var_k I) up to a constant, [B, K]."""
    means, variances, log_weights = means.to(features), variances.to(features), log_weights.to(features)
    sq = ((features[:, None, :] - means[None]) ** 2).sum(-1)
    d = features.shape[1]
    return torch.log_softmax(log_weights, 0) - sq / (2 * variances) - 0.5 * d * torch.log(variances)


@STRATEGIES.register
class FedTEM(MultiBranchStrategy):
    """FedTEM: a federated Gaussian mixture (soft EM) on features picks how much each branch trains on a
    client; a temporal prior on the mixture weights ties component k to mode k. See the module docstring."""

    name = "fedtem"
    Params = FedTEMParams

    @classmethod
    def num_branches(cls, params, num_modes: int) -> int:
        return cluster_count(params, num_modes)

    # ---- server half
    def initialize(self, model) -> None:
        super().initialize(model)
        k, d = model.num_branches, model.feature_dim
        self.means = initial_centers(self.setup, k, d, self.params.center_init_std)
        self.vars = torch.full((k,), self.params.init_var)
        self.log_weights = np.zeros(k)
        self.n, self.s, self.q = torch.zeros(k, dtype=torch.float64), torch.zeros(k, d, dtype=torch.float64), \
            torch.zeros(k, dtype=torch.float64)
        self.prior = TemporalPrior(self.params, self.setup.schedule, k)

    def configure_train(self, server_round: int, cohort: Sequence[ClientSpec]) -> list[ClientInstruction]:
        mixture = {MEANS: self.means, VARS: self.vars, LOG_WEIGHTS: torch.tensor(self.log_weights, dtype=torch.float32)}
        return [ClientInstruction(c.cid, self.opt.arrays, extra=mixture) for c in cohort]

    def apply_updates(self, replies: Sequence[ClientReply]) -> None:
        if not replies:
            return
        update: dict[str, torch.Tensor] = {}
        for name, g in self.opt.arrays.items():
            if name.startswith("heads."):
                k = int(name.split(".")[1])
                weights = [r.num_examples * float(r.stats[TRAIN_RESP][k]) for r in replies]
            else:
                weights = [float(r.num_examples) for r in replies]
            total = sum(weights)
            if total <= 0:
                continue
            update[name] = sum((r.arrays[name].to(g.device, torch.float64) - g.double()) * (w / total) for r, w in zip(replies, weights))
        self.opt.step(update)

    def aggregate_train(self, server_round: int, replies: Sequence[ClientReply]) -> dict[str, float]:
        ok = replies
        metrics = self.round_metrics(ok)
        shares = None
        if ok:
            self.apply_updates(ok)
            m = self.params.memory
            self.n = m * self.n + summed_stat(ok, RESP)
            self.s = m * self.s + summed_stat(ok, FEAT)
            self.q = m * self.q + summed_stat(ok, SQ)
            have = self.n > 1e-7
            means = self.s / self.n.clamp(min=1e-7)[:, None]
            variances = ((self.q / self.n.clamp(min=1e-7) - (means ** 2).sum(1)) / self.means.shape[1]).clamp(
                min=self.params.min_var)
            self.means = torch.where(have[:, None], means, self.means.double()).float()
            self.vars = torch.where(have, variances, self.vars.double()).float()
            shares = mean_stat(ok, SHARE).numpy()
            step, expected = self.prior.log_step(server_round, shares)
            self.log_weights = self.log_weights - step
            metrics["cluster/ratio"] = float(shares[0])
        else:
            expected = self.prior.expected(server_round)
        weights = np.exp(self.log_weights - np.logaddexp.reduce(self.log_weights))
        metrics |= {"cluster/prior": float(expected[0]), "cluster/weight": float(weights[0])}
        for k in range(len(self.means)):
            metrics[f"cluster/center_norm/{k}"] = float(self.means[k].norm())
            metrics[f"cluster/var/{k}"] = float(self.vars[k])
            if len(self.means) > 2:
                metrics[f"cluster/share/{k}"] = float(shares[k]) if shares is not None else math.nan
                metrics[f"cluster/weight/{k}"] = float(weights[k])
                metrics[f"cluster/prior/{k}"] = float(expected[k])
        return metrics

    def select_branches(self, output: ModelOutput) -> torch.Tensor:
        return log_posterior(output.features, self.means, self.vars, torch.tensor(self.log_weights)).argmax(1)

    def state_dict(self) -> dict[str, Any]:
        # tensors, not numpy arrays: checkpoints load with torch.load(weights_only=True)
        return super().state_dict() | {"means": self.means, "vars": self.vars,
                                       "log_weights": torch.from_numpy(np.array(self.log_weights)),
                                       "stats": (self.n, self.s, self.q)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # log_weights: a tensor, or a numpy array (older checkpoints)
        self.means, self.vars = state["means"], state["vars"]
        self.log_weights = as_numpy(state["log_weights"])
        self.n, self.s, self.q = state["stats"]

    # ---- client half
    def client_update(self, job: ClientJob) -> ClientResult:
        p = self.params
        model, data = job.model, job.data
        mixture = (job.extra[MEANS], job.extra[VARS], job.extra[LOG_WEIGHTS])
        feats = local_features(model, data)  # the received model's
        gamma = torch.softmax(log_posterior(feats, *mixture), 1)
        resp = gamma.mean(0).cpu()
        branch = int(resp.argmax())
        names = model.parameter_names()
        before = job.trained_arrays(names) if p.clip_norm is not None else {}
        metrics = job.train(TrainTask(branch=branch, loss_fn=branch_loss(resp, p.label_smooth_w, p.label_smooth_eps)))
        arrays = clip_update(before, job.trained_arrays(names), p.clip_norm)

        if p.stats_model == "trained":  # else the E-step above is reused
            feats = local_features(model, data)
            gamma = torch.softmax(log_posterior(feats, *mixture), 1)
        stats = {TRAIN_RESP: resp, RESP: gamma.sum(0), FEAT: gamma.T @ feats, SQ: gamma.T @ (feats ** 2).sum(1),
                 SHARE: gamma.mean(0)}
        return ClientResult(arrays, num_examples=len(data), metrics=metrics | {"branch": float(branch)},
                            stats={k: v.detach().cpu().float() for k, v in stats.items()})
