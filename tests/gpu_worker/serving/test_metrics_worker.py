"""Two real `python -m ruvon_cli worker` processes on one request stream, each serving its engine metrics on
its own --metrics-port: both expositions parse, and together they count exactly what the requests did."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpu_worker.loading.loader import load_model
from inference.transport.redis_client import RedisJobClient
from tests.gpu_worker.serving.test_worker_process import REDIS_URL, Cluster, run, serve_all

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


@pytest.mark.slow
def test_it_serves_each_workers_metrics_on_its_own_port(cluster: Cluster) -> None:
    ports = [free_port(), free_port()]
    for port in ports:
        cluster.start_worker("--max-inflight", "2", "--metrics-port", str(port))
    jobs = [cluster.job(f"m{i}", max_tokens=3 + i, ignore_eos=True) for i in range(8)]
    results = run(serve_all(RedisJobClient(REDIS_URL, cluster.model), jobs))
    scrapes = [scrape(port) for port in ports]

    def total(name: str, **labels: str) -> float:
        key = (name, tuple(sorted({"model_name": cluster.model, **labels}.items())))
        return sum(samples[key] for samples in scrapes)

    done = [events[-1] for events in results.values()]
    assert all(event["type"] == "done" for event in done)
    completion = sum(event["usage"]["completion_tokens"] for event in done)
    assert completion == sum(3 + i for i in range(8))
    assert total("ruvon:generation_tokens_total") == completion
    assert total("ruvon:prompt_tokens_total") == 3 * len(jobs)
    assert total("ruvon:time_to_first_token_seconds_count") == len(jobs)
    assert total("ruvon:request_success_total", finished_reason="length") == len(jobs)
    # Both workers served (the two-in-flight cap forces it), and each reports its own step time.
    served = [
        samples[("ruvon:e2e_request_latency_seconds_count", (("model_name", cluster.model),))]
        for samples in scrapes
    ]
    assert all(n > 0 for n in served) and sum(served) == len(jobs)
    device = math.fsum(event["timings"]["device_s"] for event in done)
    assert device == pytest.approx(total("ruvon:step_time_seconds_sum"), rel=1e-6)
    usage = {u["request_id"]: u for u in cluster.usage()}
    assert math.fsum(u["timings"]["device_s"] for u in usage.values()) == pytest.approx(device)
    # Each worker exports the bytes of the weights it holds (both: random:tiny, unquantised).
    weights = load_model("random:tiny").weight_bytes
    key = ("ruvon:model_weight_bytes", (("model_name", cluster.model),))
    assert [samples[key] for samples in scrapes] == [weights, weights]


@pytest.mark.slow
def test_it_keeps_serving_when_its_metrics_port_is_taken(cluster: Cluster, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        cluster.start_worker("--metrics-port", str(taken.getsockname()[1]))
        [events] = run(
            serve_all(RedisJobClient(REDIS_URL, cluster.model), [cluster.job("t", max_tokens=2)])
        ).values()
    assert events[-1]["type"] == "done"
    assert "cannot serve metrics on port" in (tmp_path / "worker0.log").read_text()
