"""The scenario: a strict, validated description of one simulated federation.

Every problem is reported with its key path (``shift.period: must be >= 2``). Components chosen by name
(dataset, model architecture, server strategy, client training strategy) declare their own parameters as a
pydantic model ``Params``; the scenario validates those parameters against it and writes them back with their
defaults, so a resolved scenario re-runs exactly as it ran.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ScenarioError

PositiveInt = Annotated[int, Field(ge=1)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ComponentParams(StrictModel):
    """Base class of the ``Params`` model of every named component (all fields need defaults)."""


class NamedComponent(BaseModel):
    """A ``name`` plus that component's own parameters, checked later against its ``Params`` model."""

    model_config = ConfigDict(extra="allow", strict=True)

    def params(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})


class TransformSpec(StrictModel):
    name: Literal["invert", "rotate", "hflip", "vflip"]
    degrees: float = 0.0


class DatasetSpec(NamedComponent):
    name: str = "digits"


class ComponentSpec(NamedComponent):
    """A named component in a list (``model.modules``, ``client.augment``, ``eval.adapt``): ``{name: ..., option: value}``."""

    name: str


ComponentRef = str | ComponentSpec


class ModeConfig(StrictModel):
    """What the clients of one mode hold."""

    dataset: str | DatasetSpec | None = Field(None, description="dataset of this mode; defaults to data.dataset")
    labels: list[int] | None = Field(None, description="keep only these source labels (all if omitted)")
    transform: list[Literal["invert", "hflip", "vflip"] | TransformSpec] = Field(
        default_factory=list, description="input transforms, applied in order: invert, hflip, vflip, {name: rotate, degrees: D}")
    label_map: dict[int, int] = Field(default_factory=dict, description="relabel source label -> new label")
    label_offset: int = Field(0, description="added to every label after label_map")
    clients: PositiveInt | None = Field(None, description="clients of this mode; defaults to data.clients_per_mode")


class PartitionConfig(StrictModel):
    kind: Literal["iid", "dirichlet", "natural"] = Field("iid", description="iid shuffle, Dirichlet label skew, or natural ids (writers)")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration over classes (dirichlet only)")
    min_examples: PositiveInt = Field(2, description="every client gets at least this many training examples")


class DataConfig(StrictModel):
    dataset: str | DatasetSpec = Field("digits", description="dataset name, or {name: ..., option: value}")
    clients_per_mode: PositiveInt = Field(20, description="clients in each mode's pool")
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held out for testing when a dataset has no test split")
    max_test_per_mode: PositiveInt | None = Field(None, description="cap on each mode's test examples")
    num_classes: PositiveInt | None = Field(None, description="output classes; by default 1 + the largest label")
    mix: float = Field(0.0, ge=0, lt=1, description="share of each client's examples drawn from the other modes "
                                                    "('mixed' clients; each example keeps its mode as its domain)")
    unlabelled: float = Field(0.0, ge=0, lt=1, description="share of each client's examples whose label is hidden "
                                                           "(label -1), for semi-supervised client strategies")


class ShiftConfig(StrictModel):
    schedule: Literal["linear", "cosine", "block", "constant", "trace"] = Field("linear", description="how mode weights move (see Schedules)")
    period: int = Field(16, ge=2, description="rounds per period (>= 2)")
    power: float = Field(1.0, gt=0, description="q(t) is raised to this power; > 1 favours night")
    phase: float = Field(0.0, ge=0, lt=1, description="phase offset as a fraction of the period")
    weights: list[float] | None = Field(None, description="constant schedule: one weight per mode")
    trace: str | None = Field(None, description="trace schedule: CSV with one column per mode, one row per round")


class ModelConfig(NamedComponent):
    architecture: str = Field("mlp", description="model family (see Models); its options sit beside it")
    branches: PositiveInt | None = Field(None, description="heads; by default what the strategy needs")
    feature_dim: PositiveInt | None = Field(None, description="width of the feature the heads read; per-model default")
    pretrained: str | None = Field(None, description="start from these weights: a state_dict file, e.g. a run's model.pt")
    modules: list[ComponentRef] = Field(default_factory=list, description="robustness modules placed in the trunk's "
                                        "blocks (see Model modules): name or {name: ..., option: value}")
    padding: Literal["zeros", "reflect", "circular"] = Field(
        "zeros", description="padding mode of every padded convolution ('Mind the Pad')")


class StrategyConfig(NamedComponent):
    name: str = Field("fedavg", description="server strategy (see Server strategies); its parameters sit beside it")


class ClientConfig(NamedComponent):
    strategy: str = Field("erm", description="client training strategy; its hyperparameters sit beside it")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="client optimizer, rebuilt every round")
    lr: float = Field(0.05, gt=0, description="client learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")
    local_epochs: PositiveInt = Field(1, description="passes over the local data per round")
    batch_size: PositiveInt = Field(20, description="local batch size")
    max_steps: PositiveInt | None = Field(None, description="cap on local optimizer steps per round")
    max_examples: PositiveInt | None = Field(
        None, description="cap on the examples a client uses per round: a client with more uses a random N of them "
                          "(drawn anew each round from its round seed) in every pass of the round (a strategy's votes "
                          "and statistics too, and its reported num_examples); null: all. The FedTKM reference's "
                          "max_elements_per_client")
    augment: list[ComponentRef] = Field(default_factory=list, description="augmentations of every training batch, on "
                                        "the training device, in order (see Augmentations)")


class EvalConfig(StrictModel):
    every: PositiveInt = Field(1, description="evaluate every N rounds (and always after the last)")
    batch_size: PositiveInt = Field(256, description="test batch size of the forward pass (and the stream batch of "
                                    "test-time adaptation); it does not change the metrics without adaptation")
    client_size: PositiveInt | Literal["train"] = Field(
        "train", description="multi-branch evaluation: each mode's test split is cut into test clients that each "
                             "choose one branch from their own inputs (eval/<mode>/accuracy); 'train': their sizes "
                             "follow that mode's training clients' sizes, or a number: all that size")
    reference_batch: PositiveInt = Field(64, description="the reference's protocol (eval/<mode>/accuracy_reference): "
                                         "all modes' test examples mixed in batches of this size, each mode's part "
                                         "of a batch votes (64 in the FedTKM authors' code)")
    adapt: ComponentRef = Field("none", description="test-time adaptation on each mode's test stream (see Test-time "
                                "adaptation): none, bn_adapt, tent")
    ood: list[Literal["msp", "maxlogit"]] = Field(default_factory=list, description="per-branch scores of in-mode vs "
                                                  "out-of-mode test examples, reported as eval/branch<k>/<score>_auroc "
                                                  "and _fpr95")
    select: Literal["strategy", "maxlogit"] = Field("strategy", description="how test examples choose a branch: the "
                                                    "strategy's own rule, or the branch with the largest max logit")


class BackendConfig(StrictModel):
    num_cpus: float = Field(1.0, gt=0, description="CPUs per simulated client (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per simulated client (fractions allowed)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present (clients too), else CPU")
    ray_address: str | None = Field(None, description="join this Ray cluster ('auto' or host:port) instead of starting one")
    ray_num_cpus: PositiveInt | None = Field(None, description="CPUs Ray may use when it starts locally (default: all)")
    clients_per_task: PositiveInt | Literal["auto"] = Field(
        1, description="simulated clients per Ray task (one Flower message); 'auto' packs each round into two "
                       "tasks per client slot, for large cohorts where per-message overhead dominates. "
                       "Results are identical for every value")


class OutputConfig(StrictModel):
    dir: str = Field("runs", description="parent of run directories (fedshift run --out picks one exactly)")
    tensorboard: bool = Field(True, description="write tensorboard/ event files")
    save_model: bool = Field(True, description="write the final weights to model.pt")
    checkpoint_every: PositiveInt | None = Field(None, description="write checkpoint.pt every N rounds (it is also "
                                                                   "written when the run is interrupted)")


class FaultsConfig(StrictModel):
    """Injected client faults: each client of each round draws at most one, seeded by (seed, round, client)."""

    raise_error: float = Field(0.0, ge=0, le=1, description="share of client updates that raise an exception")
    nan: float = Field(0.0, ge=0, le=1, description="share that return NaN weights")
    inf: float = Field(0.0, ge=0, le=1, description="share that return Inf weights")
    slow: float = Field(0.0, ge=0, le=1, description="share that take longer than faults.time_limit_s")
    drop: float = Field(0.0, ge=0, le=1, description="share that drop out (send no result)")
    crash: float = Field(0.0, ge=0, le=1, description="share that kill their Ray worker process")
    time_limit_s: float | None = Field(None, gt=0, description="replies later than this are not waited for "
                                                                "(default: no limit)")

    def shares(self) -> dict[str, float]:
        return {"raise": self.raise_error, "nan": self.nan, "inf": self.inf, "slow": self.slow, "drop": self.drop,
                "crash": self.crash}


class Scenario(StrictModel):
    name: str = Field("scenario", description="names the run directory")
    seed: int = Field(0, ge=0, description="seeds data splits, model init, cohorts and client training")
    rounds: PositiveInt = Field(64, description="training rounds (round 0 is the first)")
    clients_per_round: PositiveInt = Field(10, description="cohort size M; every mode needs at least M clients")
    modes: dict[str, ModeConfig] = Field(description="two or more modes; the first is 'day' (weight q(t))")
    data: DataConfig = Field(default_factory=DataConfig)
    shift: ShiftConfig = Field(default_factory=ShiftConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)

    @property
    def mode_names(self) -> list[str]:
        return list(self.modes)

    def clients_of_mode(self, name: str) -> int:
        return self.modes[name].clients or self.data.clients_per_mode

    def dataset_of_mode(self, name: str) -> DatasetSpec:
        ref = self.modes[name].dataset or self.data.dataset
        return DatasetSpec(name=ref) if isinstance(ref, str) else ref

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------------------------------- loading


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
    from .components import resolve_components  # registries import models and strategies; keep this lazy

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
