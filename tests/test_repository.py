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

    from gputally.v1 import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert __version__ == project["version"]


def test_each_command_loads_only_its_own_module() -> None:
    from gputally.cli import main

    _, commands = main.build_parser("agent")
    assert set(commands) == {"agent"}  # the daemon builds its parser alone
    every = set(main.build_parser(None)[1])
    assert every == set(main.COMMANDS)
    for name, module in main.COMMANDS.items():
        assert name in main.build_parser(name)[1], (name, module)


def test_every_test_the_reliability_guarantees_cite_exists() -> None:
    """docs/reliability.md backs each guarantee with a test: each one it names must exist, so
    that a renamed or deleted test cannot leave a guarantee unbacked in the docs."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    tests = {path.name: path.read_text() for path in (ROOT / "tests").glob("test_*.py")}
    cited: list[tuple[str, str]] = []
    current = ""
    for file, function, bare in re.findall(
        r"(test_\w+\.py)(?:::(test_\w+))?|(test_\w+)(?![\w.])", text
    ):
        current = file or current  # a bare name is in the file named last before it
        cited.append((current, function or bare))
    assert len(cited) > 30
    missing = [(f, n) for f, n in cited if f not in tests or (n and f"def {n}(" not in tests[f])]
    assert missing == []
