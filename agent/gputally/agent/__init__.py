"""gputally agent: what runs on every GPU node. It samples the node's GPUs, integrates them
into signed per-window summaries and streams both to the collector; ``sim/`` holds the
simulation that stands in for GPUs where there are none."""
