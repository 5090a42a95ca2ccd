"""GPM: continual learning across the day/night swing by projecting updates away from old tasks' inputs."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams
from fedshift.core.tensors import eval_mode

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext

BASIS, REPRESENTATION, TASK = "gpm.basis.", "gpm.rep.", "gpm.task"


def covered_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The layers whose updates GPM projects: linear layers and ungrouped, zero-padded convolutions."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
                                        and not isinstance(m.padding, str)):
            yield name, m


def layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input vectors as rows: features for a linear layer, im2col patches for a convolution,
    with a constant 1 appended when the layer has a bias (W x + b = [W b] [x; 1])."""
    if isinstance(module, nn.Conv2d):
        rows = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
        rows = rows.reshape(-1, rows.shape[-1])
    else:
        rows = x.reshape(-1, module.in_features)
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(len(rows), 1)], 1)
    return rows


def representation(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per covered layer, R R^T of its input vectors R on the examples x (eval mode, no gradient). Sums over
    examples, so the matrices of several clients add up to that of their pooled examples."""
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in covered_layers(model):
        def hook(m, inputs, _output, name=name):
            rows = layer_input_rows(m, inputs[0]).double()
            out[name] = rows.T @ rows
        hooks.append(module.register_forward_hook(hook))
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def extend_basis(corr: torch.Tensor, basis: torch.Tensor | None, threshold: float) -> torch.Tensor | None:
    """GPM's memory update (Saha et al., Eq. 9) from corr = R R^T: add the leading eigenvectors of the part of
    corr outside span(basis) until the captured energy (sum of squared singular values of R within the new
    span over the total) reaches ``threshold``; the first basis keeps the smallest k that reaches it."""
    corr = corr.double()
    total = torch.trace(corr)
    if total <= 0:
        return basis
    if basis is not None:
        basis = basis.double()
        projector = torch.eye(len(corr), dtype=corr.dtype, device=corr.device) - basis @ basis.T
        corr = projector @ corr @ projector
    values, vectors = torch.linalg.eigh((corr + corr.T) / 2)
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    captured = (total - torch.trace(corr)) / total
    # only directions with energy: eigenvectors of zero eigenvalues may lie inside span(basis)
    usable = int((values > 1e-12 * total).sum())
    r = 0
    while r < usable and captured < threshold:
        captured = captured + values[r] / total
        r += 1
    if r == 0:
        return basis
    new = vectors[:, :r]
    return new if basis is None else torch.cat([basis, new], 1)


def project_gradient_(module: nn.Module, basis: torch.Tensor) -> None:
    """g <- g - g M M^T on the layer's [weight | bias] gradient, reshaped to out x (inputs (+1))."""
    w = module.weight
    if w.grad is None:
        return
    g = w.grad.reshape(len(w), -1)
    if module.bias is not None and module.bias.grad is not None:
        g = torch.cat([g, module.bias.grad[:, None]], 1)
    elif module.bias is not None:
        g = torch.cat([g, g.new_zeros(len(g), 1)], 1)
    m = basis.to(g.dtype)
    g = g - (g @ m) @ m.T
    w.grad = g[:, :w[0].numel()].reshape_as(w).contiguous()
    if module.bias is not None and module.bias.grad is not None:
        module.bias.grad = g[:, -1].contiguous()


class GPMParams(ComponentParams):
    threshold: float = Field(0.97, gt=0, le=1, description="energy threshold of the first task")
    threshold_step: float = Field(0.003, ge=0, description="threshold increase per task (capped at 1)")
    samples: int = Field(125, ge=1, description="examples per client for the layer representations")
    switch_share: float = Field(0.5, ge=0, lt=1, description="share a new dominant mode needs to start a task")


@CLIENT_STRATEGIES.register
class GPM(ClientTrainer):
    """GPM: project updates away from the input subspaces of past tasks (tasks = dominant-mode stretches).

    Saha, Garg, Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021; federated with a global
    memory and task boundaries where the server's schedule switches the dominant mode.

    Tasks: the server (``aggregate_stats``) takes the mode holding most of each round's training examples as
    the round's dominant mode; when it changes (with more than ``switch_share`` of the examples) the task
    ends. Clients learn the task id and the memory only from the broadcast (``ctx.server``), one round late:
    the first round of a new task still trains under the old memory (a pre-round server hook would remove
    the lag). Memory: every client sends R R^T of its layers' inputs on ``samples`` of its examples after
    local training (the model it sends); the server sums them per round; at a task boundary it extends each
    layer's basis M_l from the previous round's sum (the task's last round) with threshold
    min(threshold + threshold_step * task, 1), and broadcasts the bases every round. All clients project
    against the same M_l, so the average of their updates stays orthogonal to it (exactly so for plain SGD
    without momentum or weight decay, the reference's optimizer).
    Training: each weight's gradient (with its bias as an extra input column) is projected,
    g <- g - g M M^T; once a memory exists, parameters outside the covered layers (normalisation affines)
    get no update, as the reference zeroes 1-D parameters after the first task. Covered layers: Linear and
    Conv2d (groups 1, zero padding), heads included (a single shared head, not the reference's per-task heads).

    Domains: none needed; works on any client. Communication: up to (in+1)^2 floats per layer per client
    (uplink) and the bases (downlink), as for CORAL's moments.

    Parameters:
        threshold (0.97): energy threshold eps for the first task (reference, split CIFAR-100).
        threshold_step (0.003): added per task (reference, split CIFAR-100), capped at 1.
        samples (125): examples per client for the representation (reference: 125).
        switch_share (0.5): a new dominant mode starts a task only with more than this share of a round's
            examples (above 0.5 adds hysteresis against cohort noise near q = 0.5).
    """

    name = "gpm"
    Params = GPMParams

    def __init__(self, params, settings):
        super().__init__(params, settings)
        # server side: task count, current dominant mode, bases, the last round's representations
        self._task, self._mode = 0, None
        self._bases: dict[str, torch.Tensor] = {}
        self._last: dict[str, torch.Tensor] = {}

    def train(self, ctx: TrainContext) -> dict[str, float]:
        self._covered = [(m, ctx.server.get(BASIS + name)) for name, m in covered_layers(ctx.model)]
        projected = {id(p) for m, basis in self._covered if basis is not None for p in m.parameters(recurse=False)}
        memory = any(basis is not None for _, basis in self._covered)
        self._frozen = [p for p in ctx.trainable_parameters() if memory and id(p) not in projected]
        metrics = super().train(ctx)
        idx = torch.randperm(len(ctx.data), generator=ctx.generator)[:self.params.samples].to(ctx.data.x.device)
        ctx.stats.update({REPRESENTATION + k: v for k, v in representation(ctx.model, ctx.data.x[idx]).items()})
        return metrics | ({"gpm.task": float(ctx.server[TASK])} if TASK in ctx.server else {})

    def update(self, batch: Batch, ctx: TrainContext):
        loss = ctx.loss(ctx.model(batch.x), batch)
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for module, basis in self._covered:
            if basis is not None:
                project_gradient_(module, basis)
        for p in self._frozen:
            p.grad = None
        ctx.optimizer.step()
        return {"loss": loss}

    def aggregate_stats(self, server_round, stats):
        if stats:
            examples: dict[int, int] = {}
            reps: dict[str, torch.Tensor] = {}
            for n, mode, client in stats:
                examples[mode] = examples.get(mode, 0) + n
                for key, value in client.items():
                    if key.startswith(REPRESENTATION):
                        name = key[len(REPRESENTATION):]
                        reps[name] = reps[name] + value.double() if name in reps else value.double()
            dominant = max(sorted(examples), key=lambda m: examples[m])
            share = examples[dominant] / max(sum(examples.values()), 1)
            if self._mode is None:
                self._mode = dominant
            elif dominant != self._mode and share > self.params.switch_share:
                threshold = min(self.params.threshold + self.params.threshold_step * self._task, 1.0)
                for name, corr in self._last.items():
                    basis = extend_basis(corr, self._bases.get(name), threshold)
                    if basis is not None:
                        self._bases[name] = basis
                self._task, self._mode = self._task + 1, dominant
            self._last = reps
        return {TASK: torch.tensor(float(self._task)), **{BASIS + k: v.float() for k, v in self._bases.items()}}
