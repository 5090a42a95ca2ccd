"""Test-time adaptation on each mode's test stream (``eval.adapt``): none, BN-Adapt, Tent.

Evaluation (fedshift/evaluation.py) starts one stream per mode from the global model: ``stream(model)``
returns an ``AdaptedStream`` that works on its own copy (the global model never changes), and the mode's
test batches go through its ``predict`` in order, so an online method carries what it learnt from one batch
to the next within a mode, never across modes.

- ``none``: the global model as it is.
- ``bn_adapt``: BN-Adapt (Schneider et al., "Improving robustness against common corruptions by covariate
  shift adaptation", NeurIPS 2020): every BatchNorm layer normalises with a mix of its source (running)
  statistics and the test batch's.
- ``tent``: Tent (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021):
  normalisation layers use the test batch's statistics and their affine parameters take gradient steps on
  the mean prediction entropy.

GroupNorm and LayerNorm normalise each example by its own statistics: there is nothing for BN-Adapt to
re-estimate, so ``bn_adapt`` on a model without BatchNorm is an error (``check_model``); Tent still applies,
updating their affine parameters (the reference handles BatchNorm2d only).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from fedshift.core.errors import ScenarioError
from fedshift.core.params import ComponentParams, ComponentRef, ComponentSpec
from fedshift.core.registry import Registry
from fedshift.nets.models import ModelOutput

ADAPTATIONS: Registry[type[TestTimeAdaptation]] = Registry("test-time adaptation")

# the logits a batch's predictions are scored with ([B, C] or [B, C, T]), given the model's output
Scored = Callable[[ModelOutput], torch.Tensor]
NORMALISATION = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, _InstanceNorm, nn.RMSNorm)


class AdaptedStream:
    """One mode's test stream: ``predict`` is called on its batches in order. The base class evaluates
    ``model`` unchanged (it is in eval mode; evaluation restores its mode afterwards)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def predict(self, x: torch.Tensor, scored: Scored) -> ModelOutput:
        """The outputs for batch ``x`` (without gradient). ``scored(output)`` says which logits the evaluation
        will score these predictions with (the group's branch), for methods that learn from them."""
        with torch.no_grad():
            return self.model(x)


class TestTimeAdaptation:
    """A registered test-time adaptation method: ``Params`` holds its options. Subclasses override
    ``stream`` (adapt a copy of the model, never the model) and, when they need something of the
    architecture, ``problem``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[ComponentParams]] = ComponentParams

    def __init__(self, params: ComponentParams):
        self.params = params

    def problem(self, model: nn.Module) -> str | None:
        """Why this method cannot apply to ``model``, or None."""
        return None

    def stream(self, model: nn.Module) -> AdaptedStream:
        """Start one mode's test stream from ``model`` (in eval mode), which must not change."""
        return AdaptedStream(model)


@ADAPTATIONS.register
class NoAdaptation(TestTimeAdaptation):
    """No test-time adaptation: the global model is evaluated as it is."""

    name = "none"


def build_adaptation(ref: ComponentRef) -> TestTimeAdaptation:
    """The adaptation an ``eval.adapt`` entry names (a name, or ``{name: ..., option: value}``)."""
    spec = ComponentSpec(name=ref) if isinstance(ref, str) else ref
    cls = ADAPTATIONS.get(spec.name)
    return cls(cls.Params.model_validate(spec.params()))


def check_model(ref: ComponentRef, model: nn.Module, architecture: str) -> list[tuple[str, str]]:
    """``(key, message)`` problems of applying ``eval.adapt`` to the scenario's model."""
    problem = build_adaptation(ref).problem(model)
    name = ref if isinstance(ref, str) else ref.name
    return [("eval.adapt", f"{name} does not apply to model {architecture!r}: {problem}")] if problem else []


def require_applicable(ref: ComponentRef, model: nn.Module, architecture: str) -> None:
    """Raise ScenarioError when ``eval.adapt`` cannot apply to the scenario's model (at World build time)."""
    problems = check_model(ref, model, architecture)
    if problems:
        raise ScenarioError(problems)


# ---------------------------------------------------------------------------------------------- BN-Adapt


class BNAdaptParams(ComponentParams):
    prior_strength: float | None = Field(0.0, ge=0, description="N, the source statistics' weight in examples: "
                                         "each layer uses N/(N+n) source + n/(N+n) test-batch statistics (n = batch "
                                         "size); 0 = the test batch alone, null or .inf = the source statistics")


def mixed_batch_norm(layer: _BatchNorm, prior_strength: float | None, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm with statistics prior * running + (1 - prior) * batch, prior = N / (N + n). As in the
    reference (bethgelab BayesianBatchNorm) the variances are mixed directly, without a mean-shift term, and
    the batch variance is the unbiased one (what a momentum-1 BatchNorm writes to running_var)."""
    n = x.shape[0]
    prior = 1.0 if prior_strength is None or math.isinf(prior_strength) else prior_strength / (prior_strength + n)
    mean, var = layer.running_mean, layer.running_var
    if prior < 1.0:
        dims = [0, *range(2, x.dim())]
        count = x.numel() // x.shape[1]
        batch_mean, batch_var = x.mean(dims), x.var(dims, correction=1 if count > 1 else 0)
        mean = prior * mean + (1 - prior) * batch_mean
        var = prior * var + (1 - prior) * batch_var
    return F.batch_norm(x, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)


def source_batch_norms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]


@ADAPTATIONS.register
class BNAdapt(TestTimeAdaptation):
    """BN-Adapt: normalise each test batch with a mix of source and batch statistics (prior strength N).

    BN-Adapt (Schneider et al., NeurIPS 2020): each BatchNorm layer normalises a test batch of n examples
    with N/(N+n) of its source statistics (the global model's running statistics: FedAvg's average of the
    clients') and n/(N+n) of the batch's own. No gradient, no weight changes; each batch is adapted from the
    source statistics alone (the paper's batch-wise variant; nothing carries over between batches).

    Parameters (defaults):
        prior_strength (0.0): N. 0 is full adaptation: test streams here are single-mode batches of
            ``eval.batch_size`` (256) examples, large enough that the batch estimate alone is good, and
            the prior only matters for small batches. null (or .inf) keeps the source statistics, i.e.
            the plain model.

    BatchNorm layers without running statistics (track_running_stats=False) already use the batch and are
    left alone. A model without BatchNorm (GroupNorm, LayerNorm, or none) is an error.
    """

    name = "bn_adapt"
    Params = BNAdaptParams

    def problem(self, model: nn.Module) -> str | None:
        if not source_batch_norms(model):
            return ("BN-Adapt re-estimates BatchNorm statistics and this model has no BatchNorm layer with running "
                    "statistics (GroupNorm and LayerNorm use each example's own statistics: nothing to re-estimate); "
                    "use a BatchNorm model (e.g. model.norm: batch) or eval.adapt: tent")
        return None

    def stream(self, model: nn.Module) -> AdaptedStream:
        adapted = copy.deepcopy(model)
        for layer in source_batch_norms(adapted):
            # an instance attribute: hooks on the layer and parameter names stay as they are
            layer.forward = functools.partial(mixed_batch_norm, layer, self.params.prior_strength)
        return AdaptedStream(adapted)


# ---------------------------------------------------------------------------------------------- Tent


class TentParams(ComponentParams):
    lr: float = Field(1e-3, gt=0, description="learning rate of the normalisation affine parameters")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam (betas (beta, 0.999)) or sgd (nesterov "
                                              "momentum beta)")
    beta: float = Field(0.9, ge=0, lt=1, description="Adam's beta1, or SGD's momentum")
    steps: int = Field(1, ge=1, description="updates per test batch")
    episodic: bool = Field(False, description="reset the parameters and optimizer before every batch")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy over the class dimension (1) of every example (and token)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def normalisation_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, NORMALISATION) for p in m.parameters(recurse=False)]


class TentStream(AdaptedStream):
    def __init__(self, model: nn.Module, params: TentParams):
        super().__init__(copy.deepcopy(model))
        self.params = params
        self.model.requires_grad_(False)
        for m in self.model.modules():
            if isinstance(m, _BatchNorm):  # normalise with the test batch; running statistics neither used nor kept
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
        trained = normalisation_parameters(self.model)
        for p in trained:
            p.requires_grad_(True)
        if params.optimizer == "adam":
            self.optimizer = torch.optim.Adam(trained, lr=params.lr, betas=(params.beta, 0.999))
        else:
            self.optimizer = torch.optim.SGD(trained, lr=params.lr, momentum=params.beta, nesterov=params.beta > 0)
        self.saved = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))

    def predict(self, x: torch.Tensor, scored: Scored) -> ModelOutput:
        if self.params.episodic:
            self.model.load_state_dict(self.saved[0])
            self.optimizer.load_state_dict(self.saved[1])
        with torch.enable_grad():
            for _ in range(self.params.steps):
                output = self.model(x)
                loss = entropy(scored(output)).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        return ModelOutput(output.logits.detach(), output.features.detach())


@ADAPTATIONS.register
class Tent(TestTimeAdaptation):
    """Tent: minimise the test batch's prediction entropy by updating normalisation affine parameters only.

    Tent (Wang et al., ICLR 2021): for each test batch, ``steps`` times: a forward pass with every
    normalisation layer on the batch's statistics, then one optimizer step on the mean softmax entropy of
    the logits the evaluation scores (the group's branch). Only the affine parameters (weight, bias) of
    normalisation layers change: BatchNorm, GroupNorm, LayerNorm, InstanceNorm, RMSNorm. The predictions
    are those of the last forward pass, made before its update (as the reference returns them). Online:
    the updates carry over the mode's stream, unless ``episodic``.

    Parameters (defaults; DequanWang/tent cfgs/tent.yaml):
        lr (1e-3), optimizer (adam), beta (0.9: Adam's beta1; SGD's nesterov momentum), steps (1),
        episodic (False).

    Unlike the reference, which puts the whole model in train mode, the rest of the model stays in eval
    mode (dropout off): BatchNorm layers use the batch's statistics because their running statistics are
    removed, as the reference does too. A model without normalisation parameters is an error.
    """

    name = "tent"
    Params = TentParams

    def problem(self, model: nn.Module) -> str | None:
        if not normalisation_parameters(model):
            return ("Tent updates the affine parameters of normalisation layers (BatchNorm, GroupNorm, LayerNorm) "
                    "and this model has none; use a model with normalisation (e.g. model.norm: batch or group; "
                    "resnet18_gn's GroupNorm has them with model.affine: true)")
        return None

    def stream(self, model: nn.Module) -> AdaptedStream:
        return TentStream(model, self.params)
