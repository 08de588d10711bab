"""Fixtures for the interop tests with third-party Python SignalR clients.

The servers are the project's real binaries (`STICKLESS_BIN`, `STICKLESS_CLUSTER_BIN`,
default `target/debug/…`): one `stickless` instance with the in-process backplane, and
a `stickless-cluster` of three instances behind the repo's round-robin nginx, with
redis-server. Both can restart the instance a client is on, for automatic-reconnect tests.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 90


def binary(variable, default):
    path = Path(os.environ.get(variable, REPO / default))
    if not path.exists():
        pytest.exit(f"{path} is missing: run `cargo build --bins` first", returncode=2)
    return str(path)


def free_port():
    """A free loopback port below the kernel's ephemeral range, picked at random.

    The instance binds it later and again after each restart; a port from `bind(0)` lies in
    the ephemeral range, where any outgoing connection (to Redis, from a test's client)
    could take it in between. The launcher picks its ports the same way.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            floor = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        floor = 32768
    for _ in range(200 if floor > 11000 else 0):
        port = random.randrange(10000, floor)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_line(process, what, pattern, timeout=START_TIMEOUT):
    """The first stdout line of `process` matching `pattern`, or a failure after `timeout`."""
    found = {}

    def scan():
        for line in process.stdout:
            match = re.search(pattern, line)
            if match:
                found["match"] = match
                return

    reader = threading.Thread(target=scan, daemon=True)
    reader.start()
    reader.join(timeout)
    if "match" not in found:
        raise RuntimeError(f"{what}: no line matching {pattern!r} within {timeout}s")
    return found["match"]


class Single:
    """One `stickless` instance on a fixed port, restartable."""

    kind = "single"

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.start()

    def start(self):
        env = dict(
            os.environ,
            LISTEN_ADDR=f"127.0.0.1:{self.port}",
            STATIC_DIR=str(REPO / "static"),
            RUST_LOG="warn",
            SHUTDOWN_TIMEOUT="1s",
            POLL_TIMEOUT="5s",
            # signalrcore's stop() waits for its reader thread, which wakes on the next
            # frame: frequent Pings keep teardown short.
            KEEP_ALIVE_INTERVAL="1s",
        )
        self.process = subprocess.Popen(
            [binary("STICKLESS_BIN", "target/debug/stickless")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        read_line(self.process, "stickless", r"^stickless listening on ")
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def restart(self, instance_id=None):
        """Stops the instance gracefully (its clients get a Close that allows reconnecting)
        and starts it again on the same port."""
        self.stop()
        self.start()

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


class Cluster:
    """`stickless-cluster`: redis-server, three instances and nginx; instances restartable."""

    kind = "cluster"

    def __init__(self, instances=3):
        self.process = subprocess.Popen(
            [
                binary("STICKLESS_CLUSTER_BIN", "target/debug/stickless-cluster"),
                "--instances",
                str(instances),
                "--stop-on-stdin-eof",
                "--nginx-conf",
                str(REPO / "nginx.conf"),
                "--static-dir",
                str(REPO / "static"),
                "--env",
                "SHUTDOWN_TIMEOUT=1s",
                "--env",
                "POLL_TIMEOUT=5s",
                "--env",
                "KEEP_ALIVE_INTERVAL=1s",
            ],
            env=dict(os.environ, RUST_LOG="warn"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        ready = json.loads(read_line(self.process, "stickless-cluster", r"^\{.*\}$").group(0))
        self.url = ready["url"]
        self.instances = [i["id"] for i in ready["instances"]]

    def restart(self, instance_id):
        """Restarts the instance named `instance_id` on its port."""
        index = self.instances.index(instance_id)
        self.process.stdin.write(f"restart {index}\n")
        self.process.stdin.flush()
        answer = json.loads(read_line(self.process, "restart", r"^\{.*\}$").group(0))
        assert answer == {"restarted": index}, answer

    def stop(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


@pytest.fixture(scope="module", params=["single", "cluster"])
def deployment(request):
    server = Single() if request.param == "single" else Cluster()
    yield server
    server.stop()
