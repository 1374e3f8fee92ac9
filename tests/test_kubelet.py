"""Attribution from the kubelet's pod resources API: a fake kubelet serves the real gRPC
service on a Unix socket, and the agent reads it as it would on a Kubernetes node."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from gputally.agent.attribution import Attributor, PodResources
from gputally.agent.readings import Attribution
from gputally.agent.sim.mock import ManualClock
from gputally.collector.live.state import ClusterState
from gputally.collector.live.validate import InvalidMessageError
from gputally.kubelet.v1 import podresources_pb2 as pr
from gputally.kubelet.v1 import podresources_pb2_grpc as pr_grpc

from .factories import MockNode, hello, mock_node, scenario, tick


class FakeKubelet(pr_grpc.PodResourcesListerServicer):
    def __init__(self) -> None:
        self.pods: list[pr.PodResources] = []
        self.calls = 0
        self.failing = False  # answer UNAVAILABLE, as a restarting kubelet does

    def List(
        self, request: pr.ListPodResourcesRequest, context: object
    ) -> pr.ListPodResourcesResponse:
        self.calls += 1
        if self.failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "kubelet restarting")  # type: ignore[attr-defined]
        return pr.ListPodResourcesResponse(pod_resources=self.pods)


def pod(namespace: str, name: str, resource: str, *device_ids: str) -> pr.PodResources:
    return pr.PodResources(
        name=name,
        namespace=namespace,
        containers=[
            pr.ContainerResources(
                name="main",
                devices=[pr.ContainerDevices(resource_name=resource, device_ids=list(device_ids))],
            )
        ],
    )


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[Callable[[], tuple[FakeKubelet, Path]]]:
    servers: list[grpc.Server] = []

    def start() -> tuple[FakeKubelet, Path]:
        fake = FakeKubelet()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pr_grpc.add_PodResourcesListerServicer_to_server(fake, server)
        socket = tmp_path / "kubelet.sock"
        assert server.add_insecure_port(f"unix://{socket}") != 0 or socket.exists()
        server.start()
        servers.append(server)
        return fake, socket

    yield start
    for server in servers:
        server.stop(0)


def test_gpus_are_attributed_to_the_pods_they_are_allocated_to(
    kubelet: Callable[[], tuple[FakeKubelet, Path]],
) -> None:
    fake, socket = kubelet()
    fake.pods = [
        pod("ml-team", "trainer-0", "nvidia.com/gpu", "GPU-aaa", "GPU-bbb"),
        pod("inference", "server-7", "nvidia.com/gpu", "GPU-ccc::1"),  # a time-sliced share
        pod("storage", "cache", "example.com/nvme", "GPU-ddd"),  # not a GPU resource
    ]
    clock = ManualClock(0.0)
    source = PodResources(socket, refresh=10.0, clock=clock)
    assert source.lookup("GPU-aaa") == Attribution("kubernetes", "ml-team", "trainer-0")
    assert source.lookup("GPU-bbb") == Attribution("kubernetes", "ml-team", "trainer-0")
    assert source.lookup("GPU-ccc") == Attribution("kubernetes", "inference", "server-7")
    assert source.lookup("GPU-ddd") is None
    assert source.lookup("GPU-eee") is None
    assert fake.calls == 1  # five lookups within the refresh period: one List
    # a pod ends and another starts: seen at the next refresh, not before
    fake.pods = [pod("ml-team", "trainer-1", "nvidia.com/gpu", "GPU-aaa")]
    clock.now = 9.0
    assert source.lookup("GPU-aaa") == Attribution("kubernetes", "ml-team", "trainer-0")
    clock.now = 10.0
    assert source.lookup("GPU-aaa") == Attribution("kubernetes", "ml-team", "trainer-1")
    assert source.lookup("GPU-bbb") is None
    assert fake.calls == 2
    source.close()


def test_the_order_of_sources_and_a_kubelet_that_goes_away(
    tmp_path: Path,
    kubelet: Callable[[], tuple[FakeKubelet, Path]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, socket = kubelet()
    fake.pods = [pod("ml-team", "trainer-0", "nvidia.com/gpu", "GPU-aaa", "GPU-bbb")]
    static = tmp_path / "map.toml"
    static.write_text('[gpus]\n"GPU-bbb" = "reserved/bench"\n')
    attributor = Attributor(static, None, socket)
    pod_cgroup = "/kubepods/burstable/pod12345678-1234-1234-1234-123456789abc/cri-containerd-x"
    # the static map comes first; then the kubelet; then the processes' cgroups
    assert attributor.attribute(1, "GPU-bbb", [], []) == Attribution("static", "reserved", "bench")
    assert attributor.attribute(0, "GPU-aaa", [pod_cgroup], []) == Attribution(
        "kubernetes", "ml-team", "trainer-0"
    )
    assert attributor.attribute(2, "GPU-zzz", [pod_cgroup], []) == Attribution(
        "kubernetes", "", "pod/12345678-1234-1234-1234-123456789abc"
    )
    # the kubelet stops answering: attribution falls back, says so once, never raises
    fake.failing = True
    assert attributor.kubelet is not None
    attributor.kubelet._fetched = -1e9  # due for a refresh
    with caplog.at_level("WARNING", logger="gputally.agent"):
        assert attributor.attribute(0, "GPU-aaa", [], []) == Attribution()
        attributor.kubelet._fetched = -1e9
        assert attributor.attribute(0, "GPU-aaa", [], []) == Attribution()
    assert caplog.text.count("kubelet pod resources unavailable") == 1
    assert "UNAVAILABLE: kubelet restarting" in attributor.kubelet.last_error
    # and it comes back
    fake.failing = False
    attributor.kubelet._fetched = -1e9
    assert attributor.attribute(0, "GPU-aaa", [], []).tenant == "ml-team"
    assert attributor.kubelet.last_error == ""
    # no socket at all (not a Kubernetes node): silently no source
    absent = PodResources(tmp_path / "missing.sock")
    assert absent.lookup("GPU-aaa") is None and absent.lists == 0


def test_the_agent_reports_the_pod_of_each_gpu(
    tmp_path: Path, kubelet: Callable[[], tuple[FakeKubelet, Path]]
) -> None:
    gputally = [str(Path(sys.executable).with_name("gputally"))]

    def snapshot(*options: str) -> dict[str, object]:
        result = subprocess.run(
            [*gputally, "agent", "--backend", "mock", "--once", "--json", *options],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    gpus = snapshot("--kubelet-socket", "")["gpus"]
    assert isinstance(gpus, list)
    uuids = [g["uuid"] for g in gpus]
    fake, socket = kubelet()
    fake.pods = [pod("ml-team", "trainer-0", "nvidia.com/gpu", uuids[0], uuids[1])]
    attributed = snapshot("--kubelet-socket", str(socket))["gpus"]
    assert isinstance(attributed, list)
    assert [g["attribution"] for g in attributed[:3]] == [
        {"source": "kubernetes", "tenant": "ml-team", "job": "trainer-0"},
        {"source": "kubernetes", "tenant": "ml-team", "job": "trainer-0"},
        snapshot("--kubelet-socket", "")["gpus"][2]["attribution"],  # type: ignore[index]
    ]


def mig_node(
    tmp_path: Path,
    kubelet: Callable[[], tuple[FakeKubelet, Path]],
    start: float,
    **sampler_options: Any,
) -> MockNode:
    """A node of 3 H100s in MIG mode, 3 instances of 2 slices each (1 of 7 left over), all
    training. GPU 0 is shared by two pods; GPU 1 is one pod's on all its instances; GPU 2 is
    mapped statically, as a whole and one instance of it (an index never names an instance)."""
    from gputally.agent.sim.mock import MockNVML

    sc = scenario(
        """
        [cluster]
        nodes = 1
        gpus_per_node = 3
        gpu_model = "NVIDIA H100 80GB HBM3"
        mig_instances = 3
        [[workload]]
        gpus = 3
        kind = "training"
        """
    )
    lib = MockNVML(sc, 0, ManualClock(start))
    lib.nvmlInit()  # the instances' UUIDs, as the device plugin hands them out
    mig = [
        [
            lib.nvmlDeviceGetUUID(
                lib.nvmlDeviceGetMigDeviceHandleByIndex(lib.nvmlDeviceGetHandleByIndex(g), i)
            )
            for i in range(3)
        ]
        for g in range(3)
    ]
    lib.nvmlShutdown()
    fake, socket = kubelet()
    fake.pods = [
        pod("ml-team", "trainer-0", "nvidia.com/mig-2g.20gb", mig[0][0], mig[0][1]),
        pod("inference", "server-7", "nvidia.com/mig-2g.20gb", mig[0][2]),
        pod("ml-team", "trainer-1", "nvidia.com/mig-2g.20gb", *mig[1]),
    ]
    static = tmp_path / "map.toml"
    static.write_text(f'[gpus]\n"2" = "ops/maint"\n"{mig[2][0]}" = "reserved/bench"\n')
    return mock_node(sc, start=start, static=static, kubelet=socket, **sampler_options)


def test_mig_instances_are_attributed_to_the_pods_they_are_handed_to(
    tmp_path: Path, kubelet: Callable[[], tuple[FakeKubelet, Path]]
) -> None:
    from gputally.agent.sampler import reading_to_proto

    node = mig_node(tmp_path, kubelet, 1_750_000_000.0)
    node.clock.advance(1.0)
    shared, whole, mapped = node.read()
    trainer_0 = Attribution("kubernetes", "ml-team", "trainer-0")
    trainer_1 = Attribution("kubernetes", "ml-team", "trainer-1")
    assert [m.attribution for m in shared.mig] == [
        trainer_0,
        trainer_0,
        Attribution("kubernetes", "inference", "server-7"),
    ]
    assert shared.attribution == Attribution()  # shared out: charged to no single owner
    assert [m.attribution for m in whole.mig] == [trainer_1] * 3
    assert whole.attribution == trainer_1
    assert mapped.attribution == Attribution("static", "ops", "maint")
    assert [m.attribution for m in mapped.mig] == [
        Attribution("static", "reserved", "bench"),
        Attribution(),
        Attribution(),
    ]
    sample = reading_to_proto(shared)
    assert [m.attribution.job for m in sample.mig] == ["trainer-0", "trainer-0", "server-7"]
    assert not sample.HasField("attribution")
    node.close()


def test_a_shared_mig_gpu_is_charged_to_its_owners_by_slices(
    tmp_path: Path, kubelet: Callable[[], tuple[FakeKubelet, Path]]
) -> None:
    """The signed summaries split each MIG GPU among its instances' owners, 2/7 per instance
    and the unpartitioned 1/7 to the GPU's own owner; the record's tenant and job figures are
    built from those shares, and the cluster's from the whole GPUs."""
    from gputally.collector.audit.figures import Rollup, as_dict, compute, gpu_numbers
    from gputally.v1 import telemetry_pb2 as pb

    start, window = 1_750_000_020.0, 60.0  # a multiple of the window: whole windows only
    node = mig_node(tmp_path, kubelet, start, name="mig-node", summary_window=window)
    sampler, clock = node.sampler, node.clock
    signed, reports = [], []
    for _ in range(180):
        clock.advance(1.0)
        report = tick(sampler)
        reports.append(report)
        if report.HasField("summary"):
            signed.append(report.summary)
    signed += [r.summary for r in sampler.final_reports()]
    summaries = [pb.Summary.FromString(s.body) for s in signed]
    assert [s.window_start_unix_nano / 1e9 - start for s in summaries] == [0.0, 60.0, 120.0]
    gpu0, gpu1, gpu2 = summaries[1].gpus
    assert not gpu1.shares and gpu1.attribution.job == "trainer-1"  # one owner: no shares
    assert not gpu0.HasField("attribution")
    seven = window / 7
    # The slice no instance holds goes to GPU 0's own owner: none.
    assert [s.attribution.job for s in gpu0.shares] == ["", "server-7", "trainer-0"]
    assert [s.present_seconds for s in gpu0.shares] == pytest.approx([seven, 2 * seven, 4 * seven])
    unheld, server, trainer = gpu0.shares
    assert (unheld.allocated_seconds, unheld.sm_active_seconds) == (0.0, 0.0)
    assert unheld.sm_measured_seconds == pytest.approx(seven)  # nothing can run there
    assert trainer.allocated_seconds == pytest.approx(4 * seven)
    assert trainer.sm_active_seconds == pytest.approx(0.85 * 4 * seven)
    assert server.busy_missing_seconds == pytest.approx(2 * seven)  # NVML refuses it under MIG
    assert trainer.energy_joules == pytest.approx(gpu0.energy_joules * 4 / 7)
    assert sum(s.present_seconds for s in gpu0.shares) == pytest.approx(gpu0.present_seconds)
    assert [(s.attribution.tenant, s.attribution.job) for s in gpu2.shares] == [
        ("ops", "maint"),  # the whole GPU's static owner keeps what the instance does not
        ("reserved", "bench"),
    ]
    assert gpu2.shares[0].allocated_seconds == pytest.approx(4 * seven)
    assert gpu2.shares[0].present_seconds == pytest.approx(5 * seven)

    bodies = [("mig-node", s.SerializeToString()) for s in signed]
    period = (start, start + 180.0)
    figures = compute(bodies, *period, expected=3)
    rollup = Rollup(*period, expected=3)
    for summary in summaries:
        rollup.add(
            "mig-node",
            (summary.window_start_unix_nano / 1e9, summary.window_end_unix_nano / 1e9),
            gpu_numbers("mig-node", summary),
        )
    for answer in (
        as_dict(figures, "allocated", None),
        as_dict(rollup.period(), "allocated", None),
    ):
        tenants = {row["name"]: row for row in answer["by_tenant"]}
        hours = 180 / 3600 / 7
        assert {name: row["gpu_hours"] for name, row in tenants.items()} == {
            "ml-team": pytest.approx(11 * hours),  # 4/7 of GPU 0, all of GPU 1
            "ops": pytest.approx(5 * hours),
            "inference": pytest.approx(2 * hours),
            "reserved": pytest.approx(2 * hours),
            "(unattributed)": pytest.approx(1 * hours),
        }
        assert tenants["ml-team"]["gpus"] == 2 and tenants["ops"]["gpus"] == 1
        assert tenants["ops"]["allocated"] == pytest.approx(0.8)  # 4 of its 5 slices hold work
        assert tenants["ops"]["sm_active"] == pytest.approx(0.85 * 0.8)
        assert tenants["ml-team"]["allocated"] == pytest.approx(1.0)
        assert tenants["(unattributed)"]["allocated"] == 0.0
        jobs = {row["name"]: row["gpu_hours"] for row in answer["by_job"]}
        assert jobs["trainer-0"] == pytest.approx(4 * hours)
        # The cluster counts whole GPUs: each has processes, and busy is not known at all.
        assert answer["measures"]["allocated"]["figure"] == pytest.approx(1.0)
        assert answer["measures"]["busy"] == {
            "figure": 0.0,
            "lower": 0.0,
            "upper": pytest.approx(1.0),
        }
    energy = {row["name"]: row["energy_kwh"] for row in as_dict(figures, "busy", None)["by_tenant"]}
    assert sum(energy.values()) == pytest.approx(figures.total.sums.values["energy_joules"] / 3.6e6)

    # The live view splits the same way, sample by sample (unattributed slices in no tenant).
    state = ClusterState(expected_gpus=3, window=30.0, lag=0.0, clock=clock)
    state.open_session(sampler.hello(1, "mock"))
    for report in reports:
        state.ingest("mig-node", report, received=report.time_unix_nano / 1e9)
    live = state.view().by_tenant
    assert {t: f.gpus for t, f in live.items()} == pytest.approx(
        {"ml-team": 11 / 7, "ops": 5 / 7, "inference": 2 / 7, "reserved": 2 / 7}
    )
    assert {t: f.ratios["allocated"] for t, f in live.items()} == pytest.approx(
        {"ml-team": 1.0, "ops": 0.8, "inference": 1.0, "reserved": 1.0}
    )
    assert live["ops"].ratios["sm_active"] == pytest.approx(0.85 * 0.8)
    assert live["inference"].coverage == pytest.approx(1.0)
    assert live["ops"].upper["busy"] == pytest.approx(1.0)  # busy: not known under MIG


def test_a_summary_whose_shares_do_not_add_up_to_the_gpu_is_refused() -> None:
    from gputally.v1 import telemetry_pb2 as pb

    state = ClusterState(expected_gpus=1, clock=lambda: 0.0)
    state.open_session(hello("n1", 1))
    gpu = pb.GpuSummary(index=0, uuid="GPU-0", present_seconds=60.0)
    gpu.shares.add(present_seconds=40.0).attribution.tenant = "a"
    gpu.shares.add(present_seconds=10.0).attribution.tenant = "b"
    summary = pb.Summary(
        node="n1",
        window_start_unix_nano=0,
        window_end_unix_nano=60 * 10**9,
        gpus=[gpu],
        chain_seq=1,
    )
    signed = pb.SignedSummary(body=summary.SerializeToString())
    report = pb.Report(seq=1, time_unix_nano=60 * 10**9, summary=signed)
    with pytest.raises(InvalidMessageError, match="its shares hold 50 s, the GPU 60 s"):
        state.ingest("n1", report)
    assert state.nodes["n1"].reports == {"accepted": 0, "duplicate": 0, "rejected": 1}


def test_a_shared_mig_gpu_is_charged_alike_at_any_report_cadence(
    tmp_path: Path, kubelet: Callable[[], tuple[FakeKubelet, Path]]
) -> None:
    """Reports of 10 ticks carry each MIG GPU's shares tick by tick (GpuSample.totals): the
    live view charges the tenants what one report a tick gives it."""
    start = 1_750_000_020.0
    views = []
    for every in (None, 10.0):
        home = tmp_path / f"every-{every}"
        home.mkdir()
        node = mig_node(home, kubelet, start, name="mig-node", report_every=every)
        sampler, clock = node.sampler, node.clock
        state = ClusterState(expected_gpus=3, window=30.0, lag=0.0, clock=clock)
        state.open_session(sampler.hello(1, "mock"))
        for _ in range(60):
            clock.advance(1.0)
            outgoing = sampler.tick()
            if outgoing is not None:
                state.ingest("mig-node", outgoing, received=outgoing.time_unix_nano / 1e9)
        views.append(state.view(now=start + 60 + (10.0 if every else 0.0)).by_tenant)
    one, ten = views
    assert set(ten) == set(one) == {"ml-team", "ops", "inference", "reserved"}
    for tenant in one:
        assert ten[tenant].gpus == pytest.approx(one[tenant].gpus)
        assert ten[tenant].ratios == pytest.approx(one[tenant].ratios)
        assert ten[tenant].coverage == pytest.approx(one[tenant].coverage)
