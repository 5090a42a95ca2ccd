"""Resolving and building the named components of a scenario.

``resolve_components`` checks every name against its registry, validates each component's own parameters
against its ``Params`` model (writing the defaults back, so the resolved scenario is complete), and runs the
checks that span several sections. The ``build_*`` functions turn a resolved scenario into objects.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import ComponentSpec, DatasetSpec, Scenario, validate_params
from .errors import PluginError, ScenarioError
from .registry import PLUGIN_PATH_FORM, Registry


def registries() -> dict[str, Registry]:
    """Every registry, with the built-in components imported (and so registered)."""
    from fedshift.clients import CLIENT_STRATEGIES
    from fedshift.strategies import STRATEGIES

    from . import lm, vit  # noqa: F401  (register so_lstm, vit)
    from .adapt import ADAPTATIONS
    from .augment import AUGMENTATIONS
    from .data.sources import DATASETS
    from .models import ARCHITECTURES
    from .modules import MODEL_MODULES
    from .shift import SCHEDULES

    return {"schedules": SCHEDULES, "datasets": DATASETS, "models": ARCHITECTURES,
            "strategies": STRATEGIES, "client strategies": CLIENT_STRATEGIES, "model modules": MODEL_MODULES,
            "augmentations": AUGMENTATIONS, "test-time adaptations": ADAPTATIONS}


def _lookup(registry: Registry, name: str, key: str, base: type, problems: list) -> type | None:
    if name not in registry:  # also every name that is not a legal plugin path (``../x``, ``.foo``, ``a..b:C``)
        problems.append((key, f"unknown {registry.kind} {name!r}; valid: {', '.join(registry.names())}"
                              f" (or a plugin's dotted path {PLUGIN_PATH_FORM})"))
        return None
    try:
        obj = registry.get(name)
    except PluginError as exc:
        problems.append((key, str(exc)))
        return None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        what = f"the class {obj.__name__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
        article = "an" if base.__name__[0] in "AEIOU" else "a"
        problems.append((key, f"{name!r} is not {article} {base.__name__} subclass (it names {what}); a "
                              f"{registry.kind} plugin's path {PLUGIN_PATH_FORM} must name one"))
        return None
    return obj


def _resolve_spec(registry: Registry, ref, key: str, base: type, problems: list) -> tuple[ComponentSpec, type | None]:
    """A ``name`` or ``{name: ..., option: value}`` entry, its parameters validated and written back."""
    spec = ComponentSpec(name=ref) if isinstance(ref, str) else ref
    cls = _lookup(registry, spec.name, key if isinstance(ref, str) else key + ".name", base, problems)
    if cls is None:
        return spec, None
    values, errs = validate_params(cls.Params, spec.params(), key)
    problems.extend(errs)
    if values is None:
        return spec, None
    return ComponentSpec(name=spec.name, **values), cls


def resolve_components(s: Scenario, base_dir: Path | None) -> list[tuple[str, str]]:
    from fedshift.clients.base import ClientTrainer
    from fedshift.strategies.base import ServerStrategy

    from .adapt import TestTimeAdaptation
    from .augment import Augmentation
    from .data.sources import DatasetSource
    from .evaluation import check_scenario as check_evaluation
    from .models import Architecture
    from .modules import ModelModule

    regs = registries()
    problems: list[tuple[str, str]] = []
    k = len(s.modes)
    if k < 2:
        problems.append(("modes", f"needs at least two modes (e.g. day and night), got {k}"))

    # datasets: the default and each mode's own
    def resolve_dataset(ref, key: str):
        spec = DatasetSpec(name=ref) if isinstance(ref, str) else ref
        cls = _lookup(regs["datasets"], spec.name, key + (".name" if not isinstance(ref, str) else ""), DatasetSource, problems)
        if cls is None:
            return ref
        opts = spec.params()
        for pkey in ("path", "root"):  # local files are relative to the scenario file
            if isinstance(opts.get(pkey), str) and base_dir is not None and not Path(opts[pkey]).is_absolute():
                opts[pkey] = str((base_dir / opts[pkey]).resolve())
        values, errs = validate_params(cls.Params, opts, key)
        problems.extend(errs)
        if values is None:
            return ref
        if (s.data.partition.kind == "natural") and not cls.has_natural_ids:
            problems.append(("data.partition.kind", f"dataset {spec.name!r} has no natural client ids; use iid or dirichlet"))
        return DatasetSpec(name=spec.name, **values)

    s.data.dataset = resolve_dataset(s.data.dataset, "data.dataset")
    for name, mode in s.modes.items():
        if mode.dataset is not None:
            mode.dataset = resolve_dataset(mode.dataset, f"modes.{name}.dataset")

    # shift schedule
    w = s.shift.weights
    if w is not None and len(w) != k:
        problems.append(("shift.weights", f"needs one weight per mode ({k}: {', '.join(s.modes)}), got {len(w)}"))
    elif w is not None and (any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0):
        problems.append(("shift.weights", f"weights must be finite, >= 0 and not all 0, got {w}"))
    if s.shift.schedule == "trace" and not s.shift.trace:
        problems.append(("shift.trace", "schedule 'trace' needs 'trace: PATH' (a CSV file of per-round mode weights)"))
    if s.shift.schedule == "trace" and s.shift.trace:
        path = Path(s.shift.trace)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        s.shift.trace = str(path.resolve())
        try:
            from .shift import TraceSchedule

            TraceSchedule.read_csv(path, list(s.modes))
        except ScenarioError as exc:
            problems.extend(exc.problems)

    # server strategy, model, client training strategy
    strat = _lookup(regs["strategies"], s.strategy.name, "strategy.name", ServerStrategy, problems)
    if strat is not None:
        values, errs = validate_params(strat.Params, s.strategy.params(), "strategy")
        problems.extend(errs)
        if values is not None:
            s.strategy = type(s.strategy)(name=s.strategy.name, **values)
            strat_params = strat.Params.model_validate(values)
            need = strat.num_branches(strat_params, k)
            problems.extend(strat.check_scenario(strat_params, s))
            if s.model.branches is None:
                s.model.branches = need
            elif s.model.branches != need:
                problems.append(("model.branches", f"strategy {s.strategy.name!r} with these parameters needs "
                                                   f"{need} branches, got {s.model.branches}"))
    arch = _lookup(regs["models"], s.model.architecture, "model.architecture", Architecture, problems)
    if arch is not None:
        values, errs = validate_params(arch.Params, s.model.params(), "model")
        problems.extend(errs)
        if values is not None:
            s.model = type(s.model)(architecture=s.model.architecture, branches=s.model.branches,
                                    feature_dim=s.model.feature_dim or arch.default_feature_dim,
                                    pretrained=s.model.pretrained, modules=s.model.modules,
                                    padding=s.model.padding, **values)
    modules = [_resolve_spec(regs["model modules"], ref, f"model.modules.{i}", ModelModule, problems)
               for i, ref in enumerate(s.model.modules)]
    s.model.modules = [spec for spec, _ in modules]
    if arch is not None and not arch.feature_maps:  # what the built model can tell is checked when it is built
        with_maps = ", ".join(n for n, a in regs["models"] if getattr(a, "feature_maps", False))
        for i, (spec, cls) in enumerate(modules):
            if cls is not None:
                problems.append((f"model.modules.{i}", f"module {spec.name!r} works on convolutional feature maps "
                                                       f"[B, C, H, W]; architecture {s.model.architecture!r} has "
                                                       f"none (these have: {with_maps})"))
        if s.model.padding != "zeros":
            problems.append(("model.padding", f"{s.model.padding!r} applies to padded convolutions; architecture "
                                              f"{s.model.architecture!r} has none (these have: {with_maps})"))
    augments = [_resolve_spec(regs["augmentations"], ref, f"client.augment.{i}", Augmentation, problems)
                for i, ref in enumerate(s.client.augment)]
    s.client.augment = [spec for spec, _ in augments]
    for i, (spec, cls) in enumerate(augments):
        if cls is not None:  # kornia installed, image-shaped examples where the dataset's options tell
            problems.extend(cls.check_scenario(cls.Params.model_validate(spec.params()), s, f"client.augment.{i}"))
    problems.extend(check_evaluation(s))
    s.eval.adapt, _ = _resolve_spec(regs["test-time adaptations"], s.eval.adapt, "eval.adapt", TestTimeAdaptation,
                                    problems)
    trainer = _lookup(regs["client strategies"], s.client.strategy, "client.strategy", ClientTrainer, problems)
    if trainer is not None:
        base = {f: getattr(s.client, f) for f in type(s.client).model_fields}
        values, errs = validate_params(trainer.Params, s.client.params(), "client")
        problems.extend(errs)
        if values is not None:
            s.client = type(s.client)(**base, **values)
            problems.extend(trainer.check_scenario(trainer.Params.model_validate(values), s))

    if s.model.pretrained:
        path = Path(s.model.pretrained)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            problems.append(("model.pretrained", f"no such file: {str(path)!r}"))
        s.model.pretrained = str(path.resolve())

    total = sum(s.faults.shares().values())
    if total > 1:
        problems.append(("faults", f"the fault shares add up to {total:g}; at most 1"))
    if s.faults.slow > 0 and s.faults.time_limit_s is None:
        problems.append(("faults.time_limit_s", "faults.slow needs a time limit to exceed"))

    # counts
    for name in s.modes:
        n = s.clients_of_mode(name)
        if s.clients_per_round > n:
            problems.append(("clients_per_round", f"is {s.clients_per_round} but mode {name!r} has only {n} clients; "
                                                  "every mode's pool must be able to fill a whole round"))
    if s.backend.device == "cuda" and not torch.cuda.is_available():
        problems.append(("backend.device", "is 'cuda' but no CUDA device is available here; use auto or cpu"))
    if s.backend.num_gpus > 0 and not torch.cuda.is_available() and s.backend.ray_address is None:
        problems.append(("backend.num_gpus", f"is {s.backend.num_gpus} but no CUDA device is available here; use 0"))
    return problems
