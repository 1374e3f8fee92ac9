"""gputally collector: one per cluster, in three parts, one folder each:

* ``live/``, the live path: gRPC ingest (``server``) -> message checks (``validate``) -> signed
  summaries into the record (``intake``) -> the live window and counters (``state``) ->
  Prometheus (``metrics``);
* ``record/``, the durable record: the SQLite file (``store``), its Merkle tree (``merkle``) and
  signed checkpoints (``ledger``), the enrolled keys (``keys``);
* ``audit/``, the auditor's side, reading only a record and public keys: ``verify`` (every
  signature, chain and checkpoint; proofs), ``figures`` (any period's figures from its
  summaries), ``report`` and ``census``; ``audit/cli`` defines `gputally audit`.

``cli`` defines `gputally collector`, `query` and `enroll`.
"""
