"""Prior-IFCA: loss-based clustering (IFCA) whose cluster choice is steered by the temporal prior.

IFCA (Ghosh et al., NeurIPS 2020) in its shared-trunk form, with the temporal prior of FedTKM (Zhu et al., ICLR
2022) moved from a distance scale on the server to each client's own choice. One round:

Server: sends the model and, as config, the log prior of each branch at this round, log p_k(t), where
p(t) = (1 - prior_floor) w(t) + prior_floor / K and w(t) is the expected mode mix of round t's cohort under the
prior schedule (the scenario's own by default: the deployment's public knowledge of its periodic schedule). Branch
k is tied to mode k by this prior and nothing else; no client's true mode is read.

Client:
1. one forward pass of the received model over its labelled examples (trunk once, all K heads): L_k, the mean
   cross-entropy of head k (the one extra inference pass over FedAvg);
2. branch b = argmin_k [L_k - prior_weight * log p_k(t)] (ties to the lower index). The prior's pull is bounded:
   at most prior_weight * log((1 - f + f/K) / (f/K)) nats of mean loss, f = prior_floor (2.9 for K = 2, f = 0.1).
   While the heads are alike (the first rounds) the prior decides: it names the clusters (branch k = mode k) and
   breaks IFCA's permutation symmetry. Once each head has specialised, its loss on another mode's data is several
   nats above the right head's, so the loss decides and a wrong prior (phase or period off) moves no client: the
   method degrades to IFCA, not below it. (The Bayesian weight, the summed loss n L_k against log p_k, is too weak
   to name the clusters: on digits-conflict an untrained head's summed loss differs from a trained one's by more
   than 2.9 nats, and the clustering stayed at chance.)
3. trains the trunk and head b (cross-entropy), and, with ``router: head``, a router head on the trunk that
   learns to predict b from each input (cross-entropy on its first K logits, weight ``router_w``);
4. sends the trunk, head b and the router.
The server averages the trunk over all clients and each head among the clients that chose it (MultiBranchStrategy).

Test time (no labels, no round): a test client scores every branch from its own inputs and picks the best sum
over its examples (the test-client vote); per-example routing takes each example's best branch. The default
``router: inputs`` scores branch k by log p(x | k), where branch k's inputs are modelled as a mixture over labels of
diagonal Gaussians (a class mean per label, the variance pooled), fitted on the server from sums the clients send
with their update: for the branch b they chose, the per-label count, sum and sum of squares of their raw inputs
(no forward pass; decayed by ``router_decay`` per round so the first rounds' choices fade). It models raw
inputs, so it suits image and vector inputs, not token sequences (use ``energy`` there). Inputs do not move as
the trunk trains, so this router does not drift with the schedule, which model-based routers do (measured in
docs/strategies.md). The sums are class-conditional means of raw inputs: a deployment must protect them as it
protects updates (secure aggregation, noise). Model-only alternatives: ``router: energy`` scores branch k by
logsumexp_y of head k's logits (Liu et al., NeurIPS 2020), ``confidence`` by log max softmax of head k (IFCA's
input route), ``head`` by a router head trained on the clients' choices with the round's log prior added to its
logits (logit adjustment, Menon et al., ICLR 2021).

Parameters (defaults):
    k (None = one per mode): branches; with the prior, k = number of modes (branch k <-> mode k).
    prior (scenario): the expected schedule: the scenario's own, a named one (linear | cosine | block) with the
        scenario's period and phase, or none (plain IFCA with this method's routing).
    prior_weight (1.0): lambda in L_k - lambda log p_k; 0 = no prior.
    prior_floor (0.1): share of a uniform mix in p(t), bounding the prior's pull.
    prior_phase_shift (0.0), prior_period_scale (1.0): the prior's phase offset (in periods, added) and period
        (multiplied): a deliberately wrong prior, for robustness studies.
    router (inputs): test-time route: inputs (per-branch Gaussian mixtures of the inputs, fitted from the clients'
        input sums), energy (largest logsumexp), confidence (largest max softmax) or head (a router head).
    router_w (1.0): weight of the router head's cross-entropy in local training.
    router_decay (0.95): with router inputs, the per-round decay of the branches' input sums.
    server_optimizer: name (sgd), lr (1.0), momentum (0.9), beta1 (0.9), beta2 (0.999), eps (1e-8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from fedshift.clients.base import TrainTask
from pydantic import Field

from fedshift.core.tensors import UNLABELLED
from fedshift.evaluation import Routing
from fedshift.nets.models import ModelOutput
from fedshift.shift import SCHEDULES, ModeSchedule

from .base import (
    STRATEGIES,
    ClientInstruction,
    ClientJob,
    ClientReply,
    ClientResult,
    ClientSpec,
    StrategyParams,
    StrategySetup,
)
from .ifca import local_head_losses
from .multibranch import MultiBranchStrategy

PERIODIC = ("linear", "cosine", "block")
LOG_PRIOR = "prior_ifca.log_prior."  # + branch index: the config keys of the round's log prior
STATS = "prior_ifca.inputs."  # + sum, sumsq, count: a client's input sums on its branch's row (router: inputs)
INPUT_STATS = ("sum", "sumsq", "count")


class PriorIFCAParams(StrategyParams):
    k: int | None = Field(None, ge=2, description="branches (clusters); default one per mode")
    prior: Literal["scenario", "linear", "cosine", "block", "none"] = Field(
        "scenario", description="the expected schedule: the scenario's own, a named one with the scenario's period "
                                "and phase, or none (no prior)")
    prior_weight: float = Field(1.0, ge=0, description="lambda in argmin_k [mean loss_k - lambda log p_k(t)]; "
                                                       "0 = no prior")
    prior_floor: float = Field(0.1, gt=0, le=1, description="share of a uniform mix in the prior p(t) (bounds "
                                                            "the prior's pull)")
    prior_phase_shift: float = Field(0.0, description="added to the prior's phase, in periods (a wrong prior, "
                                                      "for robustness studies)")
    prior_period_scale: float = Field(1.0, gt=0, description="multiplies the prior's period (a wrong prior, for "
                                                             "robustness studies)")
    router: Literal["inputs", "energy", "confidence", "head"] = Field(
        "inputs", description="test-time route from the inputs: inputs (each branch's inputs as a mixture over labels "
                              "of diagonal Gaussians, from the clients' per-label input sums), energy (the head with "
                              "the largest logsumexp of its logits), confidence (the largest max softmax, IFCA's input "
                              "route) or head (a router head trained on the clients' cluster choices)")
    router_decay: float = Field(0.95, gt=0, le=1, description="router: inputs: per-round decay of the input sums "
                                                              "(forgets the first rounds' assignments)")
    router_w: float = Field(1.0, gt=0, description="weight of the router head's cross-entropy (router: head)")


def prior_schedule(params: PriorIFCAParams, base: ModeSchedule) -> ModeSchedule | None:
    """The schedule the prior expects: the scenario's or a named one, with the phase shift and period scale
    applied (None without a prior). A trace schedule has no period to shift: use a named prior for it."""
    if params.prior == "none" or params.prior_weight == 0:
        return None
    name = base.name if params.prior == "scenario" else params.prior
    if name not in PERIODIC:  # a trace or constant schedule: the prior is the schedule itself (check_scenario)
        return base
    return SCHEDULES.get(name)(base.num_modes, period=base.period * params.prior_period_scale,
                               power=base.power if params.prior == "scenario" else 1.0,
                               phase=base.phase_offset + params.prior_phase_shift)


def log_prior(schedule: ModeSchedule | None, server_round: int, k: int, floor: float) -> np.ndarray:
    """log p_k(t) for the K branches: the schedule's mode weights at round t mixed with a uniform share ``floor``
    (zeros without a prior). Branches beyond the schedule's modes get only the uniform share."""
    if schedule is None:
        return np.zeros(k)
    w = np.zeros(k)
    got = schedule.weights(server_round)[:k]
    w[:len(got)] = got
    w = w / w.sum() if w.sum() > 0 else np.full(k, 1.0 / k)
    return np.log((1.0 - floor) * w + floor / k)


def choose_branch(losses: torch.Tensor, log_p: torch.Tensor, weight: float) -> int:
    """argmin_k [L_k - weight * log p_k]; ties go to the lower index."""
    return int(torch.argmin(losses.double() - weight * log_p.double()))


def router_loss(branch: int, k: int, router_w: float, log_p: torch.Tensor):
    """Per-example loss: CE of head ``branch`` + router_w * CE(first K logits of the router head + log p(t),
    branch). Adding the round's log prior (logit adjustment, Menon et al., ICLR 2021) lets the router learn the
    mode's evidence in the input rather than the cohort's current mix, which swings with the schedule."""

    def loss(output, batch) -> torch.Tensor:
        logits, y = output.logits, batch.y
        ce = F.cross_entropy(logits[:, branch], y, reduction="none", ignore_index=UNLABELLED)
        ce = ce.reshape(len(y), -1).sum(1)
        route = logits[:, k, :k].reshape(len(y), k, -1).mean(2) + log_p.to(logits)
        return ce + router_w * F.cross_entropy(route, torch.full_like(route[:, 0], branch, dtype=torch.long),
                                               reduction="none")

    return loss


@STRATEGIES.register
class PriorIFCA(MultiBranchStrategy):
    """Recommended: IFCA whose clients pick the head minimising loss - log temporal prior (branch k = mode k)."""

    name = "prior-ifca"
    Params = PriorIFCAParams

    def __init__(self, params: PriorIFCAParams, setup: StrategySetup | None = None):
        super().__init__(params, setup)
        self.prior = prior_schedule(params, setup.schedule) if setup is not None else None

    @classmethod
    def num_branches(cls, params, num_modes: int) -> int:
        return (params.k or num_modes) + (1 if params.router == "head" else 0)

    @classmethod
    def check_scenario(cls, params: PriorIFCAParams, scenario) -> list[tuple[str, str]]:
        problems = []
        shifted = params.prior_phase_shift != 0 or params.prior_period_scale != 1.0
        if params.prior == "scenario" and scenario.shift.schedule not in PERIODIC and shifted:
            problems.append(("strategy.prior", f"prior_phase_shift / prior_period_scale shift a periodic prior, and "
                                               f"the scenario's schedule is {scenario.shift.schedule!r}; set "
                                               f"strategy.prior to one of {list(PERIODIC)}"))
        if params.k is not None and params.k != len(scenario.mode_names) and params.prior != "none":
            problems.append(("strategy.k", f"is {params.k} but the scenario has {len(scenario.mode_names)} modes; the "
                                           "prior ties branch k to mode k, so k must equal the number of modes "
                                           "(or set strategy.prior=none)"))
        return problems

    @property
    def clusters(self) -> int:
        return self.params.k or len(self.setup.mode_names)

    def configure_train(self, server_round: int, cohort: Sequence[ClientSpec]) -> list[ClientInstruction]:
        logp = log_prior(self.prior, server_round, self.clusters, self.params.prior_floor)
        config = {f"{LOG_PRIOR}{k}": float(v) for k, v in enumerate(logp)} | {"prior_ifca.k": self.clusters}
        return [ClientInstruction(c.cid, self.opt.arrays, dict(config)) for c in cohort]

    def initialize(self, model) -> None:
        super().initialize(model)
        self.input_sums: dict[str, torch.Tensor] = {}  # router: inputs; sum, sumsq [K, C, D], count [K, C]

    def aggregate_train(self, server_round: int, replies: Sequence[ClientReply]) -> dict[str, float]:
        self.apply_updates(replies)
        if self.params.router == "inputs" and replies:
            for key in INPUT_STATS:
                new = torch.stack([r.stats[f"{STATS}{key}"].double() for r in replies]).sum(0)
                old = self.input_sums.get(key)
                self.input_sums[key] = new if old is None else self.params.router_decay * old + new
        return self.round_metrics(replies)

    def state_dict(self) -> dict:
        return super().state_dict() | {"input_sums": self.input_sums}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.input_sums = state.get("input_sums", {})

    def input_scores(self, x: torch.Tensor) -> torch.Tensor:
        """[B, K]: log p(x | branch k) up to a shared constant, where branch k's inputs are a mixture over the labels
        y of diagonal Gaussians N(mean_ky, var) weighted by the label shares n_ky / n_k, with the per-coordinate
        variance pooled over all (k, y); a branch nobody chose scores -inf, and all score 0 before the first
        round."""
        k = self.clusters
        if not self.input_sums:
            return torch.zeros(len(x), k, dtype=torch.float64)
        n, total, sq = self.input_sums["count"], self.input_sums["sum"], self.input_sums["sumsq"]  # [K,C], [K,C,D]
        mean = total / n.clamp(min=1e-12)[..., None]
        var = (sq - total * mean).sum((0, 1)) / n.sum().clamp(min=1e-12)
        var = var.clamp(min=0) + 1e-2 * float(var.clamp(min=0).mean()) + 1e-8
        flat = x.reshape(len(x), -1).double().cpu()
        w = 1.0 / var
        # -0.5 sum_d (x_d - m_d)^2 / var_d, expanded so that no [B, K, C, D] tensor is built
        loglik = -0.5 * ((flat ** 2) @ w)[:, None, None] + torch.einsum("bd,kcd->bkc", flat * w, mean) \
            - 0.5 * ((mean ** 2) * w).sum(2)[None]
        share = n / n.sum(1, keepdim=True).clamp(min=1e-12)
        score = torch.logsumexp(loglik + torch.log(share.clamp(min=1e-300))[None], dim=2)
        return torch.where(n.sum(1)[None] > 0, score, torch.full_like(score, -torch.inf))

    def evaluate(self, test_sets, batch_size: int) -> dict[str, float]:
        k = self.clusters
        route = self.params.router

        def from_inputs(output, labels, mode):
            logits = output.logits
            if route == "inputs":  # the wrapper below hands the inputs over as the features
                score = self.input_scores(output.features)
            elif route == "head":
                score = logits[:, k, :k].reshape(len(labels), k, -1).mean(2).log_softmax(1)
            elif route == "confidence":  # log of each head's largest probability
                score = logits[:, :k].log_softmax(2).amax(2).reshape(len(labels), k, -1).sum(2)
            else:  # energy: log sum_y exp(logit_ky), the head's unnormalised log-density of the input
                score = logits[:, :k].logsumexp(2).reshape(len(labels), k, -1).sum(2)
            return Routing(score.argmax(1), score.double())

        if route != "inputs":
            return self.evaluate_route(from_inputs, test_sets, batch_size)
        model = WithInputs(self.global_model())
        return self.evaluate_route(from_inputs, test_sets, batch_size, model_of_mode=lambda mode: model)

    def client_update(self, job: ClientJob) -> ClientResult:
        p = self.params
        k = int(job.config["prior_ifca.k"])
        log_p = torch.tensor([float(job.config[f"{LOG_PRIOR}{j}"]) for j in range(k)])
        branch = choose_branch(local_head_losses(job.model, job.data).cpu()[:k], log_p, p.prior_weight)
        heads = [branch, k] if p.router == "head" else [branch]
        names = job.model.parameter_names(heads)
        # the router learns only as much as the round's expected cohort is mixed (1 when uniform, 0 when pure):
        # a one-mode cohort teaches it nothing about telling the modes apart, only to say this mode
        mixed = float((1.0 - log_p.exp().square().sum()) / (1.0 - 1.0 / k))
        task = (TrainTask(branch=branch, loss_fn=router_loss(branch, k, p.router_w * mixed, log_p), trainable=names)
                if p.router == "head" else TrainTask(branch=branch, trainable=names))
        stats = {}
        if p.router == "inputs":  # the sums of the client's inputs, on its branch's row (before training: no cost)
            stats = input_sums(job.data, branch, k, job.model.heads[0].out_features)
        metrics = job.train(task)
        return ClientResult(job.trained_arrays(names), num_examples=len(job.data),
                            metrics=metrics | {"branch": float(branch)}, stats=stats)


def input_sums(data, branch: int, k: int, classes: int) -> dict[str, torch.Tensor]:
    """A client's input sums per label on its branch's row: sum [K, C, D], sumsq [K, C, D], count [K, C]
    (unlabelled examples are left out)."""
    flat = data.x.reshape(len(data), -1).double().cpu()
    y = data.y.reshape(len(data), -1)[:, 0].cpu()
    keep = y != UNLABELLED
    onehot = F.one_hot(y[keep], classes).double()  # [N, C]
    flat = flat[keep]
    sums = {"sum": onehot.T @ flat, "sumsq": onehot.T @ flat ** 2, "count": onehot.sum(0)}
    out = {}
    for key, v in sums.items():
        rows = torch.zeros(k, *v.shape, dtype=torch.float64)
        rows[branch] = v
        out[f"{STATS}{key}"] = rows
    return out


class WithInputs(torch.nn.Module):
    """The network with its inputs (flattened) in place of its features, for the ``inputs`` router."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    @property
    def num_branches(self) -> int:
        return self.net.num_branches

    def forward(self, x: torch.Tensor):
        return ModelOutput(self.net(x).logits, x.reshape(len(x), -1))
