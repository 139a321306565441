"""A real Ray cluster on this machine for the Ray backend's tests: a head and a second node, one
CPU each, started once per test run (Ray takes about 15 s to start) by the session fixture
`ray_cluster` in conftest.py. Tests find the worker processes running a task, kill them, and add
and remove nodes, as a cluster would lose them."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

NODE_CPUS = 1
# Each node offers this much memory to tasks: a test needs a job larger than any node.
NODE_MEMORY = 2 << 30
OBJECT_STORE = 80 << 20  # tasks exchange only a recipe and checksums
TASK_TITLE = "ray::mergesmith "  # the title of a worker process running one of our tasks


@dataclass
class RayTestCluster:
    cluster: Any  # ray.cluster_utils.Cluster

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self) -> Any:
        node = self.cluster.add_node(
            num_cpus=NODE_CPUS, memory=NODE_MEMORY, object_store_memory=OBJECT_STORE
        )
        self.cluster.wait_for_nodes()
        return node

    def remove_node(self, node: Any) -> None:
        """Lose a node as a crash would: its raylet and workers are killed, no draining."""
        self.cluster.remove_node(node, allow_graceful=False)

    def running_tasks(self, node: Any = None) -> list[Any]:
        """psutil processes of workers running a mergesmith task, on `node` or on any node."""
        import psutil

        nodes = [node] if node is not None else self._nodes()
        found = []
        for one in nodes:
            for info in one.all_processes.get("raylet", []):
                try:
                    children = psutil.Process(info.process.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                for child in children:
                    try:
                        title = " ".join(child.cmdline())
                    except psutil.Error:
                        continue
                    if title.startswith(TASK_TITLE):
                        found.append(child)
        return found

    def wait_for_running_task(self, node: Any = None, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = self.running_tasks(node)
            if running:
                return running[0]
            time.sleep(0.01)
        pytest.fail(f"no worker ran a mergesmith task within a minute: {self._titles()}")

    def _titles(self) -> dict[str, list[str]]:
        import psutil

        seen = {}
        for one in self._nodes():
            for info in one.all_processes.get("raylet", []):
                try:
                    kids = psutil.Process(info.process.pid).children(recursive=True)
                    seen[one.unique_id] = [" ".join(k.cmdline())[:60] for k in kids]
                except psutil.Error as exc:
                    seen[one.unique_id] = [repr(exc)]
        return seen

    def _nodes(self) -> list[Any]:
        return [self.cluster.head_node, *self.cluster.worker_nodes]


def start_test_cluster() -> Iterator[RayTestCluster]:
    ray = pytest.importorskip(
        "ray",
        reason="Ray is not installed (pip install 'mergesmith[ray]'): Ray backend tests skipped",
    )
    from ray.cluster_utils import Cluster

    node_args = {
        "num_cpus": NODE_CPUS,
        "memory": NODE_MEMORY,
        "object_store_memory": OBJECT_STORE,
    }
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={**node_args, "include_dashboard": False},
    )
    handler = signal.getsignal(signal.SIGTERM)
    try:
        cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        # This process is the driver of the in-process merges: merge(backend="ray") uses
        # the connection it finds.
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        signal.signal(signal.SIGTERM, handler)  # ray.init installs its own
        yield RayTestCluster(cluster)
    finally:
        signal.signal(signal.SIGTERM, handler)
        ray.shutdown()
        cluster.shutdown()
