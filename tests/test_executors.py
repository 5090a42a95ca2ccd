"""The one round loop over its two executors: the in-process executor gives Flower's metrics exactly.

For the same scenario and seed, ``metrics.csv`` of a run through Flower and Ray and of the same run in process
are identical in every column but the time columns: cohorts, training (client states and the trainer's
broadcast included), aggregation, failures and evaluation. The in-process path imports neither flwr nor ray.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
from fedshift.strategies.base import ClientInstruction

from fedshift import load_scenario, run_scenario
from fedshift.runtime.flower.executor import lanes_of

BASE = ["rounds=4", "clients_per_round=4", "eval.every=2", "output.tensorboard=false", "output.save_model=false"]
CASES = {
    "fedavg-erm": [],
    "fedtkm": ["strategy.name=fedtkm"],
    # client state across rounds (irm's step counter) and mixed clients
    "fedavg-irm": ["client.strategy=irm", "data.mix=0.3"],
    # the trainer's server broadcast (CORAL's shared moments) and a multi-branch strategy's evaluation
    "ifca-coral": ["strategy.name=ifca", "client.strategy=coral"],
    # injected faults: raising, dropping out and non-finite clients are counted the same way (a crash is not
    # compared: on Ray a dying worker can also fail messages sent to it while it restarts)
    "faults": ["faults.raise_error=0.15", "faults.drop=0.15", "faults.nan=0.1"],
}


def _frame(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    return df[[c for c in df.columns if not c.startswith("time/")]]


RAY_RUNS = {f"executors-{name}": [*BASE, *extra] for name, extra in CASES.items()}  # the session's Ray runtime


@pytest.mark.e2e
def test_inprocess_executor_gives_flowers_metrics(tmp_path, ray_outcomes):
    for name in CASES:
        via_flower, sim = ray_outcomes[f"executors-{name}"]
        assert not isinstance(via_flower, BaseException), (name, via_flower)
        in_process = run_scenario(sim.scenario, out=tmp_path / f"inproc-{name}", executor="inprocess")
        a = _frame(pd.read_csv(via_flower.out_dir / "metrics.csv"))
        b = _frame(pd.read_csv(in_process.out_dir / "metrics.csv"))
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
        if name == "faults":
            assert a["clients/failed"].sum() > 0  # the case exercises failures


def test_inprocess_run_needs_neither_flwr_nor_ray(tmp_path):
    code = f"""
import sys
sys.modules["flwr"] = None  # any import of flwr or ray now raises
sys.modules["ray"] = None
import fedshift
s = fedshift.load_scenario("default", {[*BASE, "rounds=2", "strategy.name=fedtkm"]!r})
r = fedshift.run_scenario(s, out={str(tmp_path / "run")!r}, executor="inprocess")
assert len(r.rows) == 2 and 0 <= r.rows[-1]["eval/all/accuracy"] <= 1
assert (r.out_dir / "metrics.csv").is_file() and (r.out_dir / "summary.json").is_file()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_unknown_executor_is_a_clear_error(tmp_path):
    from fedshift.core.errors import FedshiftError
    from fedshift.runtime import Simulation, run

    sim = Simulation(load_scenario("default", [*BASE, "rounds=1"]), out=tmp_path / "r")
    with pytest.raises(FedshiftError, match="executor 'threads' is not one of flower, inprocess"):
        run(sim, "threads")


def test_an_injected_crash_fails_its_pack_in_process_without_killing_the_process(tmp_path):
    s = load_scenario("default", [*BASE, "rounds=3", "faults.crash=0.2", "backend.clients_per_task=2"])
    r = run_scenario(s, out=tmp_path / "r", executor="inprocess")
    crashed = sum(row["clients/failed/crashed"] for row in r.rows)
    assert crashed > 0 and crashed % 2 == 0  # whole packs of two
    assert all(row["clients/failed/crashed"] == row["clients/failed"] for row in r.rows)


def test_the_clients_phase_is_split_into_serialisation_compute_and_transport(tmp_path):
    from fedshift.runtime.executors import UnpackedReply, phase_times

    replies = [UnpackedReply(None, compute_s=s) for s in (1.0, 2.0, 4.0)]
    assert phase_times(replies, [[0, 1], [2]], 0.5) == {"time/serialise_s": 0.5, "time/client_compute_s": 7.0,
                                                        "time/client_critical_s": 4.0}
    assert phase_times(replies, [[0, 1, 2]], 0.0)["time/client_critical_s"] == 7.0  # one lane: in a row
    result = run_scenario(load_scenario("default", [*BASE, "rounds=2"]), out=tmp_path / "r", executor="inprocess")
    for row in result.rows:  # in process every client runs in a row: the critical path is the whole compute
        assert row["time/client_critical_s"] == row["time/client_compute_s"] > 0
        assert row["time/serialise_s"] + row["time/client_compute_s"] <= row["time/clients_s"] + 1e-9
        assert row["time/transport_s"] >= 0


def _sim(sizes: dict[int, int], p: int = 1, faults: str = "") -> SimpleNamespace:
    """What ``lanes_of`` reads of a simulation: packing, faults, seed and the clients' sizes."""
    s = load_scenario("default", [*BASE, *([faults] if faults else [])])
    fed = SimpleNamespace(client_size=lambda cid: sizes[cid])
    return SimpleNamespace(clients_per_task=p, scenario=s, world=SimpleNamespace(federation=fed))


def test_a_round_is_one_message_per_slot_shared_by_size_biggest_first():
    sizes = {10: 50, 11: 10, 12: 40, 13: 30, 14: 30}
    ins = [ClientInstruction(cid, {}, {}) for cid in sizes]
    lanes = lanes_of(_sim(sizes), 0, ins, slots=2)
    assert lanes == [[0, 4], [1, 2, 3]]  # 50+30 against 40+30+10
    assert lanes_of(_sim(sizes), 0, ins, slots=8) == [[0], [2], [3], [4], [1]]  # no empty message; biggest first
    assert lanes_of(_sim(sizes, p=2), 0, ins, slots=2) == [[2, 3], [0, 1, 4]]  # packs stay whole: 70 | 60+30


def test_a_client_drawn_to_crash_or_be_slow_travels_alone():
    from fedshift.runtime.faults import draw_fault

    sim = _sim({c: 10 for c in range(40)}, faults="faults={crash: 0.1, slow: 0.1, time_limit_s: 5}")
    ins = [ClientInstruction(c, {}, {}) for c in range(40)]
    lanes = lanes_of(sim, 3, ins, slots=2)
    bad = [i for i in range(40) if draw_fault(sim.scenario.faults, sim.scenario.seed, 3, i) in ("crash", "slow")]
    assert bad and lanes[2:] == [[i] for i in bad]
    assert sorted(i for lane in lanes for i in lane) == list(range(40))  # every client once
    assert not set(bad) & set(lanes[0] + lanes[1])


def test_after_a_crash_the_slots_are_queried_until_they_answer_and_a_real_error_ends_the_run(monkeypatch):
    from fedshift.runtime.flower import executor as fe

    monkeypatch.setattr(fe.time, "sleep", lambda s: None)
    restarting = "<class 'ray.exceptions.ActorUnavailableError'>: The actor is restarting"

    def executor(rounds_of_errors: list[list[str]]) -> fe.FlowerExecutor:
        ex = fe.FlowerExecutor(grid=None)
        ex.nodes, ex.slots, ex.asked = [1, 2, 3], 2, []
        ex._query = lambda sim, nodes: ex.asked.append(list(nodes)) or rounds_of_errors.pop(0)  # one per call
        return ex

    ex = executor([[restarting], [restarting, restarting], []])
    ex._heal(SimpleNamespace())
    assert ex.asked == [[1, 2]] * 3  # one query per slot, until every slot answered
    ex = executor([[restarting], ["ClientAppException: cannot build the data"], []])
    with pytest.raises(RuntimeError, match="cannot build the data"):
        ex._heal(SimpleNamespace())
    assert len(ex.asked) == 2
