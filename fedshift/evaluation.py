"""Centralized evaluation of the global model on each mode's test set and on all of them together.

Every mode's test set is cut into groups of up to ``eval.batch_size`` examples, in order. A single-branch
strategy scores every example with branch 0 and reports ``eval/<mode>/accuracy`` and ``eval/<mode>/loss``.

A multi-branch strategy routes examples to branches. Besides the branch of each example, a route names one
branch for each whole group, and that is the paper's protocol (the reference code's "virtual client" per
mode: each group majority-votes one branch). Reported per mode and for ``all``:

- ``accuracy``, ``loss``: every example of a group scored by the group's branch (the paper's protocol);
- ``accuracy_per_example``: every example scored by its own branch;
- ``branch_accuracy``, ``branch_accuracy_per_example``: share of examples sent to the branch that belongs
  to their mode (branch k <-> mode k, the k-th mode of the scenario).

Accuracy and loss count labelled targets (label -1 is skipped), so sequence models (logits [B, K, C, T],
labels [B, T]) are scored per token; task-specific exclusions such as OOV tokens are not made here.

The evaluation settings (``eval``, docs/evaluation.md) change this pass in three ways:

- ``eval.adapt``: each mode's test set is a stream adapted from the global model afresh (fedshift/adapt.py),
  batch by batch in order; the global model never changes. The metrics above are then the adapted ones.
- ``eval.select: maxlogit``: every example chooses the branch with the largest max logit (mean over the
  tokens of a sequence) and each group majority-votes, in place of the strategy's own route.
- ``eval.ood``: for branch k (mode k's branch; branch 0 alone for a one-branch model), scores that separate
  mode k's test examples (in-mode) from the other modes' (out-of-mode), computed on the outputs of this
  same pass: ``msp`` (max softmax) and ``maxlogit`` of branch k, reported as ``eval/branch<k>/<score>_auroc``
  (in-mode positive; ties count one half) and ``eval/branch<k>/<score>_fpr95`` (the share of in-mode
  examples flagged when the threshold flags 95% of the out-of-mode ones: out-of-mode positive, as in
  the anomaly-detection literature).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .adapt import Scored, build_adaptation
from .config import EvalConfig, Scenario
from .data.federation import UNLABELLED
from .errors import FedshiftError
from .models import ModelOutput, MultiBranchNet

BranchSelector = Callable[[ModelOutput], "torch.Tensor | None"]
# (output of one group, its labels, its mode index) -> (branch of each example [B], branch of the group),
# or None for branch 0 everywhere (a single-branch model)
Route = Callable[[ModelOutput, torch.Tensor, int], "tuple[torch.Tensor, int] | None"]


def majority_vote(branches: torch.Tensor, num_branches: int) -> int:
    """The branch most examples chose. Ties go to the highest branch index, as in the reference code, where
    branch 0 wins only on a strict majority over branch 1."""
    counts = torch.bincount(branches.flatten().long(), minlength=num_branches)
    return int(num_branches - 1 - torch.argmax(counts.flip(0)))


def vote_route(select_branches: BranchSelector) -> Route:
    """The paper's protocol: per-example branches from ``select_branches``, each group majority-votes."""

    def route(output: ModelOutput, labels: torch.Tensor, mode: int):
        branches = select_branches(output)
        if branches is None:
            return None
        return branches, majority_vote(branches, output.logits.shape[1])

    return route


def per_example(scores: torch.Tensor) -> torch.Tensor:
    """[B, K, ...] -> [B, K]: the mean over the tokens of a sequence (nothing to average otherwise)."""
    return scores.reshape(scores.shape[0], scores.shape[1], -1).mean(2)


def max_logit_branches(output: ModelOutput) -> torch.Tensor:
    """The branch with the largest max logit, for each example (``eval.select: maxlogit``)."""
    return per_example(output.logits.amax(2)).argmax(1)


OOD_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "msp": lambda logits: per_example(logits.softmax(2).amax(2)),
    "maxlogit": lambda logits: per_example(logits.amax(2)),
}


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a positive scores above a negative, ties counting one half (the Mann-Whitney U
    statistic over n_pos * n_neg, from average ranks): the exact area under the ROC curve."""
    scores = torch.cat([positive, negative]).double()
    ordered, order = scores.sort()
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # 1-based ranks ends - counts + 1 .. ends, averaged
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[group]
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fpr95(inliers: torch.Tensor, outliers: torch.Tensor) -> float:
    """Share of inliers flagged when a low score flags outliers and the threshold is the lowest that flags at
    least 95% of them (the ceil(0.95 n)-th lowest outlier score; scores equal to the threshold are flagged)."""
    k = -(-95 * len(outliers) // 100)  # ceil(0.95 n) in integers
    threshold = outliers.double().kthvalue(k).values
    return float((inliers.double() <= threshold).double().mean())


def ood_metrics(scores: list[dict[str, torch.Tensor] | None], names: list[str]) -> dict[str, float]:
    """``eval/branch<k>/<score>_auroc`` and ``_fpr95``: mode k's examples against the other modes', scored by
    branch k. ``scores[m][name]`` is [N_m, K] for mode m (None: mode m has no test examples). Branches
    without a mode, and a branch with no example on either side, report nothing."""
    present = [s for s in scores if s is not None]
    if not present or not names:
        return {}
    out: dict[str, float] = {}
    for k in range(min(present[0][names[0]].shape[1], len(scores))):
        if scores[k] is None or len(present) < 2:
            continue
        for name in names:
            inside = scores[k][name][:, k]
            outside = torch.cat([s[name][:, k] for m, s in enumerate(scores) if m != k and s is not None])
            out[f"eval/branch{k}/{name}_auroc"] = auroc(inside, outside)
            out[f"eval/branch{k}/{name}_fpr95"] = fpr95(inside, outside)
    return out


def check_scenario(s: Scenario) -> list[tuple[str, str]]:
    """``(key, message)`` problems of the evaluation settings, once the strategy and branches are resolved."""
    from fedshift.strategies import STRATEGIES

    problems = []
    if s.eval.select == "maxlogit" and s.model.branches == 1:
        problems.append(("eval.select", f"maxlogit chooses among branches and strategy {s.strategy.name!r} evaluates "
                                        "a one-branch model; use a multi-branch strategy or eval.select: strategy"))
    try:
        strategy = STRATEGIES.get(s.strategy.name)
    except (KeyError, FedshiftError):  # already reported as strategy.name
        strategy = None
    if s.eval.ood and strategy is not None and strategy.one_model_per_mode:
        problems.append(("eval.ood", f"strategy {s.strategy.name!r} evaluates each mode with its own model, so no "
                                     "model sees both in-mode and out-of-mode examples; remove eval.ood"))
    return problems


@torch.no_grad()
def evaluate_modes(model: MultiBranchNet, test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   select_branches: BranchSelector, batch_size: int,
                   settings: EvalConfig | None = None) -> dict[str, float]:
    """Evaluate one model, each example routed by ``select_branches`` (branch 0 when it returns None)
    and each group by the majority vote of its examples."""
    return evaluate_routed(lambda mode: model, test_sets, vote_route(select_branches), batch_size, settings)


def _detached(output: ModelOutput) -> ModelOutput:
    return ModelOutput(output.logits.detach(), output.features.detach())


def _group_logits(output: ModelOutput, choice: tuple[torch.Tensor, int] | None) -> torch.Tensor:
    """The logits every example of a group is scored with: the group's branch (branch 0 when unrouted)."""
    return output.logits[:, 0 if choice is None else choice[1]]


def _scored_by(route: Route, labels: torch.Tensor, mode: int) -> Scored:
    return lambda output: _group_logits(output, route(_detached(output), labels, mode))


@torch.no_grad()
def evaluate_routed(model_of_mode: Callable[[int], MultiBranchNet],
                    test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]], route: Route,
                    batch_size: int, settings: EvalConfig | None = None) -> dict[str, float]:
    """Evaluate mode k's test set (k-th of ``test_sets``) with ``model_of_mode(k)`` and ``route``, under the
    evaluation ``settings`` (None: the defaults, i.e. no adaptation, the strategy's route, no OOD scores)."""
    settings = settings or EvalConfig()
    if settings.select == "maxlogit":
        route = vote_route(max_logit_branches)
    adaptation = build_adaptation(settings.adapt)
    out: dict[str, float] = {}
    keys = ("correct", "loss", "n", "correct_example", "branch", "branch_example", "examples")
    total = dict.fromkeys(keys, 0.0)
    routed_any = False
    ood: list[dict[str, torch.Tensor] | None] = []
    for k, (mode, (x, y)) in enumerate(test_sets.items()):
        model = model_of_mode(k)
        was_training = model.training
        model.eval()
        stream = adaptation.stream(model)
        sums = dict.fromkeys(keys, 0.0)
        routed = False
        scores: dict[str, list[torch.Tensor]] = {name: [] for name in settings.ood}
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            output = stream.predict(xb, _scored_by(route, yb, k))
            if settings.select == "maxlogit" and output.logits.shape[1] == 1:
                raise ValueError("eval.select: maxlogit needs a multi-branch model; this one has one branch")
            idx = torch.arange(len(yb), device=yb.device)
            labelled = yb != UNLABELLED
            choice = route(output, yb, k)
            if choice is not None:
                routed = True
                per_example_branch = choice[0].to(yb.device)
                hit = output.logits[idx, per_example_branch].argmax(1) == yb
                sums["correct_example"] += float((hit & labelled).sum())
                sums["branch_example"] += float((per_example_branch == k).sum())
                sums["branch"] += float(len(yb)) if choice[1] == k else 0.0
            logits = _group_logits(output, choice)
            sums["correct"] += float(((logits.argmax(1) == yb) & labelled).sum())
            sums["loss"] += float(F.cross_entropy(logits, yb, reduction="sum", ignore_index=UNLABELLED))
            sums["n"] += float(labelled.sum())
            sums["examples"] += len(yb)
            for name in settings.ood:
                scores[name].append(OOD_SCORES[name](output.logits).cpu())
        model.train(was_training)
        _write(out, mode, sums, routed)
        routed_any = routed_any or routed
        total = {key: total[key] + sums[key] for key in keys}
        ood.append({name: torch.cat(parts) for name, parts in scores.items()} if len(y) else None)
    _write(out, "all", total, routed_any)
    out.update(ood_metrics(ood, list(settings.ood)))
    return out


def _write(out: dict[str, float], name: str, sums: dict[str, float], routed: bool) -> None:
    n, examples = max(sums["n"], 1), max(sums["examples"], 1)
    out[f"eval/{name}/accuracy"] = sums["correct"] / n
    out[f"eval/{name}/loss"] = sums["loss"] / n
    if routed:
        out[f"eval/{name}/accuracy_per_example"] = sums["correct_example"] / n
        out[f"eval/{name}/branch_accuracy"] = sums["branch"] / examples
        out[f"eval/{name}/branch_accuracy_per_example"] = sums["branch_example"] / examples
