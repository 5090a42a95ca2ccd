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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .data.federation import UNLABELLED
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


@torch.no_grad()
def evaluate_modes(model: MultiBranchNet, test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   select_branches: BranchSelector, batch_size: int) -> dict[str, float]:
    """Evaluate one model, each example routed by ``select_branches`` (branch 0 when it returns None)
    and each group by the majority vote of its examples."""
    return evaluate_routed(lambda mode: model, test_sets, vote_route(select_branches), batch_size)


@torch.no_grad()
def evaluate_routed(model_of_mode: Callable[[int], MultiBranchNet],
                    test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]], route: Route,
                    batch_size: int) -> dict[str, float]:
    """Evaluate mode k's test set (k-th of ``test_sets``) with ``model_of_mode(k)`` and ``route``."""
    out: dict[str, float] = {}
    keys = ("correct", "loss", "n", "correct_example", "branch", "branch_example", "examples")
    total = dict.fromkeys(keys, 0.0)
    routed_any = False
    for k, (mode, (x, y)) in enumerate(test_sets.items()):
        model = model_of_mode(k)
        was_training = model.training
        model.eval()
        sums = dict.fromkeys(keys, 0.0)
        routed = False
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            output = model(xb)
            idx = torch.arange(len(yb), device=yb.device)
            labelled = yb != UNLABELLED
            choice = route(output, yb, k)
            if choice is None:
                branch = torch.zeros(len(yb), dtype=torch.long, device=yb.device)
            else:
                routed = True
                per_example, group = choice
                per_example = per_example.to(yb.device)
                hit = output.logits[idx, per_example].argmax(1) == yb
                sums["correct_example"] += float((hit & labelled).sum())
                sums["branch_example"] += float((per_example == k).sum())
                sums["branch"] += float(len(yb)) if group == k else 0.0
                branch = torch.full((len(yb),), group, dtype=torch.long, device=yb.device)
            logits = output.logits[idx, branch]
            sums["correct"] += float(((logits.argmax(1) == yb) & labelled).sum())
            sums["loss"] += float(F.cross_entropy(logits, yb, reduction="sum", ignore_index=UNLABELLED))
            sums["n"] += float(labelled.sum())
            sums["examples"] += len(yb)
        model.train(was_training)
        _write(out, mode, sums, routed)
        routed_any = routed_any or routed
        total = {key: total[key] + sums[key] for key in keys}
    _write(out, "all", total, routed_any)
    return out


def _write(out: dict[str, float], name: str, sums: dict[str, float], routed: bool) -> None:
    n, examples = max(sums["n"], 1), max(sums["examples"], 1)
    out[f"eval/{name}/accuracy"] = sums["correct"] / n
    out[f"eval/{name}/loss"] = sums["loss"] / n
    if routed:
        out[f"eval/{name}/accuracy_per_example"] = sums["correct_example"] / n
        out[f"eval/{name}/branch_accuracy"] = sums["branch"] / examples
        out[f"eval/{name}/branch_accuracy_per_example"] = sums["branch_example"] / examples
