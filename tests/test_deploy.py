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
import tomllib
import urllib.parse
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
    assert "SUCCESS: 24 rules found" in checked.stdout  # alerts


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


# -- Kubernetes: sharded collectors -----------------------------------------------------------

SHARDS = K8S / "shards"
SECRETS = SHARDS / "secrets.example.yaml"  # a template of placeholders, never applied by -k
PLACEHOLDER = "REPLACE-ME"
Objects = dict[tuple[str, str], dict[str, Any]]


def _key(document: dict[str, Any]) -> tuple[str, str]:
    return document["kind"], document["metadata"]["name"]


def _merge(target: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    """A strategic merge patch made of maps only (lists merge by their own rules there)."""
    for name, value in patch.items():
        assert not isinstance(value, list), f"{where}: {name}: a list patch, not read here"
        if isinstance(value, dict) and isinstance(target.get(name), dict):
            _merge(target[name], value, f"{where}.{name}")
        else:
            target[name] = value


def _kustomize(
    directory: Path, objects: Objects | None = None, components: tuple[str, ...] = ()
) -> Objects:
    """What `kubectl kustomize` builds of a directory, for the part of kustomize these manifests
    use (resources, components, map patches and deletions, images); a kustomization that uses
    more is refused, not misread. `components`: as if listed in its kustomization.yaml.
    Checked against kustomize itself where kubectl is installed (the last test below)."""
    kustomization = documents(directory / "kustomization.yaml")[0]
    assert set(kustomization) <= {
        "apiVersion",
        "kind",
        "resources",
        "components",
        "patches",
        "images",
    }, sorted(kustomization)
    out: Objects = {} if objects is None else objects
    for entry in kustomization.get("resources", []):
        path = directory / entry
        built = _kustomize(path) if path.is_dir() else {_key(d): d for d in documents(path)}
        assert not set(built) & set(out), f"{entry}: {sorted(set(built) & set(out))} again"
        out.update(built)
    for entry in [*kustomization.get("components", []), *components]:
        assert documents(directory / entry / "kustomization.yaml")[0]["kind"] == "Component"
        _kustomize(directory / entry, out)
    for patch in kustomization.get("patches", []):
        assert set(patch) <= {"path", "patch"}, patch  # no target selectors
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        body = yaml.safe_load(text)
        assert _key(body) in out, f"{directory.name}: a patch of {_key(body)}, which is not there"
        if body.get("$patch") == "delete":
            del out[_key(body)]
        else:
            _merge(out[_key(body)], body, str(_key(body)))
    for image in kustomization.get("images", []):
        for document in out.values():
            pod = document.get("spec", {}).get("template", {}).get("spec", {})
            for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
                if container["image"].partition(":")[0] == image["name"]:
                    container["image"] = f"{image['newName']}:{image['newTag']}"
    return out


def _sharded() -> Objects:
    """The base with the shards component enabled (`components: [shards]`)."""
    return _kustomize(K8S, components=("shards",))


def _collector_options() -> set[str]:
    gputally = Path(sys.executable).parent / "gputally"
    helped = run(gputally, "collector", "--help")
    assert helped.returncode == 0, helped.stderr
    usage = helped.stdout.split("\n\n", 1)[0]  # every option, once: [--name VALUE]
    return set(re.findall(r"\[--([a-z][a-z-]*)[\] ]", usage))


def _pod_matches(selector: dict[str, str], workload: dict[str, Any]) -> bool:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return selector.items() <= labels.items()


def test_the_shard_manifests_parse_and_the_component_lists_files_that_exist() -> None:
    kustomization = documents(SHARDS / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Component"
    listed = {*kustomization["resources"]}
    listed |= {p["path"] for p in kustomization["patches"] if "path" in p}
    for name in listed:
        assert (SHARDS / name).is_file(), name
    for patch in kustomization["patches"]:
        if "patch" in patch:
            assert yaml.safe_load(patch["patch"])["$patch"] == "delete"
    files = sorted(p.name for p in SHARDS.iterdir())
    # every file is the component, a file it lists, or the Secrets' template
    assert set(files) == {"kustomization.yaml", SECRETS.name, *listed}, files
    for name in files:
        for document in documents(SHARDS / name):
            if name != "kustomization.yaml":
                assert document["apiVersion"] and document["kind"], name
                assert document["metadata"]["namespace"] == "gputally", name
    # the base names the component, to be enabled by uncommenting two lines
    base = (K8S / "kustomization.yaml").read_text()
    assert "# components:\n#   - shards\n" in base
    assert "components" not in documents(K8S / "kustomization.yaml")[0]  # not by default


def test_the_shard_manifests_pass_the_kubernetes_schemas(tmp_path: Path) -> None:
    validate = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert validate, "kubernetes-validate comes with the dev extra"
    built = tmp_path / "sharded.yaml"
    built.write_text(yaml.safe_dump_all(list(_sharded().values())))
    checked = run(validate, "--strict", "-k", KUBERNETES_VERSION, built, SECRETS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("INFO") >= len(_sharded()) + 2, checked.stdout


def test_the_sharded_collectors_hold_together() -> None:
    objects = _sharded()
    base = _manifests()
    shards = objects[("StatefulSet", "gputally-collector")]
    pod = shards["spec"]["template"]["spec"]
    collector = next(c for c in pod["containers"] if c["name"] == "collector")
    labels = shards["spec"]["template"]["metadata"]["labels"]
    # the single collector is gone: its Deployment, SQLite ledger's claim, config, Service
    for gone in (
        ("Deployment", "gputally-collector"),
        ("PersistentVolumeClaim", "gputally-ledger"),
        ("ConfigMap", "gputally-collector"),
        ("Service", "gputally-collector"),
    ):
        assert gone in base and gone not in objects, gone
    assert not any(kind == "Secret" for kind, _ in objects)  # the operator's, never applied
    assert shards["spec"]["replicas"] == 2
    assert shards["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # the headless Service: one address per shard, the StatefulSet's service, and the only
    # Service that selects the shards (so that each one is scraped once)
    selecting = [
        o
        for (kind, _), o in objects.items()
        if kind == "Service" and _pod_matches(o["spec"]["selector"], shards)
    ]
    assert len(selecting) == 1
    service = selecting[0]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"].get("publishNotReadyAddresses", False) is False
    assert shards["spec"]["serviceName"] == service["metadata"]["name"]
    ports = {p["name"]: p for p in collector["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    # monitoring.yaml's ServiceMonitor scrapes that Service's endpoints (one per shard) as the
    # job the rules add up
    monitoring = {d["kind"]: d for d in documents(K8S / "monitoring.yaml")}
    monitor = monitoring["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }
    jobs = {r["replacement"] for e in monitor["endpoints"] for r in e["relabelings"]}
    scrape = documents(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"]
    assert jobs == {"gputally-collector"} == {scrape[0]["job_name"]}
    # only agents reach the shards' gRPC port: the base's NetworkPolicy applies to them
    policy = objects[("NetworkPolicy", "gputally-collector")]
    assert _pod_matches(policy["spec"]["podSelector"]["matchLabels"], shards)
    # never two shards on one node; drains take one at a time
    affinity = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname"
        and _pod_matches(t["labelSelector"]["matchLabels"], shards)
        for t in affinity
    )
    budgets = [o for (kind, _), o in objects.items() if kind == "PodDisruptionBudget"]
    assert len(budgets) == 1 and _pod_matches(budgets[0]["spec"]["selector"]["matchLabels"], shards)
    assert 0 < budgets[0]["spec"]["maxUnavailable"] < shards["spec"]["replicas"]
    # ready when it records (/readyz), alive when it answers (/healthz), on its metrics port
    assert collector["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert collector["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert ports["metrics"]["containerPort"] == 9470 and ports["grpc"]["containerPort"] == 9471
    # least privilege, every container; each says what it needs
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] in {name for kind, name in objects if kind == "ServiceAccount"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in [*pod["initContainers"], *pod["containers"]]:
        context = container["securityContext"]
        assert context["capabilities"]["drop"] == ["ALL"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert not context.get("privileged", False)
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        volumes = {v["name"] for v in pod["volumes"]}
        volumes |= {t["metadata"]["name"] for t in shards["spec"]["volumeClaimTemplates"]}
        assert {m["name"] for m in container["volumeMounts"]} <= volumes, container["name"]
    # the volumes name ConfigMaps of the build, and Secrets of the template or the TLS one
    secrets = {_key(d)[1]: d["stringData"] for d in documents(SECRETS)}
    for volume in pod["volumes"]:
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in objects, volume
        if "secret" in volume:
            name = volume["secret"]["secretName"]
            if name == "gputally-collector-tls":  # made by cert-manager or `gputally ca`
                continue
            assert name in secrets, volume
            assert {i["key"] for i in volume["secret"]["items"]} <= set(secrets[name])


def _mount(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount of `container` that holds `path`."""
    mounts: list[dict[str, Any]] = container["volumeMounts"]
    (mount,) = [m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")]
    return mount


def test_each_shard_keeps_its_state_and_shares_the_key_and_ledger(tmp_path: Path) -> None:
    objects = _sharded()
    shards = objects[("StatefulSet", "gputally-collector")]
    pod = shards["spec"]["template"]["spec"]
    collector = next(c for c in pod["containers"] if c["name"] == "collector")
    (copy,) = pod["initContainers"]
    text = objects[("ConfigMap", "gputally-collector-shard")]["data"]["collector.toml"]
    options = _collector_options()
    settings = tomllib.loads(text)
    assert set(settings) <= options, set(settings) - options
    assert collector["args"][0] == "collector"
    flags = {a[2:] for a in collector["args"] if a.startswith("--")}
    assert flags <= options and "db" not in flags and "db" not in settings
    # the ledger: a URL in the environment, from the Secret, as is its password
    env = {e["name"]: e for e in collector["env"]}
    assert set(env) == {"GPUTALLY_COLLECTOR_DB", "PGPASSWORD"}
    for variable in env.values():
        assert set(variable) == {"name", "valueFrom"}, variable  # never a literal value
    secrets = {_key(d)[1]: d["stringData"] for d in documents(SECRETS)}
    values: dict[str, str] = {}
    for name, variable in env.items():
        ref = variable["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "gputally-ledger-db" and ref["key"] in secrets[ref["name"]]
        assert not ref.get("optional", False)  # no Secret, no shard (never a default ledger)
        values[name] = secrets[ref["name"]][ref["key"]]
    for name in env:
        if name.startswith("GPUTALLY_COLLECTOR_"):
            assert name.removeprefix("GPUTALLY_COLLECTOR_").lower().replace("_", "-") in options
    # per pod: the checkpoint state on the shard's own claim
    claims = {t["metadata"]["name"] for t in shards["spec"]["volumeClaimTemplates"]}
    assert _mount(collector, settings["checkpoint-state"])["name"] in claims
    # shared: the checkpoint key, copied from the Secret into memory, mode 0600 (the collector
    # refuses a key others can read), where the configuration says it is
    volumes = {v["name"]: v for v in pod["volumes"]}
    key = _mount(collector, settings["collector-key"])
    assert volumes[key["name"]]["emptyDir"]["medium"] == "Memory"
    install, flag, mode, source, target = copy["command"]
    assert (install, flag, mode, target) == ("install", "-m", "0600", settings["collector-key"])
    assert _mount(copy, target)["name"] == key["name"]
    secret = volumes[_mount(copy, source)["name"]]["secret"]
    assert secret["secretName"] == "gputally-collector-key"
    assert [i["path"] for i in secret["items"]] == [Path(source).name]
    assert secret["secretName"] not in {
        v["secret"]["secretName"]
        for v in volumes.values()
        if "secret" in v and v["name"] in {m["name"] for m in collector["volumeMounts"]}
    }  # the collector itself gets the copy, not the Secret
    # the enrolled keys and the TLS certificate, as the single collector gets them
    assert volumes[_mount(collector, settings["keys"] + "/x")["name"]]["configMap"] == {
        "name": "gputally-agent-keys"
    }
    assert volumes[_mount(collector, settings["tls-cert"])["name"]]["secret"]["secretName"] == (
        "gputally-collector-tls"
    )
    # every shard the whole cluster's inventory (the base's), never its share
    base = tomllib.loads(
        _manifests()[("ConfigMap", "gputally-collector")]["data"]["collector.toml"]
    )
    assert settings["expected-gpus"] == base["expected-gpus"]
    # and the collector takes it all as meant: the URL from the environment, nothing else
    (tmp_path / "collector.toml").write_text(text)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GPUTALLY_", "PG"))}
    args = [a.replace("/etc/gputally/", f"{tmp_path}/") for a in collector["args"]]
    gputally = Path(sys.executable).parent / "gputally"
    values["PGPASSWORD"] = "password-of-this-test"  # not the template's: its URL has REPLACE-ME
    checked = run(gputally, *args, "--print-config", env={**clean, **values})
    assert checked.returncode == 0, checked.stderr
    printed = tomllib.loads(checked.stdout)
    assert printed["db"] == values["GPUTALLY_COLLECTOR_DB"]
    assert printed["checkpoint-state"] == settings["checkpoint-state"]
    assert printed["collector-key"] == settings["collector-key"]
    assert values["PGPASSWORD"] not in checked.stdout


def test_the_agents_dial_every_shard(tmp_path: Path) -> None:
    objects = _sharded()
    base = _manifests()
    service = objects[("Service", "gputally-collector-shards")]
    grpc = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    namespace = service["metadata"]["namespace"]
    text = objects[("ConfigMap", "gputally-agent")]["data"]["agent.toml"]
    settings = tomllib.loads(text)
    assert settings["collector"] == f"dns:///{service['metadata']['name']}.{namespace}.svc:{grpc}"
    # the rest as in the base, which the DaemonSet (unchanged) reads
    before = tomllib.loads(base[("ConfigMap", "gputally-agent")]["data"]["agent.toml"])
    assert {**settings, "collector": before["collector"]} == before
    assert objects[("DaemonSet", "gputally-agent")] == base[("DaemonSet", "gputally-agent")]
    # the agent takes the address as it is
    (tmp_path / "agent.toml").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTALLY_")}
    gputally = Path(sys.executable).parent / "gputally"
    checked = run(gputally, "agent", "--config", tmp_path / "agent.toml", "--print-config", env=env)
    assert checked.returncode == 0, checked.stderr
    assert tomllib.loads(checked.stdout)["collector"] == settings["collector"]


def test_the_shards_secrets_are_a_template_of_placeholders() -> None:
    secrets = documents(SECRETS)
    assert {_key(d) for d in secrets} == {
        ("Secret", "gputally-ledger-db"),
        ("Secret", "gputally-collector-key"),
    }
    for secret in secrets:
        assert "data" not in secret  # nothing base64-encoded to hide a value in
        assert secret["stringData"], _key(secret)
        for name, value in secret["stringData"].items():
            assert PLACEHOLDER in value, (_key(secret), name)
    ledger = next(d["stringData"] for d in secrets if _key(d)[1] == "gputally-ledger-db")
    assert ledger["password"] == PLACEHOLDER
    url = urllib.parse.urlsplit(ledger["url"])
    assert url.scheme == "postgresql" and url.password is None
    assert "password" not in urllib.parse.parse_qs(url.query)
    assert PLACEHOLDER in (url.hostname or "").upper()
    # nothing of the template reaches the cluster through kustomize
    for path in [*K8S.glob("kustomization.yaml"), *K8S.glob("*/kustomization.yaml")]:
        kustomization = documents(path)[0]
        listed = [*kustomization.get("resources", []), *kustomization.get("patches", [])]
        assert SECRETS.name not in json.dumps(listed), path


def test_kustomize_builds_the_sharded_collectors_as_these_tests_read_them(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed (the tests above read the manifests without it)")
    # the component enabled in the base, as README.md says ...
    base = tmp_path / "kubernetes"
    shutil.copytree(K8S, base)
    text = (base / "kustomization.yaml").read_text()
    (base / "kustomization.yaml").write_text(
        text.replace("# components:\n#   - shards\n", "components:\n  - shards\n")
    )
    # ... and from an overlay of one's own, beside the checkout
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S, overlay)],
                "components": [os.path.relpath(SHARDS, overlay)],
            }
        )
    )
    for directory in (base, overlay):
        built = run(kubectl, "kustomize", directory)
        assert built.returncode == 0, built.stderr
        objects = {_key(d): d for d in yaml.safe_load_all(built.stdout) if d}
        assert objects == _sharded(), directory.name


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


def test_the_shard_unit_runs_shards_that_share_the_port_on_one_postgresql_ledger() -> None:
    """Each instance of gputally-collector-shard@.service: the shared TOML, plus its own
    /metrics port and checkpoint state (the instance name), exactly as its ExecStart says."""
    unit = (DEPLOY / "systemd" / "gputally-collector-shard@.service").read_text()
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    words = exec_start.removeprefix("ExecStart=").split()
    assert words[:4] == ["/usr/local/bin/gputally", "collector", "--config",
                         "/etc/gputally/collector-shard.toml"]  # fmt: skip
    args = [w.replace("%i", "9480") for w in words[4:]]
    config = DEPLOY / "systemd" / "collector-shard.toml"
    gputally = Path(sys.executable).parent / "gputally"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTALLY_")}
    checked = run(gputally, "collector", "--config", config, *args, "--print-config", env=env)
    assert checked.returncode == 0, checked.stderr
    printed = checked.stdout.splitlines()
    for line in (
        "share-port = true",
        'metrics-listen = "0.0.0.0:9480"',
        'checkpoint-state = "/var/lib/gputally/shard-9480.checkpoint"',
    ):
        assert line in printed, line
    (db,) = [line for line in printed if line.startswith("db = ")]
    assert db.startswith('db = "postgresql://') and ":change-me@" not in db  # no password
    env_file = (DEPLOY / "systemd" / "collector-shard.env.example").read_text()
    assert "PGPASSWORD=change-me" in env_file.splitlines()  # a placeholder, said so


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", package="systemd")
    gputally = Path(sys.executable).parent / "gputally"
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert [u.name for u in units] == [
        "gputally-agent.service",
        "gputally-collector-shard@.service",
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
