import torch
from fedshift.strategies.base import ClientInstruction
from flwr.app import RecordDict

from fedshift.runtime.flower.transport import (
    add_error,
    add_reply,
    pack_instructions,
    unpack_instructions,
    unpack_reply,
)


def test_pack_round_trip_sends_shared_tensors_once():
    shared = torch.arange(6.0).reshape(2, 3)
    own = torch.ones(3)
    ins = [ClientInstruction(7, {"w": shared, "b": own}, {"branch": 1}),
           ClientInstruction(9, {"w": shared}, {"branch": 0, "tag": "x"})]
    states = [{"count": 3, "ema": torch.zeros(2)}, {}]
    content = pack_instructions(ins, states, 5, "name: s", {"moments": torch.ones(4)})
    assert len(content.array_records["arrays"]) == 2  # w once, b once
    pack = unpack_instructions(content)
    assert pack.server_round == 5 and pack.scenario_text == "name: s"
    assert [t.instruction.cid for t in pack.tasks] == [7, 9]
    assert torch.equal(pack.tasks[0].instruction.arrays["w"], shared)
    assert torch.equal(pack.tasks[0].instruction.arrays["b"], own) and "b" not in pack.tasks[1].instruction.arrays
    assert pack.tasks[1].instruction.config == {"branch": 0, "tag": "x"}
    assert pack.tasks[0].state["count"] == 3 and torch.equal(pack.tasks[0].state["ema"], torch.zeros(2))
    assert pack.tasks[1].state == {} and torch.equal(pack.broadcast["moments"], torch.ones(4))


def test_the_messages_of_a_round_serialise_a_shared_tensor_once():
    model = {"w": torch.randn(4, 3), "steps": torch.tensor(3)}
    own = torch.ones(2)
    cache: dict = {}
    first = pack_instructions([ClientInstruction(1, model, {})], [{}], 2, "s", {}, cache)
    second = pack_instructions([ClientInstruction(2, {**model, "b": own}, {})], [{}], 2, "s", {}, cache)
    assert len(cache) == 3  # w and steps once for both messages, b for the second
    assert first.array_records["arrays"]["t0"].data is second.array_records["arrays"]["t0"].data
    got = unpack_instructions(second).tasks[0].instruction.arrays
    assert torch.equal(got["w"], model["w"]) and got["steps"].dtype == torch.int64 and torch.equal(got["b"], own)
    # without a cache each message serialises its own copy (the same values)
    alone = pack_instructions([ClientInstruction(1, model, {})], [{}], 2, "s", {})
    assert alone.array_records["arrays"]["t0"].data is not first.array_records["arrays"]["t0"].data
    assert alone.array_records["arrays"]["t0"].data == first.array_records["arrays"]["t0"].data


def test_model_arrays_and_algorithm_arrays_travel_apart():
    centers = torch.randn(2, 4)
    weights = torch.ones(3)
    ins = [ClientInstruction(1, {"w": weights}, {}, {"centers": centers}), ClientInstruction(2, {"w": weights})]
    content = pack_instructions(ins, [{}, {}], 0, "name: s", {})
    assert len(content.array_records["arrays"]) == 2  # w once, centers once
    first, second = (t.instruction for t in unpack_instructions(content).tasks)
    assert list(first.arrays) == ["w"] and list(first.extra) == ["centers"]
    assert torch.equal(first.extra["centers"], centers) and second.extra == {} and list(second.arrays) == ["w"]


def test_a_worker_refuses_non_parameters_among_the_model_arrays():
    import pytest

    from fedshift.runtime.worker import World
    from fedshift.scenario import load_scenario

    world = World.build(load_scenario("default", ["data.clients_per_mode=10", "output.tensorboard=false"]))
    arrays = {k: v.clone() for k, v in world.model.state_dict().items()} | {"fedtkm.centers": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"\['fedtkm.centers'\] are not parameters of the model.*extra"):
        world.run_client(ClientInstruction(0, arrays), 0, {})


def test_reply_round_trip_with_a_failed_client():
    content = RecordDict()
    add_reply(content, 0, {"w": torch.ones(2)}, {"centers": torch.zeros(1)}, {"mu": torch.ones(1)},
              {"loss": 0.5}, 12, {"n": 2})
    add_error(content, 1, "ValueError: boom")
    ok, bad, missing = unpack_reply(content, 0), unpack_reply(content, 1), unpack_reply(content, 2)
    assert ok.error is None and ok.num_examples == 12 and ok.metrics == {"loss": 0.5} and ok.state == {"n": 2}
    assert torch.equal(ok.arrays["w"], torch.ones(2)) and "centers" in ok.stats and "mu" in ok.trainer_stats
    assert bad.error == "ValueError: boom" and missing.error is not None
