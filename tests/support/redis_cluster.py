"""A throwaway Redis Cluster on 127.0.0.1: three primaries and three replicas, made at test
time from Debian's ``redis-server`` (``--cluster-enabled yes``) and
``redis-cli --cluster create``.

Every node runs on a free port with a free cluster bus port, in a directory of its own;
:meth:`ClusterSet.stop` stops them all (the fixture calls it, also when a test fails).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from support.procs import HOST, free_port, stop_each, wait_for
from support.redis_ha import ask, role
from support.redis_server import RedisServer
from support.tls import RedisTls

__all__ = ["ClusterSet"]


class ClusterSet:
    """Six ``redis-server`` nodes made into a cluster of three shards.

    :ivar nodes: The nodes, in the order they were given to ``redis-cli``.
    """

    def __init__(
        self,
        work_dir: Path,
        redis_exe: str,
        node_timeout_ms: int = 1000,
        tls: RedisTls | None = None,
    ) -> None:
        """Prepare the nodes in *work_dir*; :meth:`start` starts them and makes the cluster.

        :param work_dir: An empty directory.
        :param redis_exe: Path of ``redis-server``.
        :param node_timeout_ms: ``cluster-node-timeout``: how long a node may be silent
            before the others count it as failing.
        :param tls: Every node speaks TLS only (the cluster bus too), with this certificate.
        """
        self.tls = tls
        self.nodes: list[RedisServer] = []
        for i in range(6):
            node_dir = work_dir / f"node{i}"
            node_dir.mkdir()
            port = free_port()
            args = [
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(free_port()),
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                str(node_timeout_ms),
                # A replica cut from its primary (as the failover tests cut it) must still
                # be promoted: by default it counts its data as too old after the cut.
                "--cluster-replica-validity-factor",
                "0",
                "--repl-diskless-sync-delay",
                "0",
            ]
            self.nodes.append(RedisServer(node_dir, port, redis_exe, args, tls))
        self.cli = shutil.which("redis-cli") or "redis-cli"

    @property
    def url(self) -> str:
        """The bus URL, naming three of the nodes (``rediss+cluster://`` with TLS)."""
        nodes = ",".join(f"{HOST}:{n.port}" for n in self.nodes[:3])
        if self.tls is not None:
            return f"rediss+cluster://{nodes}/?{self.tls.query()}"
        return f"redis+cluster://{nodes}/"

    def start(self, timeout: float = 60) -> ClusterSet:
        """Start the nodes, make the cluster, and wait until every node says it is ok.

        :param timeout: Seconds to wait for each step.
        :returns: ``self``.
        :raises RuntimeError: If the cluster is not made or not ok in time.
        """
        for node in self.nodes:
            node.start()
        addresses = [f"{HOST}:{node.port}" for node in self.nodes]
        options = ["--cluster-replicas", "1", "--cluster-yes"]
        tls = self.tls.cli_args() if self.tls else []
        made = subprocess.run(
            [self.cli, *tls, "--cluster", "create", *addresses, *options],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if made.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{made.stdout}{made.stderr}")
        if not wait_for(self.ready, timeout, 0.1):
            raise RuntimeError("the cluster did not become ok, or a replica did not sync")
        return self

    def ready(self) -> bool:
        """Whether every node says the cluster is ok and every replica has synced."""
        roles = [role(node.port) for node in self.nodes]
        synced = all(r.get("master_link_status") == "up" for r in roles if r.get("role") == "slave")
        return (
            synced
            and sum(r.get("role") == "slave" for r in roles) == 3
            and all(self.ok(node) for node in self.nodes)
        )

    @staticmethod
    def ok(node: RedisServer) -> bool:
        """Whether *node* runs and says the cluster is ok."""
        info = ask(node.port, "CLUSTER", "INFO") if node.running() else None
        return isinstance(info, bytes) and b"cluster_state:ok" in info

    def owner(self, key: str) -> RedisServer | None:
        """The primary serving *key*, as a running node sees it (``None``: none can say)."""
        for node in self.nodes:
            if not node.running():
                continue
            slot = ask(node.port, "CLUSTER", "KEYSLOT", key)
            ranges = ask(node.port, "CLUSTER", "SLOTS")
            if slot is None or ranges is None:
                continue
            for first, last, primary, *_ in ranges:
                if first <= slot <= last:
                    return next((n for n in self.nodes if n.port == primary[1]), None)
        return None

    def switched(self, key: str, old: RedisServer) -> bool:
        """Whether another, running node now serves *key* and the cluster is ok again."""
        owner = self.owner(key)
        return owner is not None and owner is not old and owner.running() and self.ok(owner)

    def stop(self) -> None:
        """Stop every node."""
        stop_each(node.stop for node in self.nodes)
