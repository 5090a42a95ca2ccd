"""The ``flower`` baseline of ``fedshift bench``: a plain Flower simulation written the way Flower's
quickstart tutorials write one (Message API). Not used by fedshift itself.

One supernode per client; the ClientApp builds its model and loads its partition into a DataLoader on every
call (the dataset itself is cached per process, as the tutorials cache their FederatedDataset); the server
runs flwr's own ``FedAvg.start`` with ``fraction_train = clients_per_round / clients``.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch.utils.data import DataLoader, TensorDataset

_cache: dict[str, object] = {}


def _federation(scenario_text: str):
    if scenario_text not in _cache:
        from fedshift.data import build_federation
        from fedshift.scenario import parse_yaml, validate_scenario

        scenario = validate_scenario(parse_yaml(scenario_text, "bench"))
        _cache.clear()
        _cache[scenario_text] = (scenario, build_federation(scenario))
    return _cache[scenario_text]


def _net(scenario, fed):
    from fedshift.build import build_model

    return build_model(scenario, fed.input_shape, fed.num_classes)


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    scenario, fed = _federation(str(msg.content["config"]["scenario"]))
    model = _net(scenario, fed)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid = int(context.node_config["partition-id"])
    sl = fed.client_slice(pid)
    loader = DataLoader(TensorDataset(torch.from_numpy(fed.train_x[sl]), torch.from_numpy(fed.train_y[sl])),
                        batch_size=scenario.client.batch_size, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=scenario.client.lr)
    model.train()
    total = 0.0
    for _ in range(scenario.client.local_epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x).logits[:, 0], y)
            loss.backward()
            opt.step()
            total += loss.item()
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"train_loss": total, "num-examples": len(loader.dataset)})})
    return Message(content=reply, reply_to=msg)


def run(scenario) -> tuple[list[float], float, list[float]]:
    """Run the plain Flower simulation; returns the seconds of each round, the seconds from the start to the
    end of the first round, and the driver's RSS (MB) after each round."""
    from flwr.simulation import run_simulation

    from fedshift.apps.probes import rss_mb
    from fedshift.runtime.flower.runtime import backend_config

    text = scenario.to_yaml()
    _, fed = _federation(text)
    n = fed.num_clients
    stamps: list[float] = []
    driver_mb: list[float] = []
    t0 = time.perf_counter()
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=scenario.clients_per_round / n, fraction_evaluate=0.0,
                          min_train_nodes=scenario.clients_per_round, min_available_nodes=n)
        initial = ArrayRecord(_net(scenario, fed).state_dict())

        def timestamp(server_round: int, arrays: ArrayRecord):
            stamps.append(time.perf_counter())
            driver_mb.append(rss_mb())
            return None

        strategy.start(grid=grid, initial_arrays=initial, num_rounds=scenario.rounds,
                       train_config=ConfigRecord({"scenario": text}), evaluate_fn=timestamp)

    backend = backend_config(scenario)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # flwr's per-round INFO lines would bury the table
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n, backend_config=backend)
    finally:
        flwr_logger.setLevel(level)
    rounds = [b - a for a, b in zip(stamps, stamps[1:])]
    return rounds, stamps[1] - t0, driver_mb[1:]
