"""gputally agent: samples the GPUs of one node and streams the readings to the collector."""

# The distribution's version, written here rather than read through importlib.metadata, whose
# imports the agent daemon would carry for nothing (a test keeps it equal to pyproject.toml's).
__version__ = "0.1.0"
