"""Test-time adaptation (eval.adapt): Tent and BN-Adapt against independent computations of what they should do,
and the evaluation pass that runs them (the global model never changes, every mode's stream starts afresh)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedshift import adapt
from fedshift.adapt import (
    ADAPTATIONS,
    AdaptedStream,
    BNAdaptParams,
    TentParams,
    build_adaptation,
    check_model,
    entropy,
)
from fedshift.core.params import ComponentParams, ComponentSpec
from fedshift.evaluation import evaluate_modes
from fedshift.nets.models import MultiBranchNet
from fedshift.schema import EvalConfig


def bn_net(seed: int = 0, dropout: float = 0.0) -> MultiBranchNet:
    """Conv -> BatchNorm -> ReLU -> GroupNorm -> linear feature, two heads; BN source statistics made
    far from what the test batches have, so that adapting them visibly matters."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.GroupNorm(2, 4),
                          nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * 5 * 5, 6), nn.LayerNorm(6))
    net = MultiBranchNet(trunk, 6, 3, 2)
    with torch.no_grad():
        bn = trunk[1]
        bn.running_mean.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0, 9.0]))
        for m in (trunk[1], trunk[3], trunk[7]):  # affine parameters away from their (1, 0) initialisation
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return net.eval()


def gn_net() -> MultiBranchNet:
    torch.manual_seed(0)
    return MultiBranchNet(nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten()),
                          36, 3, 2).eval()


def batch(seed: int, n: int = 16) -> torch.Tensor:
    return torch.randn(n, 2, 5, 5, generator=torch.Generator().manual_seed(seed))


def branch1(output):
    return output.logits[:, 1]


def norm_affine_names(model: nn.Module) -> set[str]:
    kinds = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    return {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, kinds) for p, _ in m.named_parameters()}


def tent(**options):
    return build_adaptation(ComponentSpec(name="tent", **options))


def bn_adapt(prior_strength):
    return build_adaptation(ComponentSpec(name="bn_adapt", prior_strength=prior_strength))


def batch_stat_forward(model: MultiBranchNet, x: torch.Tensor):
    """The reference's forward: BatchNorm on the batch's (biased) statistics, here by train mode (no dropout
    in the nets used with it)."""
    ref = copy.deepcopy(model).train()
    return ref(x)


# ------------------------------------------------------------------------------------------------ Tent


def test_registry_holds_the_three_methods_with_the_reference_defaults():
    assert {"none", "bn_adapt", "tent"} <= set(ADAPTATIONS.names())
    p = TentParams()
    assert (p.lr, p.optimizer, p.beta, p.steps, p.episodic) == (1e-3, "adam", 0.9, 1, False)  # tent.yaml, conf.py


def test_tent_changes_only_the_affine_parameters_of_normalisation_layers():
    net = bn_net()
    before = copy.deepcopy(net.state_dict())
    stream = tent().stream(net)
    stream.predict(batch(0), branch1)
    after = stream.model.state_dict()
    affine = norm_affine_names(net)
    assert len(affine) == 6
    changed = {n for n in before if n in after and not torch.equal(before[n], after[n])}
    assert changed == affine  # every affine parameter moved, nothing else did
    # BatchNorm's running statistics are dropped (batch statistics only), not updated
    assert stream.model.trunk[1].running_mean is None and stream.model.trunk[1].running_var is None
    assert all(torch.equal(before[n], v) for n, v in net.state_dict().items())  # the model given is untouched


def test_tent_returns_the_predictions_made_before_its_update_and_steps_on_their_entropy():
    net = bn_net()
    x = batch(0)
    stream = tent(lr=1e-2).stream(net)
    out = stream.predict(x, branch1)
    expected = batch_stat_forward(net, x)
    assert torch.allclose(out.logits, expected.logits, atol=1e-6)  # the pre-update forward
    assert not torch.allclose(stream.model(x).logits, out.logits, atol=1e-4)  # the model did change after it
    # Adam's first step moves each parameter by lr * sign(gradient) (up to eps); the gradient is that of the
    # mean entropy of the scored branch's logits with batch statistics
    ref = copy.deepcopy(net).train()
    entropy(branch1(ref(x))).mean().backward()
    new = dict(stream.model.named_parameters())
    for name, p in ref.named_parameters():
        if name in norm_affine_names(net):
            big = p.grad.abs() > 1e-5
            step = new[name].detach() - p.detach()
            assert torch.allclose(step[big], -1e-2 * p.grad[big].sign(), rtol=1e-3), name


def test_tent_is_online_unless_episodic():
    net = bn_net()
    x1, x2 = batch(1), batch(2)
    fresh = batch_stat_forward(net, x2).logits
    online = tent(lr=1e-2).stream(net)
    online.predict(x1, branch1)
    assert not torch.allclose(online.predict(x2, branch1).logits, fresh, atol=1e-4)
    episodic = tent(lr=1e-2, episodic=True).stream(net)
    episodic.predict(x1, branch1)
    assert torch.allclose(episodic.predict(x2, branch1).logits, fresh, atol=1e-6)
    changed = episodic.model.trunk[1].weight.detach()
    assert not torch.equal(changed, net.trunk[1].weight)  # reset happens before a batch, not after it


def test_tent_keeps_dropout_off_so_that_its_predictions_are_deterministic():
    net = bn_net(dropout=0.5)
    x = batch(9)
    first, second = (tent().stream(net).predict(x, branch1).logits for _ in range(2))
    assert torch.equal(first, second)


def test_tent_on_groupnorm_updates_its_affine_parameters_and_nothing_else():
    net = gn_net()
    before = copy.deepcopy(net.state_dict())
    stream = tent(lr=1e-2).stream(net)
    x = batch(3)
    out = stream.predict(x, branch1)
    assert torch.allclose(out.logits, net(x).logits, atol=1e-6)  # GroupNorm has no batch statistics to switch
    after = stream.model.state_dict()
    assert {n for n in before if not torch.equal(before[n], after[n])} == {"trunk.1.weight", "trunk.1.bias"}


def test_tent_sgd_and_several_steps_still_touch_only_normalisation():
    net = bn_net()
    stream = tent(optimizer="sgd", steps=3, lr=0.1).stream(net)
    stream.predict(batch(4), branch1)
    after = stream.model.state_dict()
    changed = {n for n, v in net.state_dict().items() if n in after and not torch.equal(v, after[n])}
    assert changed == norm_affine_names(net)


def test_tent_needs_normalisation_parameters():
    net = MultiBranchNet(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), 3, 2, 1)
    problems = check_model("tent", net, "mlp")
    assert len(problems) == 1 and problems[0][0] == "eval.adapt"
    assert "tent" in problems[0][1] and "'mlp'" in problems[0][1]
    assert check_model("tent", gn_net(), "resnet18_gn") == []


# ------------------------------------------------------------------------------------------------ BN-Adapt


def bn_only(channels: int = 3) -> MultiBranchNet:
    """Features = the output of one BatchNorm2d, so its statistics can be checked directly."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-2, 2, channels))
        bn.running_var.copy_(torch.linspace(0.5, 4, channels))
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return MultiBranchNet(nn.Sequential(bn, nn.Flatten()), channels * 4, 2, 1).eval()


def normalised(net: MultiBranchNet, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    bn = net.trunk[0]
    shape = (1, -1, 1, 1)
    return ((x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape)
            + bn.bias.view(shape)).flatten(1)


@pytest.mark.parametrize("strength", [None, float("inf")])
def test_bn_adapt_with_infinite_prior_strength_keeps_the_source_statistics(strength):
    net = bn_net()
    x = batch(5) * 3 + 1
    out = bn_adapt(strength).stream(net).predict(x, branch1)
    assert torch.equal(out.logits, net(x).logits)


def test_bn_adapt_with_zero_prior_strength_uses_the_batch_statistics():
    net = bn_only()
    x = torch.randn(8, 3, 2, 2) * 2 + 5
    out = bn_adapt(0.0).stream(net).predict(x, branch1)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)  # the reference's momentum-1 running_var
    assert torch.allclose(out.features, normalised(net, x, mean, var), atol=1e-5)
    # train-mode BatchNorm normalises with the biased variance: equal up to the factor n/(n-1), n = 8 * 2 * 2
    train_mode = copy.deepcopy(net).train()(x).features
    assert torch.allclose(out.features, normalised(net, x, mean, x.var((0, 2, 3), unbiased=False) * 32 / 31),
                          atol=1e-5)
    assert torch.allclose(out.features, train_mode, atol=0.05) and not torch.allclose(out.features, train_mode,
                                                                                      atol=1e-5)


def test_bn_adapt_mixes_source_and_batch_statistics_in_closed_form():
    net = bn_only()
    x = torch.randn(8, 3, 2, 2) * 2 + 5
    strength = 24.0  # prior = 24 / (24 + 8) = 0.75
    out = bn_adapt(strength).stream(net).predict(x, branch1)
    bn = net.trunk[0]
    mean = 0.75 * bn.running_mean + 0.25 * x.mean((0, 2, 3))
    var = 0.75 * bn.running_var + 0.25 * x.var((0, 2, 3), unbiased=True)
    assert torch.allclose(out.features, normalised(net, x, mean, var), atol=1e-5)


def test_bn_adapt_changes_no_weight_and_no_buffer():
    net = bn_net()
    before = copy.deepcopy(net.state_dict())
    stream = bn_adapt(0.0).stream(net)
    for seed in range(3):
        stream.predict(batch(seed), branch1)
    assert all(torch.equal(before[n], v) for n, v in stream.model.state_dict().items())
    assert all(torch.equal(before[n], v) for n, v in net.state_dict().items())


def test_bn_adapt_needs_batchnorm_and_says_so_for_groupnorm_models():
    problems = check_model(ComponentSpec(name="bn_adapt", prior_strength=0.0), gn_net(), "resnet18_gn")
    assert [key for key, _ in problems] == ["eval.adapt"]
    assert "'resnet18_gn'" in problems[0][1] and "GroupNorm" in problems[0][1]
    assert check_model("bn_adapt", bn_net(), "cnn") == []


def test_bn_adapt_prior_strength_accepts_null_and_infinity_and_rejects_negatives():
    assert BNAdaptParams().prior_strength == 0.0
    assert BNAdaptParams.model_validate({"prior_strength": None}).prior_strength is None
    assert BNAdaptParams.model_validate({"prior_strength": float("inf")}).prior_strength == float("inf")
    assert BNAdaptParams.model_validate({"prior_strength": 16}).prior_strength == 16
    with pytest.raises(ValueError):
        BNAdaptParams.model_validate({"prior_strength": -1.0})


# ------------------------------------------------------------------------------------------------ evaluation


def test_bn_adapt_on_a_model_without_batchnorm_fails_when_the_world_is_built():
    from fedshift import load_scenario
    from fedshift.core.errors import ScenarioError
    from fedshift.runtime.worker import World

    scenario = load_scenario("default", ["eval.adapt=bn_adapt"])
    with pytest.raises(ScenarioError) as err:
        World.build(scenario, on_worker=False)
    assert err.value.problems[0][0] == "eval.adapt" and "'mlp'" in err.value.problems[0][1]


@pytest.mark.parametrize("adapt", ["tent", ComponentSpec(name="bn_adapt", prior_strength=0.0)])
def test_an_adapted_evaluation_leaves_the_global_model_alone_and_starts_every_mode_afresh(adapt):
    net = bn_net().train()
    before = copy.deepcopy(net.state_dict())
    x = torch.cat([batch(6), batch(7)]) * 2 + 1
    y = torch.arange(len(x)) % 3
    test_sets = {"day": (x, y), "night": (x.clone(), y.clone())}
    settings = EvalConfig(adapt=adapt)
    m = evaluate_modes(net, test_sets, lambda out: None, batch_size=8, settings=settings)
    assert net.training and all(torch.equal(before[n], v) for n, v in net.state_dict().items())
    # night's stream is the same data as day's: it gives the same results only if it starts from the global model
    assert m["eval/day/loss"] == pytest.approx(m["eval/night/loss"], rel=1e-6)
    plain = evaluate_modes(net, test_sets, lambda out: None, batch_size=8)
    assert m["eval/day/loss"] != pytest.approx(plain["eval/day/loss"], rel=1e-3)  # the adaptation did apply


def test_an_adapting_stream_is_asked_to_score_the_batch_majority_branch(monkeypatch):
    from fedshift import evaluation

    seen = []

    class Spy(AdaptedStream):
        def predict(self, x, scored):
            out = self.model(x)
            seen.append(scored(out))
            return out

    class SpyAdaptation(adapt.TestTimeAdaptation):
        def stream(self, model):
            return Spy(model)

    monkeypatch.setattr(evaluation, "build_adaptation", lambda ref: SpyAdaptation(ComponentParams()))
    net = bn_net()
    x = batch(8)
    every_example_says_1 = lambda out: torch.tensor([1] * 10 + [0] * 6)  # noqa: E731  (the group votes 1)
    evaluate_modes(net, {"day": (x, torch.zeros(16, dtype=torch.long))}, every_example_says_1, batch_size=16,
                   settings=EvalConfig(client_size=16))
    assert len(seen) == 1 and torch.equal(seen[0], net(x).logits[:, 1])
