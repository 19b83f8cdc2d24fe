"""The hostile ServerApp: asks every connected SuperNode once and records the answers."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    asks = [Message(RecordDict({"ask": ConfigRecord({"x": 1})}), dst_node_id=node,
                    message_type=MessageType.QUERY) for node in nodes]
    answers = {}
    for reply in grid.send_and_receive(asks, timeout=240):
        node = str(reply.metadata.src_node_id)
        if reply.has_error():
            answers[node] = {"error": reply.error.reason, "code": int(reply.error.code)}
        else:
            answers[node] = dict(reply.content["loot"])
    out = Path(str(context.run_config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "replies.json").write_text(json.dumps({"asked": len(nodes), "answers": answers}))
