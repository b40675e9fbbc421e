"""Tensor-parallel replicas on Ray: one replica is ``model.tensor_parallel`` rank actors.

The ranks of a replica share one placement group (``STRICT_PACK``, one bundle per rank:
``{"GPU": 1, "CPU": 1}`` on a GPU cluster, ``{"CPU": 1}`` on a CPU one), so they always land on
one node, and form one ``torch.distributed`` group (:mod:`batchgen.engine.tp`): NCCL on GPUs,
gloo on CPUs. Rank 0 (:class:`TPLeaderReplica`) is a :class:`~batchgen.pipeline.replica.Replica`
whose engine is a :class:`~batchgen.engine.tp.TPLeaderLLM`: it leases shards, schedules, samples
and publishes exactly like a single-process replica. Ranks 1..N-1 (:class:`TPFollower`) run
:func:`~batchgen.engine.tp.follower_loop` and never talk to the queue.

Start-up never blocks the caller unless asked to: rank 0 picks a free port on its node, and Ray
hands that endpoint (an ObjectRef) to the followers, so every rank joins the group as soon as its
process is up. :meth:`TPReplicaGroup.start` with ``wait=True`` additionally waits for the set-up.

Failures. Any rank that dies takes the whole replica with it, and only new processes on every
rank can form a new group:

- a follower dies or freezes: rank 0's next step raises :class:`~batchgen.engine.tp.TPError`
  (at once on a closed socket, else after ``timeout_s``) and rank 0 exits on purpose; its lease
  is handed back by the driver (``queue.release_replica``).
- rank 0 dies: every follower's ``serve`` fails within ``timeout_s``.
- either way the driver sees one of the replica's refs (:meth:`TPReplicaGroup.run` and
  :meth:`TPReplicaGroup.alive_refs`) fail, returns the replica's leases to the queue and calls
  :meth:`TPReplicaGroup.restart`, which kills every rank and the placement group and starts anew.

No rank waits forever on its own either: set-up waits end after ``setup_timeout_s`` and every
collective after ``timeout_s``.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import ray
import torch
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from batchgen.engine import CompletionOutput, SamplingParams
from batchgen.engine.tp import TPError, TPLeaderLLM, destroy_tp_group, follower_loop, init_tp_group
from batchgen.pipeline.exits import EXIT_ON_PURPOSE
from batchgen.pipeline.raynet import keep_ray_on_loopback, wait_names_free
from batchgen.pipeline.replica import Replica
from batchgen.pipeline.spec import JobSpec
from batchgen.pipeline.worker import ShardWorker

#: Collective timeout of a step: how long a dead or frozen rank can stall the others.
TP_TIMEOUT_S = 120.0
#: Longest wait for the ranks' process start and model loading (big checkpoints take minutes).
SETUP_TIMEOUT_S = 1800.0
#: Where rank 0 hosts a replica's rendezvous (see :meth:`_Rank.endpoint`).
RENDEZVOUS_HOST = "127.0.0.1"
#: Ray's default worker ports (--min/max-worker-port): a rendezvous port must stay clear of them.
RAY_WORKER_PORTS = range(10002, 20000)


class TPReplicaError(RuntimeError):
    """A tensor-parallel replica could not be placed or set up."""


# --------------------------------------------------------------------------------------- rank side

def _free_port(host: str) -> int:
    """A port that is free on ``host`` now, outside Ray's worker port range."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in RAY_WORKER_PORTS:
            return port
    raise TPError(f"no free port outside {RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1} on {host}")


def _uses_gpu() -> bool:
    return bool(ray.get_gpu_ids())


def _set_cpu_threads() -> None:
    # A CPU rank reserves one core ({"CPU": 1}); more threads would fight its neighbours.
    if not _uses_gpu():
        torch.set_num_threads(1)


def _join_group(rank: int, endpoint: tuple[str, int], infos: Sequence[dict], timeout_s: float,
                setup_timeout_s: float) -> torch.device:
    """Join this rank to its replica's group (``infos``: every rank's :meth:`_Rank.info`)."""
    host, port = endpoint
    if len({info["ip"] for info in infos}) != 1:  # the rendezvous is on loopback: one node only
        raise TPError(f"the ranks of a tensor-parallel replica must share one node; got "
                      f"{[info['ip'] for info in infos]}")
    gpus = [g for info in infos for g in info["gpus"]]
    if not gpus:
        return init_tp_group(rank, len(infos), host, port, device="cpu", timeout_s=timeout_s,
                             setup_timeout_s=setup_timeout_s)
    if len(gpus) != len(infos):
        raise TPError(f"a tensor-parallel replica needs one GPU per rank, all on one node; got "
                      f"{[(info['ip'], info['gpus']) for info in infos]}")
    if torch.cuda.is_initialized():
        raise TPError("CUDA was initialised before the rank joined its group; GPU visibility can no longer change")
    # Ray shows each actor only its own GPU. NCCL then cannot use peer-to-peer/NVLink between
    # the ranks (slow, and known to hang on NVSwitch machines), so every rank sees the whole
    # replica's GPUs, in rank order, and picks its own.
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return init_tp_group(rank, len(infos), host, port, device=f"cuda:{rank}", timeout_s=timeout_s,
                         setup_timeout_s=setup_timeout_s)


class _Rank:
    """What every rank actor answers before it joins its group."""

    def info(self) -> dict:
        """This rank's process, node address and Ray-assigned GPU ids."""
        return {"pid": os.getpid(), "ip": ray.util.get_node_ip_address(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def endpoint(self) -> tuple[str, int]:
        """(address, port) for the group's rendezvous; called on rank 0 only. The port may be
        taken by someone else before rank 0 binds it: set-up then fails and the replica restarts.

        Always loopback: the ranks of a replica share one node (one ``STRICT_PACK`` placement
        group; :func:`_join_group` checks it), and the rendezvous store has no authentication, so
        it must not listen where other machines can reach it. The gloo/NCCL data connections
        then stay on the loopback interface too (``init_tp_group``)."""
        return RENDEZVOUS_HOST, _free_port(RENDEZVOUS_HOST)


class TPFollower(_Rank):
    """Ray actor for ranks 1..N-1: serve rank 0's steps with this rank's slice of the model."""

    def __init__(self, model_path: str, dtype: str, kv_cache_bytes: Optional[int], rank: int,
                 timeout_s: float = TP_TIMEOUT_S, setup_timeout_s: float = SETUP_TIMEOUT_S,
                 adapters: Optional[dict[str, str]] = None, merge_adapter: bool = False) -> None:
        _set_cpu_threads()
        self.model_path, self.dtype, self.kv_cache_bytes = model_path, dtype, kv_cache_bytes
        # The spec's adapters (name -> local dir or URI) and mode, as rank 0 has them.
        self.adapters, self.merge_adapter = adapters or {}, merge_adapter
        self.rank, self.timeouts = rank, (timeout_s, setup_timeout_s)

    def serve(self, endpoint: tuple[str, int], *infos: dict) -> int:
        """Join the group and follow rank 0 until it says stop; return the steps run.

        Raises:
            TPError: rank 0 went away, the ranks disagree, or a collective timed out.
        """
        from batchgen.pipeline.adapters import fetch_adapter

        device = _join_group(self.rank, endpoint, infos, *self.timeouts)
        local = {name: str(fetch_adapter(name, uri)) for name, uri in self.adapters.items()}
        steps = follower_loop(self.model_path, dtype=self.dtype, device=device, kv_cache_bytes=self.kv_cache_bytes,
                              adapters=local or None, merge_adapter=self.merge_adapter)
        destroy_tp_group()
        return steps


def build_tp_llm(spec: JobSpec, device: torch.device) -> TPLeaderLLM:
    """Rank 0's engine for this job's model, with the spec's engine knobs (as ``build_llm``)."""
    from batchgen.tokenizer import Tokenizer

    from batchgen.pipeline.adapters import local_adapters, merged

    m = spec.model
    tokenizer = Tokenizer(m.tokenizer) if m.tokenizer else None
    return _ExitOnGroupFailure(m.path, tokenizer=tokenizer, dtype=m.dtype, device=device,
                               kv_cache_bytes=_kv_bytes(spec), max_num_seqs=m.max_num_seqs,
                               max_num_batched_tokens=m.max_num_batched_tokens, max_model_len=m.max_seq_len,
                               adapters=local_adapters(spec) or None, merge_adapter=merged(spec),
                               prefix_caching=m.prefix_caching)


def _kv_bytes(spec: JobSpec) -> Optional[int]:
    gb = spec.model.kv_cache_memory_gb
    return int(gb * (1 << 30)) if gb else None


class _ExitOnGroupFailure(TPLeaderLLM):
    """Rank 0's engine in a pipeline replica: a failed group ends the process.

    Raising would not do: the shard worker would blame the rows (and split them), and the
    replica would lease shard after shard that can only fail, spending every shard's attempts.
    A broken group is only mended by new processes on every rank, which the driver starts when
    it sees this one die.
    """

    def step(self) -> list[CompletionOutput]:
        try:
            return super().step()
        except TPError as e:
            print(f"batchgen tensor-parallel rank 0 pid {os.getpid()}: exiting, the group failed: {e}",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_ON_PURPOSE)


class TPLeaderReplica(_Rank, Replica):
    """Ray actor for rank 0 of a pipeline replica: a :class:`Replica` driving a TP engine."""

    def __init__(self, spec: dict, queue_name: str, replica_id: str, faults: Optional[str] = None,
                 timeout_s: float = TP_TIMEOUT_S, setup_timeout_s: float = SETUP_TIMEOUT_S) -> None:
        super().__init__(spec, queue_name, replica_id, None if _uses_gpu() else 1, faults)
        self.timeouts = (timeout_s, setup_timeout_s)
        self.setup_error: Optional[str] = None

    def setup(self, endpoint: tuple[str, int], *infos: dict) -> str:
        """Join the group and load rank 0's slice (collective: the followers must be serving)."""
        try:
            device = _join_group(0, endpoint, infos, *self.timeouts)
            self._fault("load")
            self.worker = ShardWorker(self.spec, self._engine(build_tp_llm(self.spec, device)))
        except BaseException as e:
            self.setup_error = f"{type(e).__name__}: {e}"
            raise
        return self.ready()

    def run(self) -> dict:
        """As :meth:`Replica.run`, once :meth:`setup` has succeeded."""
        if self.worker is None:
            # Replica.run would quietly build a one-process engine instead: never for a TP job.
            raise TPError(f"{self.replica_id}: rank 0 is not set up "
                          f"({self.setup_error or 'setup() was not called'}); restart the replica")
        return super().run()


# --------------------------------------------------------------------------------------- driver side

@dataclass
class _Ranks:
    """One incarnation of a replica: its placement group, its actors and their pending calls."""

    pg: PlacementGroup
    leader: ActorHandle
    followers: list[ActorHandle]
    infos: list[ray.ObjectRef]  # each rank's info()
    serving: list[ray.ObjectRef]  # the followers' serve()

    names: list[str] = field(default_factory=list)  # the ranks' actor names, if named

    def kill(self) -> None:
        for actor in (self.leader, *self.followers):
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.pg)
        # ray.kill returns before the names are free; a restart reuses them at once.
        wait_names_free(self.names)


def _launch(world: int, use_gpu: bool, leader_cls: type, leader_args: tuple, follower_args: tuple,
            timeout_s: float, setup_timeout_s: float, name: Optional[str] = None,
            follower_kwargs: Optional[dict] = None) -> tuple[_Ranks, ray.ObjectRef]:
    """Place ``world`` ranks on one node and start them; returns them and rank 0's endpoint ref.
    With ``name``, the rank actors are named ``<name>-rank-<r>``.

    Nothing here waits: each rank's first call runs as soon as its process is up.
    """
    bundle = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    pg = placement_group([dict(bundle) for _ in range(world)], strategy="STRICT_PACK")

    def options(rank: int) -> dict:
        # max_restarts=0: a lone restarted rank could never rejoin its group; the whole replica restarts.
        return dict(num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=0, max_task_retries=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
                    **({"name": f"{name}-rank-{rank}"} if name else {}))

    leader = ray.remote(leader_cls).options(**options(0)).remote(*leader_args)
    followers = [ray.remote(TPFollower).options(**options(r)).remote(*follower_args, r, timeout_s, setup_timeout_s,
                                                                       **(follower_kwargs or {}))
                 for r in range(1, world)]
    # Submitted before any call that consumes them: an actor runs its calls in order.
    endpoint = leader.endpoint.remote()
    infos = [a.info.remote() for a in (leader, *followers)]
    serving = [f.serve.remote(endpoint, *infos) for f in followers]
    names = [f"{name}-rank-{r}" for r in range(world)] if name else []
    return _Ranks(pg, leader, followers, infos, serving, names), endpoint


def _placement_state(pg: PlacementGroup) -> str:
    try:
        return str(placement_group_table(pg).get("state", "unknown"))
    except Exception:  # noqa: BLE001 - only used to word an error message
        return "unknown"


def _wait_for(main_ref: ray.ObjectRef, ranks: _Ranks, what: str, timeout_s: Optional[float]) -> Any:
    """``ray.get(main_ref)`` (rank 0's call), but fail as soon as a follower fails, and after
    ``timeout_s`` (None: no limit)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = [main_ref, *ranks.serving]
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            raise TPReplicaError(f"{what}: not done after {timeout_s:g} s (placement group "
                                 f"{_placement_state(ranks.pg)}: {len(ranks.infos)} bundles must fit on one node)")
        ref = done[0]
        rank = 0 if ref == main_ref else ranks.serving.index(ref) + 1
        try:
            result = ray.get(ref)
        except Exception as e:
            raise TPReplicaError(f"{what}: rank {rank} failed: {e}") from e
        if rank == 0:
            return result
        # A follower that ends cleanly was told to stop by rank 0, whose result is on its way.
        pending.remove(ref)


def _cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def replicas_that_fit(world: int, use_gpu: Optional[bool] = None) -> int:
    """How many ``world``-rank replicas the live nodes hold, each packed onto one node."""
    key = "GPU" if (_cluster_has_gpus() if use_gpu is None else use_gpu) else "CPU"
    return sum(int(n["Resources"].get(key, 0)) // world for n in ray.nodes() if n.get("Alive"))


class TPReplicaGroup:
    """One tensor-parallel pipeline replica, handled like one :class:`Replica` actor.

    ``start`` places and starts the ranks, ``run`` is rank 0's run loop (it resolves when the
    queue has nothing left for it; call it again for new work), ``alive_refs`` are the
    followers' loops (they resolve only when something went wrong), ``kill`` tears everything
    down and ``restart`` is kill + start. Rank 0 leases under the name ``name``.
    """

    def __init__(self, spec: dict, queue_name: str, name: str, faults: Optional[str] = None,
                 use_gpu: Optional[bool] = None, timeout_s: float = TP_TIMEOUT_S,
                 setup_timeout_s: float = SETUP_TIMEOUT_S) -> None:
        """``spec``: the job spec as a JSON dict with absolute local paths; ``use_gpu``: default
        whether the cluster has GPUs; ``timeout_s``/``setup_timeout_s``: see :func:`init_tp_group`."""
        job = JobSpec.model_validate(spec)
        self.spec, self.queue_name, self.name, self.faults = spec, queue_name, name, faults
        self.world = job.model.tensor_parallel
        self._follower_args = (job.model.path, job.model.dtype, _kv_bytes(job))
        from batchgen.pipeline.adapters import merged

        self._follower_kwargs = {"adapters": dict(job.model.adapters), "merge_adapter": merged(job)}
        self.use_gpu = use_gpu
        self.timeout_s, self.setup_timeout_s = timeout_s, setup_timeout_s
        self.starts = 0  # incarnations so far
        self._ranks: Optional[_Ranks] = None
        self._setup_ref: Optional[ray.ObjectRef] = None

    def start(self, wait: bool = True, timeout_s: Optional[float] = None) -> None:
        """Place the ranks and start their set-up (group, model slices, KV cache).

        With ``wait``, return once rank 0 is set up, or kill everything and raise
        :class:`TPReplicaError` (a rank failed, or ``timeout_s`` passed: e.g. no node has room).
        Without, return at once: a failure shows in :meth:`run` or :meth:`alive_refs`.
        """
        if self._ranks is not None:
            raise RuntimeError(f"{self.name} is already started; kill() or restart() it")
        use_gpu = _cluster_has_gpus() if self.use_gpu is None else self.use_gpu
        leader_args = (self.spec, self.queue_name, self.name, self.faults, self.timeout_s, self.setup_timeout_s)
        self._ranks, endpoint = _launch(self.world, use_gpu, TPLeaderReplica, leader_args, self._follower_args,
                                        self.timeout_s, self.setup_timeout_s, name=self.name,
                                        follower_kwargs=self._follower_kwargs)
        self._setup_ref = self._ranks.leader.setup.remote(endpoint, *self._ranks.infos)
        self.starts += 1
        if wait:
            try:
                _wait_for(self._setup_ref, self._ranks, f"{self.name} set-up", timeout_s)
            except BaseException:
                self.kill()
                raise

    def _started(self) -> _Ranks:
        if self._ranks is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._ranks

    def run(self) -> ray.ObjectRef:
        """Rank 0's run loop (after its set-up): an ObjectRef to its ``{"replica", "shards"}``."""
        return self._started().leader.run.remote()

    def alive_refs(self) -> list[ray.ObjectRef]:
        """The followers' loops: any of them resolving (even without error) means the replica is broken."""
        return list(self._started().serving)

    def pids(self) -> list[int]:
        """Every rank's process id, rank 0 first (waits for the processes to start)."""
        return [info["pid"] for info in ray.get(self._started().infos)]

    def kill(self) -> None:
        """Kill every rank and free the placement group (safe to call twice)."""
        if self._ranks is not None:
            self._ranks.kill()
        self._ranks, self._setup_ref = None, None

    def restart(self, wait: bool = False, timeout_s: Optional[float] = None) -> None:
        """Kill this incarnation and start a new one (refs of the old one fail or never resolve)."""
        self.kill()
        self.start(wait=wait, timeout_s=timeout_s)


# --------------------------------------------------------------------------------------- one-off generation

class _GenerateLeader(_Rank):
    """Ray actor for rank 0 of a one-off generation."""

    def __init__(self, model_dir: str, dtype: str, engine: dict, timeout_s: float, setup_timeout_s: float) -> None:
        _set_cpu_threads()
        self.model_dir, self.dtype, self.engine = model_dir, dtype, engine
        self.timeouts = (timeout_s, setup_timeout_s)

    def generate(self, endpoint: tuple[str, int], *infos: dict, prompts: list,
                 params: Union[SamplingParams, list[SamplingParams]]) -> list[CompletionOutput]:
        device = _join_group(0, endpoint, infos, *self.timeouts)
        with TPLeaderLLM(self.model_dir, dtype=self.dtype, device=device, **self.engine) as llm:
            outs = llm.generate(prompts, params)
        destroy_tp_group()
        return outs


def generate_tensor_parallel(model_dir: str, prompts: Sequence[Union[str, Sequence[int]]],
                             params: Union[SamplingParams, Sequence[SamplingParams]], n: int,
                             dtype: str = "auto", device: Optional[str] = None,
                             timeout_s: float = TP_TIMEOUT_S, placement_timeout_s: float = 120.0,
                             **engine: Any) -> list[CompletionOutput]:
    """Generate with one ``n``-rank tensor-parallel replica on Ray; outputs in prompt order.

    Uses the Ray this process is connected to, else starts a local one on 127.0.0.1 only, whatever
    ``RAY_ADDRESS`` says (and stops it afterwards). ``device``: ``"cuda"`` (one GPU per rank), ``"cpu"`` (gloo), or None for
    CUDA when Ray has GPUs. ``engine``: further :class:`~batchgen.engine.LLM` keyword arguments
    (``max_num_seqs``, ``kv_cache_bytes`` per rank, ...).

    Raises:
        ValueError: bad ``n`` or ``device``.
        TPReplicaError: the ranks could not be placed within ``placement_timeout_s``, or a rank
            failed (its error, e.g. a model that does not split into ``n`` slices, is in the message).
    """
    if n < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {n}")
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (Ray gives each rank its own GPU), got {device!r}")
    own_ray = not ray.is_initialized()
    if own_ray:
        keep_ray_on_loopback()  # else Ray rewrites 127.0.0.1 to the host's routable address
        # Logical CPUs only count slots: let n CPU ranks fit on a machine with fewer cores.
        ray.init(address="local", num_cpus=max(n, os.cpu_count() or 1), include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
    ranks: Optional[_Ranks] = None
    try:
        use_gpu = _cluster_has_gpus() if device is None else device == "cuda"
        ranks, endpoint = _launch(n, use_gpu, _GenerateLeader, (str(model_dir), dtype, engine, timeout_s,
                                  SETUP_TIMEOUT_S), (str(model_dir), dtype, engine.get("kv_cache_bytes")),
                                  timeout_s, SETUP_TIMEOUT_S)
        placed, _ = ray.wait([ranks.pg.ready()], timeout=placement_timeout_s)
        if not placed:
            kind = "GPU" if use_gpu else "CPU"
            raise TPReplicaError(f"{n} ranks need {n} {kind}s on one node; none was free within "
                                 f"{placement_timeout_s:g} s (cluster: {ray.cluster_resources()})")
        plist = params if isinstance(params, SamplingParams) else list(params)
        ref = ranks.leader.generate.remote(endpoint, *ranks.infos, prompts=list(prompts), params=plist)
        outs = _wait_for(ref, ranks, f"tensor-parallel generation on {n} ranks", None)
        ray.get(ranks.serving)  # the followers were told to stop: they end cleanly
        return outs
    finally:
        if ranks is not None:
            ranks.kill()
        if own_ray:
            ray.shutdown()


__all__ = ["SETUP_TIMEOUT_S", "TPFollower", "TPLeaderReplica", "TPReplicaError", "TPReplicaGroup",
           "TP_TIMEOUT_S", "build_tp_llm", "generate_tensor_parallel", "replicas_that_fit"]
