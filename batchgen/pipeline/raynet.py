"""Starting or joining Ray from the driver, on loopback where it is local, and naming actors."""

from __future__ import annotations

import os
import socket
import time
from typing import Optional

import ray


def replica_name(job: str, index: int) -> str:
    """The actor name of replica ``index`` of ``job`` (also its metrics' ``replica`` label);
    tensor-parallel ranks add ``-rank-<r>``."""
    return f"batchgen-{job}-replica-{index}"


def connect(address: Optional[str] = None, dashboard: bool = True) -> None:
    """Join the cluster at ``address`` (else ``RAY_ADDRESS``), or start a private local Ray on
    127.0.0.1 when neither is set.

    Without an address a new Ray is always started (``address="local"``), even when a head
    started by ``cluster/start-local-head.sh`` runs on this machine: Ray's default would join that
    head (found through ``ray_current_cluster`` or the process list) from the host's routable
    address, where nothing listens, and wait 60 s. To run on the head, set ``RAY_ADDRESS`` (its
    ``env.sh`` does) or submit with ``ray job submit``.

    Raises:
        ConnectionError: the cluster cannot be reached; the message names the address and what
            to check.
    """
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target is None or is_loopback(target):
        keep_ray_on_loopback()
    if target is not None:
        check_reachable(target)
    try:
        if target is None:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=dashboard,
                     dashboard_host="127.0.0.1")
        else:
            ray.init(address=address or "auto")
    except ConnectionError as exc:
        raise ConnectionError(f"cannot connect to the Ray cluster at {target}: {exc}; check RAY_ADDRESS (and "
                              "RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH for a head with token auth: source its "
                              "env.sh), or unset it to run on a private local Ray") from exc


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing accepts connections at a ``host:port`` Ray address (Ray itself
    retries for 60 s, or aborts the process, before saying so); other forms pass unchecked.

    Raises:
        ConnectionError: naming the address and what to check.
    """
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves them
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"cannot connect to the Ray cluster at {address} ({exc}); check RAY_ADDRESS "
                              "(a local head's is in its env.sh), or unset it to run on a private local Ray") from exc


def is_loopback(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``ray://host:port``) names this machine's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def keep_ray_on_loopback() -> None:
    """Make this process and every Ray process it starts keep 127.0.0.1 as the node address.

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's single-node switch: without it Ray rewrites
    127.0.0.1 to the host's routable address (``services.resolve_ip_for_localhost``), so a local
    Ray listens on every interface and a driver joining a loopback head waits for a GCS at an
    address where it never listened. Ray reads the variable when it is imported: the environment
    covers the processes it starts, the already-imported constant covers this one (library
    callers import ray long before they call ``run_job``).
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def wait_names_free(names: list[str], timeout_s: float = 10.0) -> None:
    """Wait until no live actor holds any of ``names`` (``ray.kill`` returns before the GCS frees
    them), so that the next run in this process can name its actors the same; give up quietly
    after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name)
            except ValueError:
                break
            time.sleep(0.05)
