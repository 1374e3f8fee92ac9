"""Simulation: GPU nodes that exist only in a scenario file, for every machine without GPUs.

Nothing here runs on a GPU node. ``scenario`` reads the TOML that describes a cluster, its
workloads and its faults; ``mock`` is a fake of the pynvml functions the agent calls, driven by
a scenario and a clock; ``fleet`` runs a whole cluster of real agents over mocks, in real or
virtual time; ``demo`` is ``gputally demo``; ``cli`` defines ``simulate`` and ``demo``.
"""
