"""One load balancer in front of several hosts, each running nginx with the
agent, on one machine: every host, the load balancer and Redis in a network
namespace of its own, joined by a bridge.

    namespace   address          runs
    PREFIX-lb   198.18.0.1/24    nginx: the load balancer (upstream, max_fails,
                                 proxy_next_upstream), on the bridge
    PREFIX-db   198.18.0.3/24    redis-server: the app's sessions
    PREFIX-h1   198.18.0.11/24   nginx with ngx_http_agent_module, its agent, the app's workers
    PREFIX-h2   198.18.0.12/24   ...

Addresses come from 198.18.0.0/15, the range reserved for benchmarking
(RFC 2544); no namespace has a default route, so nothing leaves them. Each
host publishes the agent's status at /agent/ behind a token (HTTP basic
auth, user "prometheus"). The hosts' agents keep their sockets in separate
instance directories (Unix sockets are not namespaced by network namespace,
only by path), so several agents run side by side.

    python examples/multi-host/cluster.py [--hosts N]     # make multi-host

sets it up, prints how to reach it, and tears everything down on Ctrl-C.
tests/scale/test_multi_host.py drives the same cluster through faults.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODULE = REPO / "build" / "ngx_http_agent_module.so"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
APP_PYTHON = "/usr/bin/python3"
NGINX_USER = "www-data"
SUBNET = "198.18.0"
LB_ADDR = f"{SUBNET}.1"
DB_ADDR = f"{SUBNET}.3"
REDIS_PORT = 6379
STATUS_USER = "prometheus"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def tool_env() -> dict[str, str]:
    """The environment of the system's tools (ip): without a preloaded
    library, such as the sanitizer runtimes `make sanitize` preloads for the
    agent's instrumented engine, which these tools were not built for."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60, env=tool_env())


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


# -- network namespaces ----------------------------------------------------------


def socket_in(namespace: str) -> socket.socket:
    """A TCP socket created inside `namespace`: setns() moves only the calling
    thread, so a short-lived thread enters the namespace and makes the socket,
    which stays in that namespace's network whoever uses it."""
    made: list[socket.socket] = []
    failed: list[int] = []

    def enter_and_make() -> None:
        fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                failed.append(ctypes.get_errno())
                return
        finally:
            os.close(fd)
        made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))

    thread = threading.Thread(target=enter_and_make)
    thread.start()
    thread.join()
    if failed or not made:
        raise OSError(failed[0] if failed else 0, f"cannot enter network namespace {namespace}")
    return made[0]


class NamespacedConnection(http.client.HTTPConnection):
    """http.client's connection, from inside a network namespace."""

    def __init__(self, namespace: str, host: str, port: int = 80, timeout: float = 30.0) -> None:
        super().__init__(host, port, timeout=timeout)
        self.namespace = namespace

    def connect(self) -> None:
        sock = socket_in(self.namespace)
        sock.settimeout(self.timeout)
        try:
            sock.connect((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock


def reachable(namespace: str, address: str, port: int) -> bool:
    try:
        with socket_in(namespace) as sock:
            sock.settimeout(1)
            return sock.connect_ex((address, port)) == 0
    except OSError:
        return False


@dataclass
class Network:
    """The namespaces and the bridge that joins them."""

    prefix: str
    members: list[tuple[str, str]] = field(default_factory=list)   # (namespace, address)

    @property
    def lb(self) -> str:
        return f"{self.prefix}-lb"

    def create(self, members: list[tuple[str, str]]) -> None:
        run("ip", "netns", "add", self.lb)
        run("ip", "-n", self.lb, "link", "set", "lo", "up")
        run("ip", "-n", self.lb, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.lb, "addr", "add", f"{LB_ADDR}/24", "dev", "br0")
        run("ip", "-n", self.lb, "link", "set", "br0", "up")
        for index, (namespace, address) in enumerate(members):
            run("ip", "netns", "add", namespace)
            self.members.append((namespace, address))
            port = f"p{index}"
            run("ip", "-n", self.lb, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", namespace)
            run("ip", "-n", self.lb, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", namespace, "link", "set", "eth0", "up")
            run("ip", "-n", namespace, "link", "set", "lo", "up")

    def routes(self, namespace: str) -> list[str]:
        out = subprocess.run(["ip", "-n", namespace, "route", "show", "table", "all"], check=True,
                             capture_output=True, text=True, env=tool_env()).stdout
        return [line for line in out.splitlines() if line.strip()]

    def remove(self) -> None:
        """Deleting a namespace deletes its veth ends, and their peers."""
        for namespace in [self.lb, *(name for name, _ in self.members)]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, env=tool_env())
        self.members.clear()


# -- processes --------------------------------------------------------------------


def stop_process(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGQUIT, timeout: float = 30) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def temp_paths(root: Path) -> str:
    temp = root / "tmp"
    temp.mkdir(parents=True, exist_ok=True)
    return "\n".join(f"    {kind}_temp_path {temp / kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def write_htpasswd(path: Path, token: str) -> None:
    """The status token as the password of user "prometheus", salted SHA-1."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(token.encode() + salt).digest()
    path.write_text(f"{STATUS_USER}:{{SSHA}}{base64.b64encode(digest + salt).decode()}\n")
    os.chmod(path, 0o644)


def basic_auth(token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{STATUS_USER}:{token}".encode()).decode()}


@dataclass
class Host:
    """One host: nginx with the module in its own namespace, the agent it
    starts (instance directory ROOT/instance), the app's workers."""

    name: str
    namespace: str
    address: str
    root: Path
    app_python: Path
    core_python: str
    redis_url: str
    token: str
    workers: int = 2
    process: subprocess.Popen[bytes] | None = None

    @property
    def instance(self) -> Path:
        return self.root / "instance"

    @property
    def app_root(self) -> Path:
        return self.root / "app"

    @property
    def config(self) -> Path:
        return self.root / "nginx.conf"

    def config_text(self) -> str:
        return f"""load_module {MODULE};
daemon off;
master_process on;
user {NGINX_USER};
worker_processes 1;
pid {self.root / 'nginx.pid'};
error_log {self.root / 'error.log'} info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp_paths(self.root)}
    agent_temp_path {self.root / 'tmp' / 'agent'};
    agent_core_python {self.core_python};
    agent_instance_dir {self.instance};
    agent_log_file {self.root / 'agent.log'};
    agent_max_pool_size {self.workers + 2};
    server {{
        listen {self.address}:80;
        location / {{
            root {self.app_root / 'public'};
            agent_enabled on;
            agent_app_root {self.app_root};
            agent_python {self.app_python};
            agent_env REDIS_URL {self.redis_url};
            agent_env HOST_NAME {self.name};
            agent_min_instances {self.workers};
            agent_max_instances {self.workers};
            agent_prestart on;
        }}
        location /agent/ {{
            auth_basic "agent status";
            auth_basic_user_file {self.root / 'agent-status.htpasswd'};
            agent_status on;
        }}
    }}
}}
"""

    def deploy(self) -> None:
        """The app's files and the configuration (a host's own copy)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.app_root.exists():
            shutil.rmtree(self.app_root)
        shutil.copytree(HERE / "app", self.app_root)
        write_htpasswd(self.root / "agent-status.htpasswd", self.token)
        self.config.write_text(self.config_text())
        subprocess.run(["chmod", "-R", "a+rX", str(self.root)], check=True)

    def start(self) -> None:
        self.deploy()
        command = ["ip", "netns", "exec", self.namespace, NGINX, "-p", str(self.root), "-c", str(self.config),
                   "-e", str(self.root / "error.log")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.process is not None and self.process.poll() is None
                   and reachable(self.namespace, self.address, 80), 20, f"{self.name}'s nginx")
        wait_until(lambda: len(self.worker_pids()) >= self.workers, 30, f"{self.name}'s workers")

    def stop(self) -> None:
        """nginx -s quit: nginx finishes its requests; the agent stops with it."""
        stop_process(self.process)
        self.process = None
        wait_until(lambda: not self.watchdog_alive(), 30, f"{self.name}'s agent to stop")

    def watchdog_alive(self) -> bool:
        try:
            os.kill(int((self.instance / "watchdog.pid").read_text()), 0)
        except (OSError, ValueError):
            return False
        return True

    def core_pid(self) -> int:
        return int((self.instance / "core.pid").read_text())

    def pool(self) -> dict[str, Any]:
        out = subprocess.run([self.core_python, "-m", "agent.cli", "--instance", str(self.instance),
                              "status", "--json"], cwd=REPO, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return {}
        pool: dict[str, Any] = json.loads(out.stdout)["pool"]
        return pool

    def worker_pids(self) -> set[int]:
        apps = self.pool().get("apps") or []
        return {p["pid"] for app in apps for p in app["processes"] if p["state"] in ("serving", "idle")}

    def restart_app(self) -> subprocess.CompletedProcess[str]:
        """A rolling restart of the host's app, returning once it is done."""
        return subprocess.run([self.core_python, "-m", "agent.cli", "--instance", str(self.instance),
                               "restart-app", str(self.app_root), "--blocking"],
                              cwd=REPO, capture_output=True, text=True, timeout=180)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """A request to this host directly, from the load balancer's namespace."""
        return request(self.namespace, self.address, path, headers)


def request(namespace: str, address: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = NamespacedConnection(namespace, address, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- the load balancer and the cluster -----------------------------------------------


@dataclass
class Cluster:
    """Network, Redis, N hosts and the load balancer, under run_dir."""

    run_dir: Path
    hosts_count: int = 2
    prefix: str = ""
    core_python: str = sys.executable
    app_python: Path | None = None
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    hosts: list[Host] = field(default_factory=list)
    network: Network | None = None
    redis: subprocess.Popen[bytes] | None = None
    lb: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.prefix = self.prefix or f"ag{os.getpid() % 100000}"

    @property
    def lb_ns(self) -> str:
        return f"{self.prefix}-lb"

    @property
    def lb_error_log(self) -> Path:
        return self.run_dir / "lb" / "error.log"

    def upstream_lines(self) -> str:
        # max_fails=1: the first failed attempt marks a host down for
        # fail_timeout; its request goes on to the next host.
        return "\n".join(f"        server {host.address}:80 max_fails=1 fail_timeout=5s;" for host in self.hosts)

    def lb_config_text(self) -> str:
        root = self.run_dir / "lb"
        return f"""daemon off;
master_process on;
user {NGINX_USER};
worker_processes 1;
pid {root / 'nginx.pid'};
error_log {self.lb_error_log} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp_paths(root)}
    upstream app {{
{self.upstream_lines()}
        keepalive 32;
    }}
    server {{
        listen {LB_ADDR}:80;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            # An idempotent request that met an error, a timeout, a 502 or
            # a 503 is sent to the next host (nginx never resends a POST
            # once sent: that takes `non_idempotent`).
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
        }}
        location /agent/ {{
            return 404;
        }}
    }}
}}
"""

    def app_virtualenv(self) -> Path:
        venv = self.run_dir / "venv"
        run(APP_PYTHON, "-m", "venv", str(venv))
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-r", str(HERE / "requirements.txt")], check=True, capture_output=True, timeout=300)
        return venv / "bin" / "python"

    def start(self) -> Cluster:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o755)
        self.app_python = self.app_python or self.app_virtualenv()
        names = [f"h{i + 1}" for i in range(self.hosts_count)]
        members = [(f"{self.prefix}-db", DB_ADDR)] + [
            (f"{self.prefix}-{name}", f"{SUBNET}.{11 + i}") for i, name in enumerate(names)]
        self.network = Network(self.prefix)
        self.network.create(members)
        self.start_redis()
        redis_url = f"redis://{DB_ADDR}:{REDIS_PORT}/0"
        for (namespace, address), name in zip(members[1:], names, strict=True):
            host = Host(name, namespace, address, self.run_dir / name, self.app_python, self.core_python,
                        redis_url, self.token)
            self.hosts.append(host)
            host.start()
        self.start_lb()
        subprocess.run(["chmod", "-R", "a+rX", str(self.run_dir)], check=True)
        return self

    def start_redis(self) -> None:
        directory = self.run_dir / "db"
        directory.mkdir(exist_ok=True)
        self.redis = subprocess.Popen(
            ["ip", "netns", "exec", f"{self.prefix}-db", REDIS_SERVER, "--bind", DB_ADDR, "--port", str(REDIS_PORT),
             "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(directory),
             "--daemonize", "no", "--logfile", str(directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: reachable(self.lb_ns, DB_ADDR, REDIS_PORT), 15, "redis-server")

    def start_lb(self) -> None:
        root = self.run_dir / "lb"
        root.mkdir(exist_ok=True)
        (root / "nginx.conf").write_text(self.lb_config_text())
        self.lb = subprocess.Popen(
            ["ip", "netns", "exec", self.lb_ns, NGINX, "-p", str(root), "-c", str(root / "nginx.conf"),
             "-e", str(self.lb_error_log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: reachable(self.lb_ns, LB_ADDR, 80), 15, "the load balancer")

    def stop(self) -> None:
        """Everything this cluster started, in reverse, then the namespaces."""
        stop_process(self.lb)
        for host in self.hosts:
            with contextlib.suppress(TimeoutError):
                host.stop()
        stop_process(self.redis, signal.SIGTERM)
        if self.network is not None:
            self.network.remove()

    def get(self, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """A request through the load balancer."""
        return request(self.lb_ns, LB_ADDR, path, headers)


@contextlib.contextmanager
def running_cluster(hosts: int = 2, app_python: Path | None = None) -> Iterator[Cluster]:
    run_dir = Path(tempfile.mkdtemp(prefix="agent-multihost-", dir="/tmp"))
    cluster = Cluster(run_dir, hosts, app_python=app_python)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=2, help="how many hosts (2)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root: it creates network namespaces and runs nginx and the agent as root", file=sys.stderr)
        return 1
    if not MODULE.exists():
        print(f"{MODULE} is missing: run `make build` first", file=sys.stderr)
        return 1
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    with running_cluster(args.hosts) as cluster:
        status, body = cluster.get("/")
        print(f"load balancer: http://{LB_ADDR}/ in namespace {cluster.lb_ns} -> {status} {body.decode().strip()}")
        print(f"    ip netns exec {cluster.lb_ns} curl -s http://{LB_ADDR}/")
        for host in cluster.hosts:
            print(f"{host.name}: {host.address} in {host.namespace}, instance {host.instance}")
            print(f"    ip netns exec {cluster.lb_ns} curl -s -u {STATUS_USER}:{cluster.token} "
                  f"http://{host.address}/agent/metrics")
        print(f"configurations under {cluster.run_dir}; Ctrl-C stops everything")
        with contextlib.suppress(KeyboardInterrupt):
            while not stopping.wait(1):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
