"""The Flower ClientApp: plays whichever simulated client the server names in the message.

Importable module on purpose: module globals (the cached ``World``) persist inside each Ray actor, while a
ClientApp defined in ``__main__`` would be re-pickled and rebuilt on every message.
"""

from __future__ import annotations

import traceback

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..strategies.base import ClientInstruction
from .transport import CID, ROUND, SCENARIO, arrays_to_record, metrics_record, pack_state, record_to_arrays, unpack_state
from .world import world_for

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    content = msg.content
    cfg = dict(content.config_records["config"])
    cid, server_round = int(cfg.pop(CID)), int(cfg.pop(ROUND))
    try:
        world = world_for(str(cfg.pop(SCENARIO)))
        state = unpack_state(content)
        instruction = ClientInstruction(cid, record_to_arrays(content.array_records.get("arrays")), cfg)
        result, trainer_stats = world.run_client(instruction, server_round, state,
                                                 record_to_arrays(content.array_records.get("trainer.server")))
    except Exception as exc:  # reported to the server, which counts the client as failed and goes on
        reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
        return Message(RecordDict({"error": ConfigRecord({"reason": reason, CID: cid})}), reply_to=msg)
    reply = RecordDict({
        "arrays": arrays_to_record(result.arrays),
        "stats": arrays_to_record(result.stats),
        "trainer.stats": arrays_to_record(trainer_stats),
        "metrics": metrics_record(result.metrics, result.num_examples),
        "meta": ConfigRecord({CID: cid}),
    })
    pack_state(reply, state)
    return Message(reply, reply_to=msg)
