"""gputally collector: receives agent streams, aggregates cluster utilization, exposes it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gputally")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
