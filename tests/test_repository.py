"""The repository keeps its promises: README and CI run the same tests; deploy files are valid."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .conftest import require_binary

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(python3 -m venv .*?)\n```", text)


def test_readme_opens_with_the_demo_and_the_test_command() -> None:
    demo, tests = readme_commands()[:2]
    assert "gputally demo" in demo
    assert "pytest" in tests and "mypy" in tests and "ruff check" in tests


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_prometheus_scrape_configuration_is_valid() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_version_is_the_distributions() -> None:
    import tomllib

    from gputally.agent import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert __version__ == project["version"]


def test_the_agents_own_commands_are_the_ones_it_registers() -> None:
    import argparse

    from gputally.agent import cli

    own = cli.register(argparse.ArgumentParser().add_subparsers())
    assert tuple(own) == cli.OWN_COMMANDS
    # built for one of them, the parser has just these; otherwise every plugged-in command
    assert set(cli.build_parser("agent")[1]) == set(own)
    every = set(cli.build_parser(None)[1])
    assert set(own) < every and {"collector", "query", "enroll", "audit"} <= every
