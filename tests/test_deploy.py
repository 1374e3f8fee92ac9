"""The deployment files, checked by the tools that will run them.

promtool checks the scrape configuration and the rules and runs the rules' unit tests;
kubernetes-validate checks the manifests against the Kubernetes API schemas; systemd-analyze
verifies the units; the daemons themselves parse the configuration the manifests give them.
The generated files (monitoring.yaml, docs/configuration.md) must be in step with their
sources. A real Prometheus evaluating the rules and the dashboard: tests/test_prometheus.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import require_binary

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules"
K8S = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # schemas checked against; the manifests use only stable APIs


def run(*command: str | Path, **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=120, **options
    )


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# -- Prometheus ---------------------------------------------------------------------------


def test_promtool_checks_the_scrape_configuration_and_its_rules() -> None:
    promtool = require_binary("promtool")
    checked = run(promtool, "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # the configuration loads both rule files (promtool checks them as part of the config)
    assert "recording.yml" in checked.stdout and "alerts.yml" in checked.stdout


def test_promtool_checks_the_rules() -> None:
    promtool = require_binary("promtool")
    checked = run(promtool, "check", "rules", RULES / "recording.yml", RULES / "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 21 rules found" in checked.stdout  # recording
    assert "SUCCESS: 21 rules found" in checked.stdout  # alerts


@pytest.mark.parametrize("tests", ["recording_test.yml", "alerts_test.yml"])
def test_promtool_unit_tests_of_the_rules(tests: str) -> None:
    promtool = require_binary("promtool")
    checked = run(promtool, "test", "rules", tests, cwd=RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_every_alert_has_a_unit_test() -> None:
    alerts = {r["alert"] for g in documents(RULES / "alerts.yml")[0]["groups"] for r in g["rules"]}
    tested = {
        case["alertname"]
        for test in documents(RULES / "alerts_test.yml")[0]["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == tested


def test_every_recording_rule_has_a_unit_test() -> None:
    records = {
        r["record"] for g in documents(RULES / "recording.yml")[0]["groups"] for r in g["rules"]
    }
    text = (RULES / "recording_test.yml").read_text()
    tested = set(re.findall(r"expr: (gputally:[a-z_:0-9]+)", text))
    # every rule of the 1 h group is tested; 1 d and 30 d repeat it over longer ranges
    assert {r for r in records if r.endswith("1h")} <= tested, {
        r for r in records if r.endswith("1h")
    } - tested
    assert {r.rsplit("_", 1)[0] for r in tested} | {r.rsplit(":", 1)[0] for r in tested}


# -- generated files ------------------------------------------------------------------------


def test_the_prometheus_operator_objects_are_in_step_with_the_rules() -> None:
    checked = run(sys.executable, ROOT / "scripts" / "gen-monitoring", "--check")
    assert checked.returncode == 0, checked.stderr
    objects = {d["kind"]: d for d in documents(K8S / "monitoring.yaml")}
    assert set(objects) == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    groups = [
        *documents(RULES / "recording.yml")[0]["groups"],
        *documents(RULES / "alerts.yml")[0]["groups"],
    ]
    assert objects["PrometheusRule"]["spec"]["groups"] == groups


def test_the_configuration_reference_is_in_step_with_the_commands() -> None:
    checked = run(sys.executable, ROOT / "scripts" / "gen-config-doc", "--check")
    assert checked.returncode == 0, checked.stderr
    text = (ROOT / "docs" / "configuration.md").read_text()
    for option in ("GPUTALLY_AGENT_COLLECTOR", "GPUTALLY_COLLECTOR_EXPECTED_GPUS", "`--keys`"):
        assert option in text


# -- Kubernetes -------------------------------------------------------------------------------


def _manifests() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for document in documents(K8S / name):
            out[(document["kind"], document["metadata"]["name"])] = document
    return out


def test_the_manifests_pass_the_kubernetes_schemas(tmp_path: Path) -> None:
    validate = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert validate, "kubernetes-validate comes with the dev extra"
    files = documents(K8S / "kustomization.yaml")[0]["resources"]
    checked = run(validate, "--strict", "-k", KUBERNETES_VERSION, *files, cwd=K8S)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("INFO") >= 10, checked.stdout  # each object said valid


def test_the_schema_check_catches_a_mistake(tmp_path: Path) -> None:
    # the same tool on a DaemonSet with a misspelt field: it must say so (strict mode)
    validate = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert validate
    broken = (K8S / "agent.yaml").read_text().replace("hostPID: true", "hostPid: true")
    (tmp_path / "agent.yaml").write_text(broken)
    checked = run(validate, "--strict", "-k", KUBERNETES_VERSION, tmp_path / "agent.yaml")
    assert checked.returncode != 0 and "hostPid" in checked.stdout + checked.stderr


def test_the_manifests_hold_together() -> None:
    objects = _manifests()
    daemonset = objects[("DaemonSet", "gputally-agent")]
    deployment = objects[("Deployment", "gputally-collector")]
    service = objects[("Service", "gputally-collector")]
    # selectors select the pods they are meant to
    for workload in (daemonset, deployment):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    # service ports name container ports that exist
    container_ports = {
        p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    # the monitors find the service port and the agents' port
    monitoring = {d["kind"]: d for d in documents(K8S / "monitoring.yaml")}
    assert monitoring["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert {e["port"] for e in monitoring["ServiceMonitor"]["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }
    agent = daemonset["spec"]["template"]
    assert monitoring["PodMonitor"]["spec"]["selector"]["matchLabels"].items() <= (
        agent["metadata"]["labels"].items()
    )
    assert {e["port"] for e in monitoring["PodMonitor"]["spec"]["podMetricsEndpoints"]} <= {
        p["name"] for p in agent["spec"]["containers"][0]["ports"]
    }
    # least privilege: no API token, no capabilities, read-only root filesystems
    for workload in (daemonset, deployment):
        spec = workload["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        context = spec["containers"][0]["securityContext"]
        assert context["capabilities"]["drop"] == ["ALL"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert not context.get("privileged", False)
    assert not any(
        kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding") for kind, _ in objects
    )
    # every volume the agent mounts is one of the four it needs
    volumes = {v["name"]: v for v in agent["spec"]["volumes"]}
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/gputally"
    assert set(volumes) == {"config", "state", "pod-resources", "collector-ca"}
    # of the collector's TLS Secret, the agents get the CA alone, never the key
    assert volumes["collector-ca"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    mounts = {m["name"]: m for m in agent["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["pod-resources"]["readOnly"] is True
    # the collector's ledger is on the claim, and one writer at a time
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    claims = [
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v
    ]
    assert claims[0]["persistentVolumeClaim"]["claimName"] in {
        name for kind, name in objects if kind == "PersistentVolumeClaim"
    }


@pytest.mark.parametrize("daemon", ["agent", "collector"])
def test_the_daemons_accept_the_configuration_the_manifests_give_them(
    daemon: str, tmp_path: Path
) -> None:
    objects = _manifests()
    config = objects[("ConfigMap", f"gputally-{daemon}")]["data"][f"{daemon}.toml"]
    (tmp_path / f"{daemon}.toml").write_text(config)
    workload = objects[
        ("DaemonSet", "gputally-agent")
        if daemon == "agent"
        else ("Deployment", "gputally-collector")
    ]
    container = workload["spec"]["template"]["spec"]["containers"][0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTALLY_")}
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "node-a")  # fieldRef: the node's name
    args = [a.replace("/etc/gputally/", f"{tmp_path}/") for a in container["args"]]
    gputally = Path(sys.executable).parent / "gputally"
    checked = run(gputally, *args, "--print-config", env=env)
    assert checked.returncode == 0, checked.stderr
    printed = checked.stdout
    if daemon == "agent":
        assert 'node = "node-a"' in printed
        assert 'collector = "gputally-collector.gputally.svc:9471"' in printed
        assert 'metrics-listen = "0.0.0.0:9472"' in printed
    else:
        assert 'db = "/var/lib/gputally/gputally.db"' in printed
        assert 'keys = "/etc/gputally/keys"' in printed


# -- systemd ----------------------------------------------------------------------------------


@pytest.mark.parametrize("daemon", ["agent", "collector", "witness"])
def test_the_daemons_accept_the_configuration_files_of_the_units(daemon: str) -> None:
    unit = (DEPLOY / "systemd" / f"gputally-{daemon}.service").read_text()
    assert f"--config /etc/gputally/{daemon}.toml" in unit
    gputally = Path(sys.executable).parent / "gputally"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTALLY_")}
    config = DEPLOY / "systemd" / f"{daemon}.toml"
    words = ["witness", "serve"] if daemon == "witness" else [daemon]
    checked = run(gputally, *words, "--config", config, "--print-config", env=env)
    assert checked.returncode == 0, checked.stderr
    assert 'log-format = "json"' in checked.stdout.splitlines()


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", package="systemd")
    gputally = Path(sys.executable).parent / "gputally"
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert [u.name for u in units] == [
        "gputally-agent.service",
        "gputally-collector.service",
        "gputally-witness.service",
    ]
    for unit in units:
        # verify checks that ExecStart's binary exists: point it at this environment's
        text = unit.read_text().replace("/usr/local/bin/gputally", str(gputally))
        (tmp_path / unit.name).write_text(text)
    checked = run(analyze, "verify", *sorted(tmp_path.glob("*.service")))
    problems = [
        line
        for line in (checked.stdout + checked.stderr).splitlines()
        # the host, not the unit: a container without systemd running, no such user here
        if line.strip() and "System has not been booted with systemd" not in line
    ]
    assert checked.returncode == 0 and not problems, "\n".join(problems)


# -- Grafana ------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return dict(json.loads((DEPLOY / "grafana" / "gputally-cluster.json").read_text()))


def test_the_dashboard_is_importable_as_is() -> None:
    board = dashboard()
    assert board["uid"] == "gputally-cluster" and board["schemaVersion"] >= 36
    assert "__inputs" not in board  # no import-time questions: a datasource variable instead
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range"}
            assert used <= set(variables), (panel["title"], used)
    # panels do not overlap on the 24-column grid
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, panel["title"]
        cells |= mine


# A stand-in for kubectl, enough of it for enroll.sh: the cluster is a directory (pods.txt: the
# agent pods and their nodes; configmap/: the gputally-agent-keys ConfigMap, absent until
# applied), `exec` runs the real `gputally agent --print-public-key` on a state directory of
# the pod's own (deleting it is a reinstall), and `create --dry-run` writes, instead of YAML, the
# directory the ConfigMap is made from, which `apply` then copies into the cluster.
FAKE_KUBECTL = """\
import shutil, subprocess, sys
from pathlib import Path
cluster = Path(sys.argv[0]).resolve().parent.parent / "cluster"
args = sys.argv[1:]
if args[:1] == ["-n"]:
    args = args[2:]
keys = cluster / "configmap"
def template():
    return args[args.index("--template") + 1]
if args[:3] == ["get", "configmap", "gputally-agent-keys"]:
    if not keys.is_dir():
        sys.exit("Error from server (NotFound)")
    if "--template" in args:
        t = template()
        if t.startswith("{{range"):
            print("".join(p.name + "\\n" for p in sorted(keys.iterdir())), end="")
        else:
            name = t.split('"')[1]
            print((keys / name).read_text(), end="")
elif args[:2] == ["get", "pods"]:
    print((cluster / "pods.txt").read_text(), end="")
elif args[:1] == ["exec"]:
    pod = args[1]
    command = args[args.index("--") + 1 :]
    i = command.index("--config")
    del command[i : i + 2]
    command[0] = str(Path(sys.executable).parent / "gputally")
    command += ["--backend", "mock", "--state-dir", str(cluster / "state" / pod)]
    sys.exit(subprocess.run(command).returncode)
elif args[:2] == ["create", "configmap"]:
    print([a for a in args if a.startswith("--from-file=")][0].split("=", 1)[1])
elif args[:1] == ["diff"]:
    sys.exit(1)
elif args[:1] == ["apply"]:
    source = Path(Path(args[args.index("-f") + 1]).read_text().strip())
    shutil.rmtree(keys, ignore_errors=True)
    shutil.copytree(source, keys)
else:
    sys.exit(f"fake kubectl: unexpected {args}")
"""


def test_enrolling_on_kubernetes_keeps_each_nodes_key_history(tmp_path: Path) -> None:
    from gputally.collector.record.keys import KeyStore

    (tmp_path / "bin").mkdir()
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
    kubectl.chmod(0o755)
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTALLY_")}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"

    def enroll(*args: str) -> subprocess.CompletedProcess[str]:
        return run("sh", K8S / "enroll.sh", *args, env=env)

    def keys(node: str) -> list[bytes]:
        return KeyStore(cluster / "configmap").keys(node)

    (cluster / "pods.txt").write_text("agent-x1 node-a\nagent-y1 node-b\n")
    first = enroll()
    assert first.returncode == 0, first.stderr
    assert "node-a: enrolled (from agent-x1)" in first.stderr
    assert sorted(p.name for p in (cluster / "configmap").iterdir()) == ["node-a.pub", "node-b.pub"]
    key_a, key_b = keys("node-a"), keys("node-b")
    assert len(key_a) == len(key_b) == 1 and key_a != key_b

    again = enroll()  # nothing changed: nothing to do, nothing refused
    assert again.returncode == 0 and "node-a: enrolled already" in again.stderr
    assert keys("node-a") == key_a

    # node-a is reinstalled (a new key); node-b's agent is gone (its key must stay)
    shutil.copytree(cluster / "state" / "agent-x1", tmp_path / "old-x1")
    shutil.rmtree(cluster / "state" / "agent-x1")
    (cluster / "pods.txt").write_text("agent-x1 node-a\n")
    refused = enroll()
    assert refused.returncode != 0
    assert "node-a: REFUSED: its agent presents another key" in refused.stderr
    assert "--rotate node-a" in refused.stderr
    assert keys("node-a") == key_a and keys("node-b") == key_b

    rotated = enroll("--rotate", "node-a")
    assert rotated.returncode == 0, rotated.stderr
    assert "node-a: key rotated" in rotated.stderr
    history = keys("node-a")
    assert len(history) == 2 and history[0] == key_a[0] and history[1] != key_a[0]
    assert keys("node-b") == key_b

    # the old key back (a backup of the node restored): never made current again
    shutil.rmtree(cluster / "state" / "agent-x1")
    shutil.copytree(tmp_path / "old-x1", cluster / "state" / "agent-x1")
    retired = enroll("--rotate", "node-a")
    assert retired.returncode != 0
    assert "node-a: REFUSED: its agent presents a key retired by a rotation" in retired.stderr
    assert keys("node-a") == history


def test_the_container_image_copies_every_source_root() -> None:
    """pyproject.toml's package folders must all be in the image's build context, or the
    image does not build (pip: package directory ... does not exist)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {folder.split("/")[0] for folder in setuptools["package-dir"].values()}
    dockerfile = (DEPLOY / "container" / "Dockerfile").read_text()
    copied = {
        word
        for line in dockerfile.splitlines()
        if line.startswith("COPY ")
        for word in line.split()[1:-1]
    }
    assert roots <= copied, f"the Dockerfile does not COPY {sorted(roots - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied
