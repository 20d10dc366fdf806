"""The Prometheus exposition, read back with prometheus_client's own parser."""

from __future__ import annotations

import math

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.control.metrics import AppMetrics, Histogram, MetricsSnapshot, ProcessMetrics, render

BOUNDS = (0.005, 0.05, 0.5)


def snapshot() -> MetricsSnapshot:
    shop = AppMetrics(
        name="/srv/shop",
        requests=120,
        duration=Histogram(bounds=BOUNDS, counts=(100, 15, 4, 1), total=3.25),
        rejected={"queue_full": 2, "worker_failed": 1},
        queue_length=3,
        processes=(
            ProcessMetrics(pid=2001, state="serving", memory={"rss": 10485760, "pss": 7340032, "private": 6291456,
                                                              "swap": 0}, cpu_seconds=1.5, requests=70),
            ProcessMetrics(pid=2002, state="serving", memory={"rss": 9000000, "pss": 7000000, "private": 6000000,
                                                              "swap": 4096}, cpu_seconds=0.25, requests=50),
            ProcessMetrics(pid=2003, state="starting", memory={"rss": 1000}),
        ),
        spawns=4,
        spawn_failures=1,
        spawn_duration=Histogram(bounds=(0.1, 1.0), counts=(0, 3, 1), total=4.5),
        restarts={"crash": 1, "memory_limit": 2},
    )
    odd = AppMetrics(name='C:\\apps\\"quoted"\nnext line', requests=1)
    return MetricsSnapshot(uptime=12.5, apps=(shop, odd))


def families() -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(render(snapshot()))}


def value(family: Metric, name: str, **labels: str) -> float:
    matches = [s.value for s in family.samples if s.name == name and s.labels == labels]
    assert len(matches) == 1, f"{name} {labels}: {len(matches)} samples in {family.samples}"
    return matches[0]


def test_every_documented_family_has_its_type() -> None:
    # The parser names a counter's family without the _total suffix.
    expected = {
        "agent_requests": "counter",
        "agent_request_duration_seconds": "histogram",
        "agent_requests_rejected": "counter",
        "agent_queue_length": "gauge",
        "agent_processes": "gauge",
        "agent_process_memory_bytes": "gauge",
        "agent_preloader_memory_bytes": "gauge",
        "agent_process_cpu_seconds": "counter",
        "agent_process_requests": "counter",
        "agent_spawns": "counter",
        "agent_spawn_failures": "counter",
        "agent_spawn_duration_seconds": "histogram",
        "agent_restarts": "counter",
        "agent_uptime_seconds": "gauge",
    }
    found = families()
    assert {name: f.type for name, f in found.items()} == expected
    assert all(f.documentation for f in found.values())


def test_counters_and_gauges_carry_their_labels() -> None:
    found = families()
    assert value(found["agent_requests"], "agent_requests_total", app="/srv/shop") == 120
    assert value(found["agent_queue_length"], "agent_queue_length", app="/srv/shop") == 3
    assert value(found["agent_spawns"], "agent_spawns_total", app="/srv/shop") == 4
    assert value(found["agent_spawn_failures"], "agent_spawn_failures_total", app="/srv/shop") == 1
    assert value(found["agent_uptime_seconds"], "agent_uptime_seconds") == 12.5
    memory = found["agent_process_memory_bytes"]
    assert value(memory, "agent_process_memory_bytes", app="/srv/shop", pid="2002", kind="swap") == 4096
    assert value(memory, "agent_process_memory_bytes", app="/srv/shop", pid="2001", kind="pss") == 7340032
    cpu = found["agent_process_cpu_seconds"]
    assert value(cpu, "agent_process_cpu_seconds_total", app="/srv/shop", pid="2001") == 1.5
    requests = found["agent_process_requests"]
    assert value(requests, "agent_process_requests_total", app="/srv/shop", pid="2002") == 50


def test_labelled_series_exist_for_every_documented_value() -> None:
    found = families()
    rejected = found["agent_requests_rejected"]
    reasons = {s.labels["reason"]: s.value for s in rejected.samples if s.labels["app"] == "/srv/shop"}
    assert reasons == {"queue_full": 2, "queue_timeout": 0, "request_timeout": 0, "worker_failed": 1}
    restarts = found["agent_restarts"]
    causes = {s.labels["cause"]: s.value for s in restarts.samples if s.labels["app"] == "/srv/shop"}
    assert causes == {"crash": 1, "memory_limit": 2, "max_requests": 0, "request_time": 0, "idle": 0,
                      "pool_full": 0, "rolling_restart": 0, "always_restart": 0, "detached": 0}
    states = {s.labels["state"]: s.value for s in found["agent_processes"].samples if s.labels["app"] == "/srv/shop"}
    assert states == {"starting": 1, "serving": 2, "idle": 0, "detaching": 0, "stopping": 0}
    # A process with only some memory figures still has every kind.
    kinds = {s.labels["kind"] for s in found["agent_process_memory_bytes"].samples if s.labels["pid"] == "2003"}
    assert kinds == {"rss", "pss", "private", "swap"}


def test_histogram_buckets_are_cumulative_and_end_with_inf() -> None:
    duration = families()["agent_request_duration_seconds"]
    buckets = [(s.labels["le"], s.value) for s in duration.samples
               if s.name.endswith("_bucket") and s.labels["app"] == "/srv/shop"]
    assert buckets == [("0.005", 100), ("0.05", 115), ("0.5", 119), ("+Inf", 120)]
    assert value(duration, "agent_request_duration_seconds_sum", app="/srv/shop") == 3.25
    assert value(duration, "agent_request_duration_seconds_count", app="/srv/shop") == 120
    spawn = families()["agent_spawn_duration_seconds"]
    assert value(spawn, "agent_spawn_duration_seconds_bucket", app="/srv/shop", le="+Inf") == 4
    assert value(spawn, "agent_spawn_duration_seconds_bucket", app="/srv/shop", le="1.0") == 3


def test_an_app_without_a_histogram_has_no_buckets() -> None:
    duration = families()["agent_request_duration_seconds"]
    assert {s.labels["app"] for s in duration.samples} == {"/srv/shop"}


def test_label_values_are_escaped() -> None:
    text = render(snapshot())
    assert 'app="C:\\\\apps\\\\\\"quoted\\"\\nnext line"' in text
    requests = families()["agent_requests"]
    assert value(requests, "agent_requests_total", app='C:\\apps\\"quoted"\nnext line') == 1


def test_every_family_has_help_and_type_lines_before_its_samples() -> None:
    lines = render(snapshot()).splitlines()
    for index, line in enumerate(lines):
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert lines[index - 1].startswith(f"# HELP {name} ")
    assert sum(line.startswith("# TYPE ") for line in lines) == 14


def test_an_empty_snapshot_renders_uptime_only() -> None:
    found = {f.name: f for f in text_string_to_metric_families(render(MetricsSnapshot(uptime=0.5)))}
    assert [s.value for s in found["agent_uptime_seconds"].samples] == [0.5]
    assert all(not f.samples for name, f in found.items() if name != "agent_uptime_seconds")


def test_special_values_are_spelled_as_the_format_says() -> None:
    text = render(MetricsSnapshot(uptime=math.inf))
    assert "agent_uptime_seconds +Inf\n" in text


def test_histogram_rejects_mismatched_counts() -> None:
    with pytest.raises(ValueError):
        Histogram(bounds=(0.1, 1.0), counts=(1, 2), total=0.0)
    with pytest.raises(ValueError):
        Histogram(bounds=(1.0, 0.1), counts=(1, 2, 3), total=0.0)
