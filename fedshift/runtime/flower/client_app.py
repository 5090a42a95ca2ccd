"""The Flower ClientApp: plays whichever simulated clients the server names in the message.

Importable module on purpose: module globals (the cached ``World``) persist inside each Ray actor, while a
ClientApp defined in ``__main__`` would be re-pickled and rebuilt on every message.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedshift.runtime.executors import failure_text
from fedshift.runtime.faults import DroppedOut
from fedshift.runtime.flower.transport import SCENARIO, add_error, add_reply, unpack_instructions
from fedshift.runtime.worker import world_for

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = RecordDict()
    try:
        pack = unpack_instructions(msg.content)
        world = world_for(pack.scenario_text)
    except Exception as exc:  # the whole pack fails; the server counts each of its clients
        add_error(reply, 0, failure_text(exc))
        return Message(reply, reply_to=msg)
    for i, task in enumerate(pack.tasks):
        t0 = time.perf_counter()
        try:
            result, trainer_stats = world.run_client(task.instruction, pack.server_round, task.state, pack.broadcast)
        except DroppedOut:  # an injected drop-out: nothing is sent for this client
            continue
        except Exception as exc:  # reported to the server, which counts the client as failed and goes on
            add_error(reply, i, failure_text(exc))
            continue
        add_reply(reply, i, result.arrays, result.stats, trainer_stats, result.metrics, result.num_examples, task.state,
                  compute_s=time.perf_counter() - t0)
    return Message(reply, reply_to=msg)


@app.query()
def warm_up(msg: Message, context: Context) -> Message:
    """Build this process's World before the first round, so start-up is not charged to round 0 (or to
    the clients' time limit). Errors here are real errors of the scenario and end the run."""
    world_for(str(msg.content.config_records["config"][SCENARIO])).warm_up()
    return Message(RecordDict(), reply_to=msg)

