"""The collector's durable record: every signed summary, verbatim, as a Merkle log with signed
checkpoints, and the keys that may sign into it."""
