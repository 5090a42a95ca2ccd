"""The scenario: a strict, validated description of one simulated federation (pure data).

Every problem is reported with its key path (``shift.period: must be >= 2``). Components chosen by name
(dataset, model architecture, server strategy, client training strategy) declare their own parameters as a
pydantic model ``Params``; loading (fedshift/scenario.py) validates those parameters against it and writes them
back with their defaults, so a resolved scenario re-runs exactly as it ran.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field

from .core.params import ComponentRef, NamedComponent, PositiveInt, StrictModel


class TransformSpec(StrictModel):
    name: Literal["invert", "rotate", "hflip", "vflip"]
    degrees: float = 0.0


class DatasetSpec(NamedComponent):
    name: str = "digits"



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
        1, description="simulated clients per pack: the clients one worker plays in a row, and that an injected "
                       "crash ends together. A round sends one message per client slot with its share of the "
                       "packs, by size; 'auto' makes packs of clients_per_round / (2 x slots). "
                       "Results are identical for every value")
    share_data: bool = Field(True, description="worker processes of one machine map one shared copy of the "
                                               "training data (built by the first) instead of each building its own")
    data_dir: str | None = Field(None, description="folder of that shared copy (default: the system's temporary "
                                                   "folder); removed when the run ends")


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
