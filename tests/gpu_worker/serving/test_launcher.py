"""`ruvon workers`: one worker per GPU on one stream; on CPU, N workers that share a batch exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from gpu_worker.serving.launcher import child_commands
from gpu_worker.serving.protocol import request_stream, workers_key
from gpu_worker.serving.redis_transport import GROUP
from inference.transport.redis_client import RedisJobClient

from .test_worker_process import REDIS_URL, ROOT, Cluster, cluster, run, serve_all  # noqa: F401


def test_it_pins_one_worker_to_each_visible_gpu() -> None:
    commands = child_commands(["--model", "gpt2"], ["0", "3"], num_workers=0)
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in commands] == ["0", "3"]
    assert all(argv[-2:] == ["--model", "gpt2"] for _, argv in commands)
    assert len(child_commands([], ["0", "1", "2"], num_workers=2)) == 2


def test_it_starts_cpu_workers_when_there_is_no_gpu() -> None:
    commands = child_commands(["--model", "random:tiny"], [], num_workers=2)
    assert len(commands) == 2
    assert all(
        env["CUDA_VISIBLE_DEVICES"] == "" and argv[-2:] == ["--device", "cpu"] for env, argv in commands
    )


def test_it_gives_each_worker_its_own_metrics_port() -> None:
    commands = child_commands(["--model", "gpt2", "--metrics-port", "9100"], ["0", "1", "2"], num_workers=0)
    ports = [argv[argv.index("--metrics-port") + 1] for _, argv in commands]
    assert ports == ["9100", "9101", "9102"]
    off = child_commands(["--metrics-port", "0"], ["0", "1"], num_workers=0)
    assert [argv[-1] for _, argv in off] == ["0", "0"]


@pytest.mark.slow
def test_it_serves_a_batch_exactly_once_across_launched_workers(cluster: Cluster) -> None:  # noqa: F811
    cmd = [sys.executable, "-m", "ruvon_cli", "workers", "--num-workers", "2", "--",
           "--redis-url", REDIS_URL, "--model", "random:tiny", "--served-model-name", cluster.model,
           "--usage-stream", cluster.usage_stream, "--num-blocks", "64", "--heartbeat-s", "0.2",
           "--max-inflight", "2"]  # fmt: skip
    launcher = subprocess.Popen(cmd, cwd=ROOT, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 90
        while len(cluster.r.hkeys(workers_key(cluster.model))) < 2:
            assert launcher.poll() is None, "launcher exited early"
            assert time.monotonic() < deadline, "workers did not announce themselves"
            time.sleep(0.1)
        jobs = [cluster.job(f"j{i}", max_tokens=6, ignore_eos=True) for i in range(12)]
        results = run(serve_all(RedisJobClient(REDIS_URL, cluster.model), jobs))
        for events in results.values():
            assert [e["type"] for e in events if e["type"] in ("done", "error")] == ["done"]
        assert sorted(u["request_id"] for u in cluster.usage()) == sorted(results)
        assert len(Counter(events[0]["worker"] for events in results.values())) == 2
        assert cluster.r.xpending(request_stream(cluster.model), GROUP)["pending"] == 0
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
