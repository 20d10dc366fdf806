"""examples/multi-host through faults: a load balancer (nginx) in front of
two hosts, each nginx with the agent in its own network namespace, the
sessions in Redis. Bounded load through the load balancer counts every
response while one host's agent core is SIGKILLed, while the hosts are
deployed one at a time (`agentctl restart-app --blocking`), and while one
host's nginx is stopped and started again (docs/scaling.md quotes the
figures these tests print)."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.integration.stack import REPO, wait_until
from tests.scale.front_load import FrontLoad, FrontResult

BENCHMARK_RANGE = ipaddress.ip_network("198.18.0.0/15")
OUTAGE_SECONDS = 12
LOG_TIME = re.compile(r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) ")


def load_cluster_module() -> ModuleType:
    path = REPO / "examples" / "multi-host" / "cluster.py"
    spec = importlib.util.spec_from_file_location("multihost_cluster", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


CLUSTER = load_cluster_module()


def report(test: str, **figures: object) -> None:
    print(f"\n[{test}] " + " ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with CLUSTER.running_cluster(hosts=2) as running:
        yield running
    # running_cluster removed them; nothing of the cluster outlives the tests.
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(running.prefix + "-")]


def front_load(cluster: Any, **kwargs: Any) -> FrontLoad:
    return FrontLoad(CLUSTER, cluster.lb_ns, CLUSTER.LB_ADDR, **kwargs)


def wait_for_more(load: FrontLoad, count: int) -> None:
    target = load.completed() + count
    wait_until(lambda: load.completed() >= target, timeout=60, what=f"{count} more responses")


def host_serves(host: Any) -> bool:
    try:
        return host.get("/")[0] == 200
    except OSError:
        return False


def test_namespaces_use_the_benchmark_range_and_have_no_route_out(cluster: Any) -> None:
    namespaces = [cluster.lb_ns] + [ns for ns, _ in cluster.network.members]
    for namespace in namespaces:
        routes = cluster.network.routes(namespace)
        assert not [r for r in routes if r.startswith("default")], (namespace, routes)
        for route in routes:
            if route.startswith(("local ", "broadcast ", "multicast ", "fe80", "local", "ff00")):
                continue
            assert ipaddress.ip_network(route.split()[0]).subnet_of(BENCHMARK_RANGE), (namespace, route)
        # Nothing outside answers from inside: no route to a public address.
        assert not CLUSTER.reachable(namespace, "1.1.1.1", 80)
    for host in cluster.hosts:
        assert ipaddress.ip_address(host.address) in BENCHMARK_RANGE


def test_each_host_publishes_its_status_behind_the_token(cluster: Any) -> None:
    for host in cluster.hosts:
        assert host.get("/agent/metrics")[0] == 401
        assert host.get("/agent/metrics", CLUSTER.basic_auth("not-the-token"))[0] == 401
        status, body = host.get("/agent/metrics", CLUSTER.basic_auth(cluster.token))
        assert status == 200 and b"agent_requests_total{" in body
    # The load balancer does not pass the status on.
    assert cluster.get("/agent/metrics", CLUSTER.basic_auth(cluster.token))[0] == 404


def assert_sessions_continue(result: FrontResult) -> None:
    """A session's views only grow, whichever host served each visit."""
    views: dict[str, list[int]] = defaultdict(list)
    for outcome in sorted((o for o in result.outcomes if o.ok), key=lambda o: o.answered):
        views[outcome.session].append(outcome.views)
    for session, counts in views.items():
        assert counts == sorted(counts) and len(set(counts)) == len(counts), session


def test_sessions_in_redis_follow_visits_across_hosts(cluster: Any) -> None:
    with front_load(cluster, threads=4, max_requests=800) as load:
        wait_until(lambda: load.completed() >= 800, timeout=120, what="800 responses")
    result = load.result
    hosts_per_session: dict[str, set[str]] = defaultdict(set)
    for outcome in result.outcomes:
        hosts_per_session[outcome.session].add(outcome.host)
    report("multi-host sessions", result=result.summary(), sessions=len(hosts_per_session))
    assert len(result.outcomes) == 800 and not result.failed(), result.summary()
    assert len(hosts_per_session) == 4
    assert all(hosts == {"h1", "h2"} for hosts in hosts_per_session.values()), hosts_per_session
    assert_sessions_continue(result)


def test_sigkill_of_one_hosts_agent_core_fails_no_get(cluster: Any) -> None:
    host = cluster.hosts[0]
    old_core = host.core_pid()
    with front_load(cluster) as load:
        wait_for_more(load, 500)
        killed_at = time.time()
        os.kill(old_core, signal.SIGKILL)
        wait_until(lambda: host.core_pid() != old_core and host_serves(host), timeout=30,
                   what="the new core to serve")
        serving_again = time.time() - killed_at
        wait_for_more(load, 500)
    result = load.result
    report("multi-host core kill", result=result.summary(), host_serving_again_s=f"{serving_again:.2f}",
           after_kill=dict(result.hosts(killed_at)))
    assert not result.failed(), result.failed()[:5]
    assert result.hosts(killed_at + serving_again)["h1"] > 0, "h1 never served again"
    assert_sessions_continue(result)


def test_rolling_deploy_one_host_at_a_time_fails_no_get(cluster: Any) -> None:
    with front_load(cluster) as load:
        wait_for_more(load, 500)
        deployed = {}
        for host in cluster.hosts:
            old = host.worker_pids()
            restart = host.restart_app()
            assert restart.returncode == 0, restart.stderr
            deployed[host.name] = (old, host.worker_pids())
            wait_for_more(load, 300)
    result = load.result
    report("multi-host rolling deploy", result=result.summary(),
           workers={name: f"{sorted(old)}->{sorted(new)}" for name, (old, new) in deployed.items()})
    assert not result.failed(), result.failed()[:5]
    for name, (old, new) in deployed.items():
        assert new and not old & new, (name, old, new)
    assert_sessions_continue(result)


def marked_down_at(cluster: Any, address: str, after: float) -> float | None:
    """When the load balancer first logged the host as down (its error log
    has whole seconds: the time returned is the end of that second)."""
    for line in cluster.lb_error_log.read_text().splitlines():
        found = LOG_TIME.match(line)
        if not found or "temporarily disabled" not in line or f"{address}:80" not in line:
            continue
        at = time.mktime(time.strptime(found.group(1), "%Y/%m/%d %H:%M:%S")) + 1
        if at >= after:
            return at
    return None


def test_one_hosts_nginx_stopped_and_started_again(cluster: Any) -> None:
    host = cluster.hosts[1]
    with front_load(cluster) as load:
        wait_for_more(load, 500)
        stopped_at = time.time()
        host.stop()
        stopped = time.time()
        # Down for longer than two of the load balancer's fail_timeout
        # (5 s): it probes the host again each time and marks it down again.
        time.sleep(OUTAGE_SECONDS)
        restart_at = time.time()
        host.start()
        back_at = time.time()
        wait_until(lambda: load.result.hosts(back_at)[host.name] > 0, timeout=30,
                   what="the load balancer to use the host again")
        wait_for_more(load, 500)
    result = load.result
    down_at = marked_down_at(cluster, host.address, stopped_at - 1)
    report("multi-host nginx outage", result=result.summary(),
           stopping_s=f"{stopped - stopped_at:.2f}", down_s=f"{back_at - stopped:.2f}",
           marked_down_after_s=None if down_at is None else f"{down_at - stopped_at:.0f}",
           failed_during_outage=len(result.failed(stopped_at, back_at)),
           failed_once_marked_down=None if down_at is None else len(result.failed(down_at, restart_at)),
           sent_once_marked_down=None if down_at is None else result.sent_between(down_at, restart_at),
           hosts_during_outage=dict(result.hosts(stopped, restart_at)))
    assert down_at is not None, "the load balancer never marked the host down"
    assert result.sent_between(down_at, restart_at) > 0
    assert not result.failed(down_at, restart_at), result.failed(down_at, restart_at)[:5]
    assert result.hosts(stopped, restart_at)[host.name] == 0
    assert_sessions_continue(result)
