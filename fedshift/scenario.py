"""Loading a scenario: read the YAML (a file or a built-in name), apply ``--set`` overrides, validate it against
the schema (fedshift/schema.py), then resolve every named component.

``resolve_components`` checks every name against its registry, validates each component's own parameters
against its ``Params`` model (writing the defaults back, so the resolved scenario is complete), and runs the
checks that span several sections. Every problem is reported with its key path; nothing is half-built.
This module sits above every registry (it imports the built-in components to register them); the objects a
resolved scenario describes are built in fedshift/build.py.
"""

from __future__ import annotations

import copy
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ValidationError

from fedshift.clients import CLIENT_STRATEGIES, ClientTrainer
from fedshift.clients.base import mixed_clients_problems
from fedshift.strategies import STRATEGIES, ServerStrategy

from .adapt import ADAPTATIONS, TestTimeAdaptation
from .augment import AUGMENTATIONS, Augmentation
from .core.errors import FedshiftError, PluginError, ScenarioError
from .core.params import ComponentSpec
from .core.registry import PLUGIN_PATH_FORM, Registry
from .data.sources import DATASETS, DatasetSource
from .nets import lm, vit  # noqa: F401  (register so_lstm, vit)
from .nets.models import ARCHITECTURES, Architecture
from .nets.modules import MODEL_MODULES, ModelModule
from .schema import DatasetSpec, Scenario
from .shift import SCHEDULES, TraceSchedule


class ScenarioLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but numbers in scientific notation without a dot or without an exponent sign
    (``1e-4``, ``1E-4``, ``-2e3``, ``5e+2``, ``1.5e3``) are floats, as in YAML 1.2 (YAML 1.1 reads them as
    strings). Only whole scalars that are such numbers: ``e5`` or ``1e-4x`` stay strings, quoted ones too. The
    global SafeLoader is unchanged."""


ScenarioLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with ScenarioLoader: how scenario files and ``--set`` values are read."""
    return yaml.load(text, Loader=ScenarioLoader)  # noqa: S506 (a SafeLoader subclass)


def builtin_scenarios() -> dict[str, str]:
    """Built-in scenario names -> their YAML text."""
    root = resources.files("fedshift.scenarios")
    return {p.name[:-5]: p.read_text() for p in root.iterdir() if p.name.endswith(".yaml")}


def read_scenario_source(path_or_name: str | None) -> tuple[dict[str, Any], str, Path | None]:
    """The raw mapping of a scenario file or built-in name, its display name, and its folder (for paths)."""
    builtins = builtin_scenarios()
    if path_or_name is None:
        path_or_name = "default"
    path = Path(path_or_name)
    if path.is_file():
        try:
            text = path.read_text()
        except OSError as exc:
            raise ScenarioError([("", f"cannot read {str(path)!r}: {exc.strerror or exc}")]) from None
        source, base = str(path), path.resolve().parent
    elif path_or_name in builtins:
        text, source, base = builtins[path_or_name], f"built-in scenario {path_or_name!r}", None
    else:
        raise ScenarioError([("", f"no scenario file or built-in scenario named {path_or_name!r}; "
                                  f"built-in: {', '.join(sorted(builtins))}")])
    return parse_yaml(text, source), source, base


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError([("", f"not valid YAML{where}: {problem}")], source) from None
    except RecursionError:
        raise ScenarioError([("", "not valid YAML: nested too deeply")], source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ScenarioError([("", f"a scenario is a YAML mapping of keys, got {type(raw).__name__}")], source)
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML (``a.b=[x,y]`` gives a list)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ScenarioError([("--set", f"{item!r} is not of the form key.path=value")])
        try:
            parsed = load_yaml(value) if value.strip() else None
        except yaml.YAMLError:
            raise ScenarioError([(key, f"--set value {value!r} is not valid YAML")]) from None
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ScenarioError([(".".join(parts[: i + 1]), f"is a {type(child).__name__}, cannot set {key!r} inside it")])
            node = child
        node[parts[-1]] = parsed
    return raw


def load_scenario(path_or_name: str | None = None, overrides: list[str] | None = None) -> Scenario:
    """Read, override and validate a scenario. Raises ScenarioError listing every problem."""
    raw, source, base = read_scenario_source(path_or_name)
    try:
        return validate_scenario(apply_overrides(raw, overrides or []), base_dir=base)
    except ScenarioError as exc:
        raise ScenarioError(exc.problems, source) from None


def validate_scenario(raw: dict[str, Any], base_dir: Path | None = None) -> Scenario:
    """Validate a raw mapping into a resolved Scenario (component parameters filled with their defaults)."""
    problems: list[tuple[str, str]] = []
    raw = copy.deepcopy(raw)
    for _ in range(5):  # drop what failed and validate again, so later checks can report their problems too
        try:
            scenario = Scenario.model_validate(raw)
            break
        except ValidationError as exc:
            problems += [p for p in _pydantic_problems(exc, Scenario) if p not in problems]
            locs = {tuple(_clean_loc(err["loc"])) for err in exc.errors()}
            if not all(_drop(raw, list(loc)) for loc in sorted(locs, reverse=True)):
                raise ScenarioError(problems) from None
    else:
        raise ScenarioError(problems)
    problems += [p for p in resolve_components(scenario, base_dir)
                 if not any(p[0] == q[0] or p[0].startswith(q[0] + ".") for q in problems)]
    if problems:
        raise ScenarioError(problems)
    return scenario


def _clean_loc(loc: tuple) -> list[str]:
    """The key path of a pydantic error without the names of union members (``str``, ``DatasetSpec``...):
    pydantic reports each failed member of a union separately; one message per key path is enough."""
    return [str(p) for p in loc if str(p) not in ("str", "DatasetSpec", "TransformSpec", "ComponentSpec")
            and not str(p).startswith(("literal[", "function-"))]


def _drop(raw: Any, loc: list[str]) -> bool:
    """Remove the value at ``loc`` (its first resolvable prefix) so its default applies; False if impossible."""
    node = raw
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            if i == len(loc) - 1 or not isinstance(node[part], (dict, list)):
                del node[part]
                return True
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            if i == len(loc) - 1 or not isinstance(node[int(part)], (dict, list)):
                del node[int(part)]
                return True
            node = node[int(part)]
        else:
            return False
    return False


def _pydantic_problems(exc: ValidationError, root: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = _clean_loc(err["loc"])
        path = ".".join(filter(None, [prefix, *loc]))
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, loc[:-1])
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}" if allowed else "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"].endswith("_type") or err["type"] == "literal_error":
                msg += f" (got {err.get('input')!r})"
        earlier = next((i for i, (p, _) in enumerate(problems) if p == path), None)
        if earlier is None:
            problems.append((path, msg))
        elif msg not in problems[earlier][1]:  # the members of a union each failed: say both ways
            problems[earlier] = (path, f"{problems[earlier][1]}; or: {msg}")
    return problems


def _allowed_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the model found by walking ``loc`` from ``model`` (empty when it cannot be followed)."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = _model_in(current.model_fields[part].annotation)
        elif isinstance(current, tuple) and current[0] == "dict":  # dict[str, Model]: skip the key
            current = current[1]
        else:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    import typing

    origin = typing.get_origin(annotation)
    if origin is dict:
        return ("dict", _model_in(typing.get_args(annotation)[1]))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def validate_params(params_model: type[BaseModel], values: dict[str, Any], prefix: str) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """Validate component parameters; returns (resolved values, problems)."""
    try:
        return params_model.model_validate(values).model_dump(mode="json"), []
    except ValidationError as exc:
        return None, _pydantic_problems(exc, params_model, prefix)


# --------------------------------------------------------------------------------------------------- components


def registries() -> dict[str, Registry]:
    """Every registry, with the built-in components registered (this module imports them)."""
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
            if trainer.needs_mixed_clients:
                problems.extend(mixed_clients_problems(trainer.name, s))

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

def check_evaluation(s: Scenario) -> list[tuple[str, str]]:
    """``(key, message)`` problems of the evaluation settings, once the strategy and branches are resolved."""
    problems = []
    if s.eval.select == "maxlogit" and s.model.branches == 1:
        problems.append(("eval.select", f"maxlogit chooses among branches and strategy {s.strategy.name!r} evaluates "
                                        "a one-branch model; use a multi-branch strategy or eval.select: strategy"))
    try:
        strategy = STRATEGIES.get(s.strategy.name)
    except (KeyError, FedshiftError):  # already reported as strategy.name
        strategy = None
    if not (isinstance(strategy, type) and issubclass(strategy, ServerStrategy)):  # e.g. os:path, reported too
        strategy = None
    if s.eval.ood and strategy is not None and strategy.one_model_per_mode:
        problems.append(("eval.ood", f"strategy {s.strategy.name!r} evaluates each mode with its own model, so no "
                                     "model sees both in-mode and out-of-mode examples; remove eval.ood"))
    return problems
