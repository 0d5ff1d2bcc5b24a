"""deploy/: the Prometheus config scrapes the web tier and each worker, and every metric the Grafana dashboard
queries is one the web tier or an engine really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from django.test import Client
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpu_worker.serving.telemetry import Telemetry

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GPU_ONLY = {
    "ruvon:gpu_memory_allocated_bytes",
    "ruvon:gpu_memory_reserved_bytes",
    "ruvon:gpu_memory_total_bytes",
}


def exported_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_it_scrapes_the_web_tier_and_each_worker() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"ruvon-web", "ruvon-workers"}
    workers = [t for group in jobs["ruvon-workers"]["static_configs"] for t in group["targets"]]
    assert len(workers) == len(set(workers)) >= 2  # one target (and port) per worker


def test_it_queries_only_metrics_that_exist(db: None) -> None:
    client = Client()
    client.get("/v1/models")  # a request, so the web tier's per-status series exist
    web = exported_names(client.get("/metrics").content.decode())
    engine = exported_names(generate_latest(Telemetry("tiny").registry).decode()) | GPU_ONLY
    dashboard = json.loads((DEPLOY / "grafana" / "ruvon-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b((?:ruvon:|django_)[a-z0-9_]+)(?=[{\[])", target["expr"])
    }
    assert {n for n in queried if n.startswith("ruvon:")} >= {
        "ruvon:time_to_first_token_seconds_bucket",
        "ruvon:inter_token_latency_seconds_bucket",
        "ruvon:generation_tokens_total",
        "ruvon:kv_cache_usage_perc",
        "ruvon:gpu_memory_allocated_bytes",
    }
    assert queried - web - engine == set()
