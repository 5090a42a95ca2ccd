"""Centralized evaluation of the global model on each mode's test set and on all of them together."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .models import ModelOutput, MultiBranchNet

BranchSelector = Callable[[ModelOutput], "torch.Tensor | None"]


@torch.no_grad()
def evaluate_modes(model: MultiBranchNet, test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   select_branches: BranchSelector, batch_size: int) -> dict[str, float]:
    """``eval/<mode>/accuracy`` and ``eval/<mode>/loss`` per mode, and ``eval/all/*`` over every example.

    Each example is scored by the branch that ``select_branches`` picks for it (branch 0 when it returns None).
    """
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    total_correct, total_loss, total_n = 0.0, 0.0, 0
    for mode, (x, y) in test_sets.items():
        correct, loss_sum = 0.0, 0.0
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            output = model(xb)
            branch = select_branches(output)
            idx = torch.arange(len(yb), device=yb.device)
            logits = output.logits[idx, branch if branch is not None else 0]
            correct += float((logits.argmax(1) == yb).sum())
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        n = len(y)
        out[f"eval/{mode}/accuracy"] = correct / max(n, 1)
        out[f"eval/{mode}/loss"] = loss_sum / max(n, 1)
        total_correct, total_loss, total_n = total_correct + correct, total_loss + loss_sum, total_n + n
    out["eval/all/accuracy"] = total_correct / max(total_n, 1)
    out["eval/all/loss"] = total_loss / max(total_n, 1)
    model.train(was_training)
    return out
