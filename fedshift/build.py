"""Building the objects a resolved scenario describes: the model (architecture, padding, robustness modules,
pretrained weights, the client strategy's changes), the server strategy and the client training strategy.

Every process that plays a part of the run (the server, each worker, the in-process executor) builds them
here, from the same resolved scenario, so they agree.
"""

from __future__ import annotations

import torch

from .clients.base import CLIENT_STRATEGIES, ClientTrainer
from .core.errors import ScenarioError
from .core.seeding import Stream, seed_of
from .data import Federation
from .nets.models import ARCHITECTURES, MultiBranchNet
from .nets.modules import TrunkModule, insert_modules, set_padding_mode
from .schema import Scenario
from .shift import build_schedule
from .strategies.base import STRATEGIES, ServerStrategy, StrategySetup


def resolve_device(scenario: Scenario) -> torch.device:
    want = scenario.backend.device
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    # clients too: with num_gpus 0 the engine shares the GPU among the client slots (flower/runtime.py: backend_config)
    return torch.device("cuda")


def build_model(scenario: Scenario, input_shape: tuple[int, ...], num_classes: int) -> MultiBranchNet:
    """The scenario's architecture with its padding mode and its ``model.modules`` in place."""
    cfg = scenario.model
    arch = ARCHITECTURES.get(cfg.architecture)
    try:
        model = arch.build(input_shape, num_classes, cfg.branches, cfg.feature_dim,
                           arch.Params.model_validate(cfg.params()))
    except ValueError as exc:
        raise ScenarioError([("model", f"architecture {cfg.architecture!r} on input {tuple(input_shape)}: {exc}")]) from None
    if cfg.padding != "zeros":
        set_padding_mode(model, cfg.padding, cfg.architecture)
    insert_modules(model, cfg.modules, cfg.architecture)
    return model


def build_strategy(scenario: Scenario, federation: Federation) -> ServerStrategy:
    cls = STRATEGIES.get(scenario.strategy.name)
    sizes = {name: [federation.client_size(int(c)) for c in pool]
             for name, pool in zip(federation.mode_names, federation.pools())}
    setup = StrategySetup(mode_names=scenario.mode_names, num_classes=federation.num_classes,
                          branches=scenario.model.branches, schedule=build_schedule(scenario), seed=scenario.seed,
                          rounds=scenario.rounds, eval=scenario.eval, client_sizes=sizes)
    return cls(cls.Params.model_validate(scenario.strategy.params()), setup)


def build_trainer(scenario: Scenario) -> ClientTrainer:
    cls = CLIENT_STRATEGIES.get(scenario.client.strategy)
    return cls(cls.Params.model_validate(scenario.client.params()), scenario.client)


def initial_model(scenario: Scenario, federation: Federation, trainer: ClientTrainer) -> MultiBranchNet:
    """The model every process starts from: seeded init, pretrained weights, then the trainer's changes."""
    torch.manual_seed(seed_of(scenario.seed, Stream.MODEL_INIT))
    model = build_model(scenario, federation.input_shape, federation.num_classes)
    if scenario.model.pretrained:
        load_pretrained(model, scenario.model.pretrained)
    trainer.prepare_model(model)
    return model


def load_pretrained(model: MultiBranchNet, path: str) -> None:
    """Load a state_dict file into the model; heads missing from it (e.g. a 1-branch checkpoint into a
    K-branch model) are copied from head 0 when the checkpoint has one."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ScenarioError([("model.pretrained", f"cannot load {path!r}: {exc}")]) from None
    if not isinstance(sd, dict):
        raise ScenarioError([("model.pretrained", f"{path!r} does not hold a state_dict")])
    own = model.state_dict()
    for name in own:
        if name not in sd and name.startswith("heads.") and "heads.0." + name.split(".", 2)[2] in sd:
            sd[name] = sd["heads.0." + name.split(".", 2)[2]]
    wrong = [n for n in own if n in sd and tuple(sd[n].shape) != tuple(own[n].shape)]
    # model.modules added after the checkpoint was written (SelfNorm's weights) keep their initial values
    added = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, TrunkModule))
    missing = [n for n in own if n not in sd and not n.startswith(added)]
    if wrong or missing:
        raise ScenarioError([("model.pretrained", f"{path!r} does not fit model {model.__class__.__name__}: "
                              f"missing {missing[:5]}, wrong shape {wrong[:5]}")])
    model.load_state_dict({n: sd[n] for n in own if n in sd}, strict=False)
