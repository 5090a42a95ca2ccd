"""Math shared by the multi-branch strategies (fedtkm, fedtem, oracle, ifca).

- ``MultiBranchStrategy``: the server half they share (a ModelStrategy: one ServerOptimizer over trunk + all
  heads, updates averaged per parameter name among the clients that sent it, i.e. per branch group; round
  metrics);
- ``branch_loss``: cross-entropy on the chosen branch(es) plus the label-smoothing KL on the others
  (FEDTKM.md section 3, step 2);
- ``TemporalPrior``: the expected share of each cluster one round late, and the geometric step
  (FEDTKM.md section 3, server step 3), for K >= 2 centers;
- scaled distances, nearest center, local features, update clipping, reply filtering.

Branch voting (``majority_vote``) lives in fedshift.evaluation, which routes test examples the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from fedshift.clients.base import Batch, ClientData, LossFn
from pydantic import Field

from fedshift.core.errors import ScenarioError
from fedshift.core.seeding import Stream, seed_of
from fedshift.core.tensors import UNLABELLED, eval_mode
from fedshift.nets.models import ModelOutput, MultiBranchNet
from fedshift.shift import SCHEDULES, ModeSchedule

from .base import ClientReply, StrategyParams, StrategySetup, mean_metric
from .server_optimizer import ModelStrategy, mean_update

# ------------------------------------------------------------------------------------------ parameters


class LabelSmoothingParams(StrategyParams):
    label_smooth_w: float = Field(0.0, ge=0, description="weight of the label-smoothing KL on the branches a "
                                                         "client does not choose (0 = train only the chosen one)")
    label_smooth_eps: float = Field(0.2, ge=0, le=1, description="smoothing of that KL's target: (1 - eps) onehot + "
                                                                 "eps / classes (1 = uniform)")


class ClusterParams(LabelSmoothingParams):
    """Parameters shared by the clustering strategies with a temporal prior (fedtkm, fedtem)."""

    k: int | None = Field(None, ge=2, description="branches = cluster centers; default one per mode")
    geo_lr: float = Field(0.2, ge=0, description="step size of the temporal prior (0 = no prior)")
    zero_mid: bool = Field(False, description="scale the prior's step by |2 q_hat - 1| (0 in mid-transition)")
    prior: Literal["scenario", "linear", "cosine", "block"] = Field(
        "scenario", description="the expected shift: the scenario's own schedule, or this one with the scenario's "
                                "period and phase")
    prior_power: float = Field(1.0, gt=0, description="power of a named prior (the reference's prior has none)")
    center_init_std: float = Field(0.1, gt=0, description="centers start as N(0, std^2), seeded")
    clip_norm: float | None = Field(None, gt=0, description="clip each client update to this global norm")
    stats_model: Literal["trained", "received"] = Field(
        "trained", description="model whose features give a client's cluster statistics: the locally trained one "
                               "(the reference) or the received one, which also chooses the branch and is evaluated")


def cluster_count(params: ClusterParams, num_modes: int) -> int:
    """K for a clustering strategy: params.k or one center per mode. With the prior each center but the last
    follows one mode's expected share, so K may not exceed the number of modes."""
    k = params.k or num_modes
    if params.geo_lr > 0 and k > num_modes:
        raise ScenarioError([("strategy.k", f"is {k} but the scenario has {num_modes} modes; with the temporal "
                                            "prior (geo_lr > 0) every center but the last follows one mode, so k "
                                            f"must be <= {num_modes} (or set strategy.geo_lr=0)")])
    return k


# ------------------------------------------------------------------------------------------ server side


class MultiBranchStrategy(ModelStrategy):
    """Server half shared by multi-branch strategies: one model (trunk + K heads) under the server optimizer.

    A client replies with the parameters it trained (the trunk and one head, or all heads); ``mean_update``
    averages each parameter among the clients that sent it, so each head is averaged within its branch group
    and a head nobody trained takes no step."""

    def apply_updates(self, replies: Sequence[ClientReply]) -> None:
        if replies:
            self.opt.step(mean_update(self.opt.arrays, replies))

    def round_metrics(self, ok: Sequence[ClientReply]) -> dict[str, float]:
        """train/loss, and from each client's ``branch`` metric: ``cluster/ratio`` (share of
        clients on branch 0) and ``cluster/client_branch_accuracy`` (share whose branch is their true mode's,
        which only the simulator knows; a diagnostic, never used by the algorithm)."""
        branches = [(int(r.metrics["branch"]), r.mode) for r in ok if "branch" in r.metrics]
        return {"train/loss": mean_metric(ok, "loss"),
                "cluster/ratio": float(np.mean([b == 0 for b, _ in branches])) if branches else float("nan"),
                "cluster/client_branch_accuracy": (float(np.mean([b == m for b, m in branches]))
                                                   if branches else float("nan"))}


def summed_stat(replies: Sequence[ClientReply], key: str) -> torch.Tensor:
    return torch.stack([r.stats[key].to(torch.float64) for r in replies]).sum(0)


def mean_stat(replies: Sequence[ClientReply], key: str) -> torch.Tensor:
    """Unweighted mean over clients, as the reference's cluster ratio (tff.federated_mean without weights)."""
    return torch.stack([r.stats[key].to(torch.float64) for r in replies]).mean(0)


def initial_centers(setup: StrategySetup, k: int, dim: int, std: float) -> torch.Tensor:
    """K x D centers drawn from N(0, std^2) with a generator seeded by the scenario seed."""
    seed = seed_of(setup.seed, Stream.CENTERS)
    return torch.randn(k, dim, generator=torch.Generator().manual_seed(seed)) * std


class TemporalPrior:
    """The temporal prior of FedTKM (FEDTKM.md section 3, server step 3), for K >= 2 centers.

    The expected share of center k at round r is the prior schedule's weight of mode k at round r - 1 (the
    reference lags by one round); the last center takes the rest. ``log_step`` returns, per center,
    glr_k * (share_k - expected_k) with glr_k = geo_lr, or geo_lr * |2 expected_k - 1| with zero_mid; the
    last center's entry is 0: it is the anchor whose distances stay unscaled, as center 1 is in the
    reference. With K = 2 this is exactly the reference's s <- s * exp(glr (ratio - q_hat)).
    """

    def __init__(self, params: ClusterParams, base: ModeSchedule, k: int):
        """``base``: the scenario's schedule (the prior itself with ``prior: scenario``, else its period and
        phase)."""
        self.params = params
        self.k = k
        if params.prior == "scenario":
            self.schedule: ModeSchedule = base
        else:
            self.schedule = SCHEDULES.get(params.prior)(base.num_modes, period=base.period,
                                                        power=params.prior_power, phase=base.phase_offset)

    def expected(self, server_round: int, lag: int = 1) -> np.ndarray:
        """Expected share of each center at ``server_round``: the schedule's weights at round r - lag (lag 1:
        the reference's q_hat; lag 0: the cohort's own expected mix), the last center taking the rest."""
        w = self.schedule.weights(server_round - lag)
        share = np.zeros(self.k)
        share[:self.k - 1] = w[:self.k - 1]
        share[-1] = max(0.0, 1.0 - share[:-1].sum())
        return share

    def log_step(self, server_round: int, shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(log-multipliers of the K distance scales, the expected shares)."""
        expected = self.expected(server_round)
        glr = np.full(self.k, self.params.geo_lr)
        if self.params.zero_mid:
            glr = glr * np.abs(2.0 * expected - 1.0)
        step = glr * (np.asarray(shares, dtype=np.float64) - expected)
        step[-1] = 0.0
        return step, expected


def center_metrics(centers: torch.Tensor, scales: np.ndarray, shares: np.ndarray | None,
                   expected: np.ndarray) -> dict[str, float]:
    """cluster/s and cluster/prior for center 0 (the reference's scalar and q_hat), every center's norm, and
    for K > 2 every center's share, scale and expected share."""
    out = {"cluster/s": float(scales[0]), "cluster/prior": float(expected[0])}
    for k in range(len(centers)):
        out[f"cluster/center_norm/{k}"] = float(centers[k].norm())
        if len(centers) > 2:
            out[f"cluster/share/{k}"] = float(shares[k]) if shares is not None else float("nan")
            out[f"cluster/s/{k}"] = float(scales[k])
            out[f"cluster/prior/{k}"] = float(expected[k])
    return out


# ------------------------------------------------------------------------------------------ client side


def local_features(model: MultiBranchNet, data: ClientData, batch_size: int = 1024) -> torch.Tensor:
    """The clustering feature of every local example (eval mode: no dropout), [N, D]."""
    with eval_mode(model):
        return torch.cat([model.features(data.x[i:i + batch_size]) for i in range(0, len(data), batch_size)])


def scaled_distances(features: torch.Tensor, centers: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """s_k * ||f - C_k|| for every example and center, [B, K] (explicit differences: exact on ties)."""
    centers, scales = centers.to(features), scales.to(features)
    return (features[:, None, :] - centers[None]).norm(dim=-1) * scales


def nearest(distances: torch.Tensor) -> torch.Tensor:
    """Index of the smallest distance per row; ties go to the highest index (the reference picks center 0
    only when it is strictly nearer)."""
    k = distances.shape[1]
    return k - 1 - torch.argmin(distances.flip(1), dim=1)


def branch_loss(weights: torch.Tensor, smooth_w: float, smooth_eps: float) -> LossFn:
    """Per-example loss: sum_k weights_k CE(y, head_k) + smooth_w * sum_k (1 - weights_k) / (K - 1) *
    KL(smooth(y) || softmax(head_k)), smooth(y) = (1 - eps) onehot(y) + eps / C.

    With one-hot weights (the branch b) this is FEDTKM.md's CE(y, head_b) + w KL(smooth(y) || head_other),
    the KL averaged over the K - 1 other heads. Hidden labels (-1) give 0. Logits are [B, K, C] or, for
    sequence models, [B, K, C, T] with labels [B, T] (the loss is then per token)."""

    def loss(output: ModelOutput, batch: Batch) -> torch.Tensor:
        logits, y = output.logits, batch.y
        k, c = logits.shape[1], logits.shape[2]
        w = weights.to(logits)
        total = sum(w[j] * F.cross_entropy(logits[:, j], y, reduction="none", ignore_index=UNLABELLED)
                    for j in range(k))
        if smooth_w > 0 and k > 1:
            labelled = y != UNLABELLED
            target = (F.one_hot(y.clamp(min=0), c).to(logits) * (1.0 - smooth_eps) + smooth_eps / c).movedim(-1, 1)
            entropy = torch.special.xlogy(target, target).sum(1)
            for j in range(k):
                kl = entropy - (target * F.log_softmax(logits[:, j], dim=1)).sum(1)
                total = total + smooth_w * (1.0 - w[j]) / (k - 1) * torch.where(labelled, kl, torch.zeros_like(kl))
        return total

    return loss


def one_hot(branch: int, k: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(branch), k).float()


def clip_update(received: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                clip_norm: float | None) -> dict[str, torch.Tensor]:
    """Scale the update (trained - received) down to global norm ``clip_norm``; a non-finite update is left
    as it is, for the server to drop."""
    if clip_norm is None:
        return trained
    deltas = {n: trained[n].double() - received[n].double() for n in trained if trained[n].is_floating_point()}
    norm = float(torch.sqrt(sum((d * d).sum() for d in deltas.values()))) if deltas else 0.0
    if not np.isfinite(norm) or norm <= clip_norm:
        return trained
    scale = clip_norm / norm
    return {n: (received[n].double() + deltas[n] * scale).to(trained[n].dtype) if n in deltas else trained[n]
            for n in trained}
