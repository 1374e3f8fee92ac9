"""gputally.v1: the agent -> collector contract, and the rules that read it.

Generated from ``telemetry.proto``: ``telemetry_pb2`` (messages) and ``telemetry_pb2_grpc``
(the Ingest service). Written by hand beside them, the small pure rules both sides interpret
those messages by, each in one place so that agent and collector can never count differently:

* ``accounting``: what a sample adds up to (GPU-seconds per measure, energy between counter
  readings, a MIG GPU's split among its owners), the measure and padding-rule names, and the
  bounds and verdicts of docs/utilization.md;
* ``signing``: the signing domains (summaries, a stream's proof of possession), their
  signatures, and the key files.

They depend on protobuf and cryptography only. The agent and the collector import this
package and never each other.
"""

# The distribution's version, sent in every Hello and Welcome. Written here, rather than read
# through importlib.metadata, because the agent daemon would carry that import's memory for
# nothing (a test keeps it equal to pyproject.toml's).
__version__ = "0.1.0"

# The minor revision of v1 this code speaks (Hello.protocol_revision). Revisions only add
# optional fields and messages; 0 means the field was never set, which no gputally agent does.
# Revision 2 added the Challenge and Proof: a revision-1 agent cannot prove its key, so its
# live reports count only on a collector without enrolled keys, marked unauthenticated.
# Revision 3 added GpuSample.totals and Hello.report_interval_seconds: an agent may report
# less often than it samples without losing a second.
PROTOCOL_REVISION = 3
