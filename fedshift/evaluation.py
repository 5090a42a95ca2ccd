"""Centralized evaluation of the global model on each mode's test set and on all of them together.

Each mode's test set goes through the model in batches of ``eval.batch_size``. A single-branch strategy scores
every example with branch 0 and reports ``eval/<mode>/accuracy`` and ``eval/<mode>/loss``.

A multi-branch strategy routes: its ``Route`` gives every example a branch chosen from that example's output
(``Routing.branch``) and a score row that a group of examples sums to choose one branch together
(``Routing.score``; the majority vote is one-hot rows). Three protocols turn that into accuracies, all computed
from the same forward pass (docs/evaluation.md has the figures that motivate them):

- **test-client vote** (the deployment protocol; ``accuracy`` and ``loss``): each mode's test split is cut, in
  order, into test clients whose sizes follow the sizes of that mode's training clients (``eval.client_size``:
  ``train``; or a fixed size). Each test client picks one branch from its own inputs, without labels, as a
  device would, and all its examples are scored with it.
- **per-example routing** (``accuracy_per_example``, ``loss_per_example``): every example uses its own branch.
- **the reference's protocol** (``accuracy_reference``, ``loss_reference``): all modes' test examples are mixed in
  a fixed random order and cut into batches of ``eval.reference_batch`` (64, as the FedTKM authors' code); each
  mode's part of a batch votes, as the reference's ``batch_majority_voting`` does. For parity with the paper.

Routing quality, for each protocol (``branch_accuracy``: test-client vote; ``_per_example``; ``_reference``):

- labelled: the share of a mode's examples sent to the branch with the mode's index (branch k <-> mode k);
- permutation-free (``branch_accuracy_matched``, ``branch_accuracy_per_example_matched``): the same under the best
  one-to-one matching of branches to modes, found over all modes together, so a strategy that separates the
  modes under another labelling (IFCA) shows it.

Accuracy and loss count labelled targets (label -1 is skipped), so sequence models (logits [B, K, C, T],
labels [B, T]) are scored per token; task-specific exclusions such as OOV tokens are not made here.

The evaluation settings (``eval``, docs/evaluation.md) change this pass in three more ways:

- ``eval.adapt``: each mode's test set is a stream adapted from the global model afresh (fedshift/adapt.py),
  batch by batch in order; the global model never changes. The metrics above are then the adapted ones; an
  adaptation that learns from the predictions learns from each batch's majority branch.
- ``eval.select: maxlogit``: every example chooses the branch with the largest max logit (mean over the
  tokens of a sequence) and groups majority-vote, in place of the strategy's own route.
- ``eval.ood``: for branch k (mode k's branch; branch 0 alone for a one-branch model), scores that separate
  mode k's test examples (in-mode) from the other modes' (out-of-mode), computed on the outputs of this
  same pass: ``msp`` (max softmax) and ``maxlogit`` of branch k, reported as ``eval/branch<k>/<score>_auroc``
  (in-mode positive; ties count one half) and ``eval/branch<k>/<score>_fpr95`` (the share of in-mode
  examples flagged when the threshold flags 95% of the out-of-mode ones: out-of-mode positive, as in
  the anomaly-detection literature).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedshift.core.errors import FedshiftError
from fedshift.nets.models import ModelOutput, MultiBranchNet
from fedshift.schema import EvalConfig

from .adapt import Scored, build_adaptation
from .core.seeding import Stream, rng_of
from .core.tensors import UNLABELLED

BranchSelector = Callable[[ModelOutput], "torch.Tensor | None"]


@dataclass
class Routing:
    """How a batch of test examples chooses branches: ``branch`` [B] is each example's own branch; a group of
    examples chooses the branch whose summed ``score`` [B, K] is highest (ties go to the highest index)."""

    branch: torch.Tensor
    score: torch.Tensor


# (output of a batch, its labels, its mode index) -> its Routing, or None for branch 0 everywhere (one branch).
# A route that reads the labels or the mode uses knowledge a deployed device does not have: say so in its docs.
Route = Callable[[ModelOutput, torch.Tensor, int], "Routing | None"]


def group_choice(score_sums: torch.Tensor) -> torch.Tensor:
    """[G, K] summed scores -> [G] the highest of each row, ties to the highest index (the reference's rule:
    branch 0 wins a two-way vote only on a strict majority)."""
    k = score_sums.shape[1]
    return k - 1 - torch.argmax(score_sums.flip(1), dim=1)


def majority_vote(branches: torch.Tensor, num_branches: int) -> int:
    """The branch most examples chose. Ties go to the highest branch index, as in the reference code, where
    branch 0 wins only on a strict majority over branch 1."""
    counts = torch.bincount(branches.flatten().long(), minlength=num_branches)
    return int(group_choice(counts[None].double())[0])


def votes(branches: torch.Tensor, num_branches: int) -> Routing:
    """Each example votes for its own branch (one-hot scores): groups majority-vote."""
    branches = branches.long()
    return Routing(branches, F.one_hot(branches, num_branches).double())


def vote_route(select_branches: BranchSelector) -> Route:
    """Per-example branches from ``select_branches`` (its inputs only), groups majority-vote."""

    def route(output: ModelOutput, labels: torch.Tensor, mode: int):
        branches = select_branches(output)
        if branches is None:
            return None
        return votes(branches, output.logits.shape[1])

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
# what ``fedshift list`` says of the evaluation options (the schema's eval.ood and eval.select take these names)
OOD_SCORE_DOCS = {"msp": "each branch's maximum softmax probability (Hendrycks & Gimpel, ICLR 2017)",
                  "maxlogit": "each branch's maximum logit (Hendrycks et al., ICML 2022)"}
BRANCH_SELECTORS = {"strategy": "the server strategy's own rule (FedTKM: nearest scaled center; IFCA: most "
                                "confident head; one-branch strategies: branch 0)",
                    "maxlogit": "every example takes the branch with the largest max logit"}


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



@torch.no_grad()
def evaluate_modes(model: MultiBranchNet, test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   select_branches: BranchSelector, batch_size: int, settings: EvalConfig | None = None,
                   client_sizes: dict[str, Sequence[int]] | None = None, seed: int = 0) -> dict[str, float]:
    """Evaluate one model, each example routed by ``select_branches`` (branch 0 when it returns None) and each
    group by the majority vote of its examples."""
    return evaluate_routed(lambda mode: model, test_sets, vote_route(select_branches), batch_size, settings,
                           client_sizes, seed)


def _detached(output: ModelOutput) -> ModelOutput:
    return ModelOutput(output.logits.detach(), output.features.detach())


def _batch_logits(output: ModelOutput, routing: Routing | None) -> torch.Tensor:
    """The logits a test-time adaptation learns from: the batch's majority branch (branch 0 when unrouted)."""
    if routing is None:
        return output.logits[:, 0]
    return output.logits[:, int(group_choice(routing.score.sum(0, keepdim=True))[0])]


def _scored_by(route: Route, labels: torch.Tensor, mode: int) -> Scored:
    return lambda output: _batch_logits(output, route(_detached(output), labels, mode))


def split_test_clients(n: int, sizes: Sequence[int] | int, rng: np.random.Generator) -> np.ndarray:
    """Test-client id of each of a mode's ``n`` test examples, in order: consecutive runs whose lengths are the
    training clients' ``sizes`` in a random order (drawn again when they run out), or all ``sizes`` long when it
    is a number. The last test client takes what is left."""
    if isinstance(sizes, int):
        return np.arange(n) // sizes
    pool = np.asarray([int(v) for v in sizes if int(v) > 0])
    if len(pool) == 0:
        raise ValueError("no training client of this mode has examples, so test clients cannot follow their sizes; "
                         "set eval.client_size to a number")
    lengths: list[int] = []
    while sum(lengths) < n:
        lengths.extend(rng.permutation(pool).tolist())
    return np.repeat(np.arange(len(lengths)), lengths)[:n]


def reference_groups(counts: Sequence[int], batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The reference protocol's batch of every test example of every mode: all modes' examples in one fixed
    random order, cut into batches of ``batch``; a mode's examples of one batch form one group."""
    order = rng.permutation(int(sum(counts)))
    batch_of = np.empty(len(order), dtype=np.int64)
    batch_of[order] = np.arange(len(order)) // batch
    bounds = np.cumsum([0, *counts])
    return [batch_of[bounds[k]:bounds[k + 1]] for k in range(len(counts))]


@dataclass
class _ModeScores:
    """One mode's test examples after the forward pass: for every example and branch the labelled targets it
    gets right and its summed loss, its labelled targets, and its routing (None: unrouted)."""

    hits: torch.Tensor    # [N, K] float64
    loss: torch.Tensor    # [N, K] float64
    targets: torch.Tensor  # [N] float64
    branch: torch.Tensor | None  # [N] long
    score: torch.Tensor | None   # [N, K] float64

    def take(self, branch: torch.Tensor) -> tuple[float, float]:
        idx = torch.arange(len(branch))
        return float(self.hits[idx, branch].sum()), float(self.loss[idx, branch].sum())

    def grouped(self, groups: np.ndarray) -> torch.Tensor:
        """Each example's branch when the examples of a group choose together."""
        g = torch.from_numpy(np.asarray(groups, dtype=np.int64))
        sums = torch.zeros(int(g.max()) + 1 if len(g) else 0, self.score.shape[1], dtype=torch.float64)
        sums.index_add_(0, g, self.score)
        return group_choice(sums)[g]


def _per_branch(output: ModelOutput, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, K] labelled targets right and summed loss under each branch, and [B] labelled targets, on the model's
    device (the caller moves a mode's results to the CPU once: a copy per batch would wait on the GPU each time)."""
    logits = output.logits
    labelled = labels != UNLABELLED
    hits, losses = [], []
    for k in range(logits.shape[1]):
        lk = logits[:, k]
        hit = (lk.argmax(1) == labels) & labelled
        loss = F.cross_entropy(lk, labels, reduction="none", ignore_index=UNLABELLED)
        hits.append(hit.reshape(len(labels), -1).sum(1))
        losses.append(loss.reshape(len(labels), -1).sum(1))
    return (torch.stack(hits, 1).double(), torch.stack(losses, 1).double(),
            labelled.reshape(len(labels), -1).sum(1).double())


@torch.no_grad()
def evaluate_routed(model_of_mode: Callable[[int], MultiBranchNet],
                    test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]], route: Route,
                    batch_size: int, settings: EvalConfig | None = None,
                    client_sizes: dict[str, Sequence[int]] | None = None, seed: int = 0) -> dict[str, float]:
    """Evaluate mode k's test set (k-th of ``test_sets``) with ``model_of_mode(k)`` and ``route``, under the
    evaluation ``settings`` (None: the defaults). ``client_sizes`` (per mode, the training clients' sizes) sets the
    test clients' sizes when ``eval.client_size`` is ``train``; ``seed`` (the scenario's) fixes their order and the
    reference protocol's mixing."""
    settings = settings or EvalConfig()
    if settings.select == "maxlogit":
        route = vote_route(max_logit_branches)
    adaptation = build_adaptation(settings.adapt)
    modes: list[_ModeScores] = []
    ood: list[dict[str, torch.Tensor] | None] = []
    for k, (mode, (x, y)) in enumerate(test_sets.items()):
        model = model_of_mode(k)
        was_training = model.training
        model.eval()
        stream = adaptation.stream(model)
        parts: dict[str, list[torch.Tensor]] = {"hits": [], "loss": [], "targets": [], "branch": [], "score": []}
        scores: dict[str, list[torch.Tensor]] = {name: [] for name in settings.ood}
        routed = None
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            output = stream.predict(xb, _scored_by(route, yb, k))
            if settings.select == "maxlogit" and output.logits.shape[1] == 1:
                raise ValueError("eval.select: maxlogit needs a multi-branch model; this one has one branch")
            routing = route(output, yb, k)
            if routed is not None and routed != (routing is not None):
                raise FedshiftError("a route must route every batch or none (it returned None for some batches)")
            routed = routing is not None
            hits, loss, targets = _per_branch(output, yb)
            parts["hits"].append(hits)
            parts["loss"].append(loss)
            parts["targets"].append(targets)
            if routing is not None:
                parts["branch"].append(routing.branch.long())
                parts["score"].append(routing.score.double())
            for name in settings.ood:
                scores[name].append(OOD_SCORES[name](output.logits))
        model.train(was_training)
        n_branches = model.num_branches if hasattr(model, "num_branches") else 1
        empty = torch.zeros(0, n_branches, dtype=torch.float64)
        cat = (lambda key, blank: torch.cat(parts[key]).cpu() if parts[key] else blank)  # one copy per mode
        modes.append(_ModeScores(cat("hits", empty), cat("loss", empty), cat("targets", torch.zeros(0)).double(),
                                 cat("branch", torch.zeros(0, dtype=torch.long)) if routed else None,
                                 cat("score", empty) if routed else None))
        ood.append({name: torch.cat(parts_).cpu() for name, parts_ in scores.items()} if len(y) else None)
    out = _protocol_metrics(list(test_sets), modes, settings, client_sizes, seed)
    out.update(ood_metrics(ood, list(settings.ood)))
    return out


def _protocol_metrics(names: list[str], modes: list[_ModeScores], settings: EvalConfig,
                      client_sizes: dict[str, Sequence[int]] | None, seed: int) -> dict[str, float]:
    out: dict[str, float] = {}
    routed = any(m.branch is not None for m in modes)
    if not routed:
        zero = [torch.zeros(len(m.targets), dtype=torch.long) for m in modes]
        _write_accuracy(out, "", names, modes, zero)
        return out
    # every mode routed: the three protocols' branch of each example
    if settings.client_size == "train" and client_sizes is None:
        raise FedshiftError("eval.client_size is 'train' but the training clients' sizes were not given; pass "
                            "client_sizes or set eval.client_size to a number")
    per_example = [m.branch for m in modes]
    client_vote = []
    for k, (name, m) in enumerate(zip(names, modes)):
        sizes = settings.client_size if isinstance(settings.client_size, int) else client_sizes.get(name, [])
        rng = rng_of(seed, Stream.EVAL, k)
        client_vote.append(m.grouped(split_test_clients(len(m.targets), sizes, rng)) if len(m.targets)
                           else m.branch)
    ref_groups = reference_groups([len(m.targets) for m in modes], settings.reference_batch,
                                  rng_of(seed, Stream.EVAL, 1000))
    reference = [m.grouped(g) if len(g) else m.branch for m, g in zip(modes, ref_groups)]
    for suffix, branches in (("", client_vote), ("_per_example", per_example), ("_reference", reference)):
        _write_accuracy(out, suffix, names, modes, branches)
        _write_routing(out, suffix, names, modes, branches, matched=suffix != "_reference")
    return out


def _write_accuracy(out: dict[str, float], suffix: str, names: list[str], modes: list[_ModeScores],
                    branches: list[torch.Tensor]) -> None:
    total_hits = total_loss = total_targets = 0.0
    for name, m, b in zip(names, modes, branches):
        hits, loss = m.take(b) if len(b) else (0.0, 0.0)
        n = float(m.targets.sum())
        out[f"eval/{name}/accuracy{suffix}"] = hits / max(n, 1)
        out[f"eval/{name}/loss{suffix}"] = loss / max(n, 1)
        total_hits, total_loss, total_targets = total_hits + hits, total_loss + loss, total_targets + n
    out[f"eval/all/accuracy{suffix}"] = total_hits / max(total_targets, 1)
    out[f"eval/all/loss{suffix}"] = total_loss / max(total_targets, 1)


def best_matching(confusion: np.ndarray) -> np.ndarray:
    """The branch matched to each mode (row) by the one-to-one matching of modes to branches that keeps the
    most examples on their matched branch (-1 for a mode left without a branch when there are fewer branches)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-confusion)
    match = np.full(confusion.shape[0], -1)
    match[rows] = cols
    return match


def _write_routing(out: dict[str, float], suffix: str, names: list[str], modes: list[_ModeScores],
                   branches: list[torch.Tensor], matched: bool) -> None:
    k_max = max(m.hits.shape[1] for m in modes)
    confusion = np.stack([np.bincount(b.numpy(), minlength=k_max) for b in branches]).astype(np.float64)
    sizes = confusion.sum(1)
    for k, name in enumerate(names):
        out[f"eval/{name}/branch_accuracy{suffix}"] = (confusion[k, k] if k < k_max else 0.0) / max(sizes[k], 1)
    diag = np.array([confusion[k, k] if k < k_max else 0.0 for k in range(len(names))])
    out[f"eval/all/branch_accuracy{suffix}"] = diag.sum() / max(sizes.sum(), 1)
    if matched:
        match = best_matching(confusion)
        got = np.array([confusion[k, match[k]] if match[k] >= 0 else 0.0 for k in range(len(names))])
        for k, name in enumerate(names):
            out[f"eval/{name}/branch_accuracy{suffix}_matched"] = got[k] / max(sizes[k], 1)
        out[f"eval/all/branch_accuracy{suffix}_matched"] = got.sum() / max(sizes.sum(), 1)
