"""The keys that travel between the coordinator and the sites: one home for both sides.

``server/`` writes what ``client/`` reads and the reverse; neither imports the other, so
every key either side names lives here. Flower's own keys are listed where our code has to
spell them (Flower's strategies set ``server-round`` and, FedProx, ``proximal-mu``).
"""

from __future__ import annotations

# -- a message's content (RecordDict) ----------------------------------------------------
ARRAYS_KEY = "arrays"  # ArrayRecord: the model, both ways
CONFIG_KEY = "config"  # ConfigRecord of a train / evaluate message (Flower's strategies)
METRICS_KEY = "metrics"  # MetricRecord of a site's reply
SITE_RECORD = "site"  # ConfigRecord of a site's reply: {"name": "<site name>"}
TRANSPORT_RECORD = "transport"  # ConfigRecord beside packed weights: {"manifest": json}
FLAT_KEY = "flat"  # the packed vector's name in a packed ArrayRecord (m2diff/transport.py)

# -- the ConfigRecord of a train / evaluate message (coordinator -> site) -----------------
SERVER_ROUND_KEY = "server-round"  # set by Flower's strategies
PROXIMAL_MU_KEY = "proximal-mu"  # set by Flower's FedProx
CLIPPING_KIND_KEY = "central-dp-clipping"  # privacy=central_dp: "fixed" | "adaptive"

# -- the MetricRecord of a site's reply (site -> coordinator) -----------------------------
WEIGHT_KEY = "num-examples"  # FedAvg's weight: train slices, or evaluated test subjects
DP_EPSILON_KEY = "dp_epsilon"  # privacy=dp: the site's cumulative epsilon, in every train reply
DP_EPSILON_NEXT_KEY = "dp_epsilon_next"  # privacy=dp: what this round took it to (or would have)
REFUSED_KEY = "dp_refused"  # privacy=dp: 1 when a site's budget is spent and it did not train

# -- the run config (``flwr run --run-config``; pyproject.toml [tool.flwr.app.config]) -----
OUT_DIR_KEY = "out-dir"  # absolute folder of checkpoint.pt, rounds.csv/json/png
OVERRIDES_KEY = "overrides"  # the Hydra overrides both sides compose (fedutil.compose_run_config)
SIM_SITES_KEY = "sim-sites"  # simulation only: site folders, indexed by partition-id
REGISTERED_SITES_KEY = "registered-sites"  # "NODE_ID=NAME ...": registered SuperNode keys
RUN_CONFIG_KEYS = (OUT_DIR_KEY, OVERRIDES_KEY, SIM_SITES_KEY, REGISTERED_SITES_KEY)

# -- a site's node config (``flower-supernode --node-config``, m2diff-client) --------------
DATA_PATH_KEY = "data-path"
SITE_NAME_KEY = "site-name"
REQUIRE_PRIVACY_KEY = "require-privacy"  # the privacy a hospital insists on
PARTITION_ID_KEY = "partition-id"  # Flower's simulation engine: which virtual SuperNode
NUM_PARTITIONS_KEY = "num-partitions"

# -- the coordinator's round rows (rounds.json) ----------------------------------------------
EPSILON_KEYS = ("train_dp_epsilon", "central_dp_epsilon")  # sample level (per site), client level
