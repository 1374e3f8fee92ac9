"""The collector's live path: agent streams in, the live window and counters out to Prometheus."""
