"""The ClientApp: train locally from the global model; attackers send a sign-flipped update."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .task import make_model, train

app = ClientApp()


@app.train()
def fit(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    parts = int(context.node_config["num-partitions"])
    cfg = context.run_config
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    rnd = int(msg.content["config"]["server-round"])
    examples = train(model, partition, parts, int(cfg["local-steps"]), float(cfg["lr"]), seed=1000 * rnd + partition)
    state = model.state_dict()
    if str(partition) in str(cfg["attackers"]).split(","):  # sign flip: push the model the other way, harder
        scale = float(cfg["attack-scale"])
        state = {k: glob[k] - scale * (v - glob[k]) for k, v in state.items()}
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": examples})})
    return Message(content=content, reply_to=msg)
