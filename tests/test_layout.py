"""The layout keeps its promises: what each part may import, and what each command loads.

The agent and the collector share the protocol and its rules (gputally.v1) and the command's
front door (gputally.cli), never each other's code; inside the collector the live path, the
record and the auditor's side depend only downwards (live -> record, audit -> record). An
auditor's command must not load the agent, psutil or the kubelet's API, nor the agent daemon
the collector.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .factories import T0, empty_ledger, summary

ROOT = Path(__file__).resolve().parents[1]


def imports(folder: Path) -> dict[str, set[str]]:
    """Every module each file under `folder` imports, relative imports resolved."""
    out: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        package = path.parent.relative_to(folder.parent).as_posix().split("/")
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    names.add(".".join([*base, node.module] if node.module else base))
                else:
                    names.add(node.module or "")
        out[str(path.relative_to(ROOT))] = names
    return out


def offenders(folder: Path, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {
        path: sorted(n for n in names if n.startswith(forbidden))
        for path, names in imports(folder).items()
    }
    return {path: names for path, names in found.items() if names}


def test_the_agent_and_the_collector_never_import_each_other() -> None:
    assert offenders(ROOT / "agent" / "gputally", ("gputally.collector",)) == {}
    assert offenders(ROOT / "collector" / "gputally", ("gputally.agent",)) == {}
    assert offenders(ROOT / "cli" / "gputally", ("gputally.agent", "gputally.collector")) == {}


def test_the_shared_rules_depend_on_protobuf_and_cryptography_only() -> None:
    allowed = ("gputally.v1", "google.protobuf", "cryptography", "__future__")
    for path, names in imports(ROOT / "proto" / "gputally").items():
        third_party = {n for n in names if n.split(".")[0] not in sys.stdlib_module_names}
        assert {n for n in third_party if not n.startswith(allowed)} == set(), path


def test_the_collector_depends_downwards_only() -> None:
    collector = ROOT / "collector" / "gputally" / "collector"
    package = "gputally.collector"
    assert offenders(collector / "record", (f"{package}.live", f"{package}.audit")) == {}
    assert offenders(collector / "audit", (f"{package}.live",)) == {}
    assert offenders(collector / "live", (f"{package}.audit",)) == {}


def test_simulation_is_not_imported_by_what_runs_on_a_node() -> None:
    node_code = {
        path: names
        for path, names in imports(ROOT / "agent" / "gputally").items()
        if "/sim/" not in path and not path.endswith("agent/cli.py")
    }
    # The agent command imports the mock only for --backend mock, inside its handler.
    assert {
        p: sorted(n for n in ns if ".sim" in n)
        for p, ns in node_code.items()
        if any(".sim" in n for n in ns)
    } == {}


def loaded_by(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_the_audit_commands_load_no_agent_module_no_psutil_and_no_kubelet_api(
    tmp_path: Path,
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gputally.agent.chain import SummarySigner

    keys, store, record, ledger = empty_ledger(tmp_path)
    signer = SummarySigner(Ed25519PrivateKey.generate(), "n1")
    store.enroll("n1", signer.public_key)
    signed = signer.sign(summary(T0))
    record.append("n1", 1, 1, int(T0 * 1e9), int((T0 + 60) * 1e9), T0, signed.SerializeToString())
    assert ledger.checkpoint(T0)
    record.close()
    db = tmp_path / "ledger.db"
    out = tmp_path / "report"
    for command in (
        f"['audit', 'verify', '--ledger', '{db}', '--keys', '{keys}']",
        f"['audit', 'census', '--ledger', '{db}', '--keys', '{keys}']",
        f"['audit', 'report', '--ledger', '{db}', '--keys', '{keys}', '--from', '{T0}',"
        f" '--to', '{T0 + 60}', '--expected-gpus', '1', '--out', '{out}']",
        f"['query', '--db', '{db}', '--expected-gpus', '1']",
    ):
        loaded = loaded_by(f"from gputally.cli.main import main\nassert main({command}) == 0")
        assert "gputally.collector.audit.verify" in loaded or "query" in command
        agent = sorted(m for m in loaded if m.startswith("gputally.agent"))
        assert agent == [], command
        assert {
            "psutil",
            "gputally.kubelet.v1.podresources_pb2",
            "grpc",
            "pynvml",
        } & loaded == set(), command


@pytest.mark.parametrize("backend_args", [["--backend", "mock", "--once", "--json"]])
def test_the_agent_loads_no_collector_module(tmp_path: Path, backend_args: list[str]) -> None:
    loaded = loaded_by(
        "from gputally.cli.main import main\n"
        f"assert main(['agent', *{backend_args!r}, '--state-dir', '{tmp_path}']) == 0"
    )
    assert sorted(m for m in loaded if m.startswith("gputally.collector")) == []
    # what the daemon would carry for nothing: the metadata reader, and the exporter's
    # prometheus_client when --metrics-listen is off
    assert {"importlib.metadata", "prometheus_client"} & loaded == set()
