"""Tensor-parallel replicas: N processes run every engine step together.

A replica is ``world_size`` ranks in one ``torch.distributed`` group (gloo on CPU, NCCL on CUDA).
Each rank holds its slice of the model (:class:`~batchgen.model.Transformer` with ``world_size``/
``rank``: its heads, its FFN columns, whole embeddings and output head) and its slice of the paged
KV cache: the same block ids on every rank, each rank storing only its own KV heads.

Rank 0 runs :class:`TPLeaderLLM`, an :class:`~batchgen.engine.LLM` that owns the scheduler, the
block manager, sampling and the tokenizer. Ranks 1..N-1 run :func:`follower_loop`. Whenever rank
0 calls its model, a forward pre-hook first broadcasts the step plan (tokens, positions, every
field of the attention backend's :class:`~batchgen.engine.attention.AttentionMetadata` and, when
rows use unmerged LoRA adapters, each token row's adapter slot; every rank holds its own slice of
the same adapters, ``batchgen.engine.adapters``) so that
every follower runs the same forward (over its own KV cache)
at the same time; the all-reduces inside the model need all ranks. Only rank 0 computes logits
and samples. Hooking the model call, rather than copying the runner, keeps TP correct whatever
the runner does to build its batch.

Set-up (each rank loads its slice, then rank 0 picks the KV block count that the smallest
rank's byte budget allows, with ``kv_blocks_for_budget`` as ``LLM`` does) goes through the
rendezvous store, with a long timeout because loading can take minutes. Steps go through
collectives with a short one, in the wire format of ``batchgen.engine.tp_wire`` (no pickling).

Failure handling: a collective that a dead or frozen peer never joins raises after the group's
timeout (gloo; a dead peer's closed socket usually much sooner), or the NCCL watchdog aborts the
process. Any failure during a step leaves the ranks out of step, so the group is then unusable:
every rank must leave it (:func:`destroy_tp_group`, or exit) and a new one be formed. An idle
leader sends keep-alives so that followers waiting for work do not mistake idleness for death.

Not supported: CUDA graphs on rank 0 (a replayed graph bypasses the hook that feeds the followers).

Usage (one process per rank)::

    device = init_tp_group(rank, world_size, "127.0.0.1", port)
    if rank == 0:
        with TPLeaderLLM(model_dir, device=device) as llm:
            outs = llm.generate(prompts, params)
    else:
        follower_loop(model_dir, device=device)
    destroy_tp_group()
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.distributed as dist

from batchgen.engine.adapters import AdapterSource, StepLora, build_stack, load_adapters
from batchgen.engine.attention import PagedAttention
from batchgen.engine.engine import LLM, default_kv_cache_bytes
from batchgen.engine.kv_cache import allocate_kv_cache, kv_blocks_for_budget
from batchgen.engine.request import CompletionOutput
from batchgen.engine.tp_wire import OP_NOOP, OP_STOP, StepChannel, TPError
from batchgen.model import Transformer
from batchgen.tokenizer import Tokenizer, load_tokenizer


@dataclass
class _Group:
    """What init_tp_group set up in this process."""

    store: dist.Store
    timeout_s: float  # every collective (a step, a keep-alive)
    setup_timeout_s: float  # rendezvous and the per-replica set-up handshake
    setups: int = 0  # set-up rounds so far; ranks stay in step because every round is collective


_group: Optional[_Group] = None


# ---------------------------------------------------------------------------------------------
# The process group
# ---------------------------------------------------------------------------------------------


def tp_device(device: Optional[Union[str, torch.device]] = None, rank: Optional[int] = None) -> torch.device:
    """The device a rank computes on: ``device`` if given, else ``cuda:<rank % #GPUs>`` or CPU."""
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    r = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
    # Under Ray each rank sees only its own GPU (device_count 1), so this gives cuda:0 there.
    return torch.device("cuda", r % torch.cuda.device_count())


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def _loopback_ifname() -> str:
    names = {name for _, name in socket.if_nameindex()}
    return "lo" if "lo" in names else "lo0"


def init_tp_group(rank: int, world_size: int, master_addr: str = "127.0.0.1", master_port: int = 29500,
                  backend: Optional[str] = None, device: Optional[Union[str, torch.device]] = None,
                  timeout_s: float = 120.0, setup_timeout_s: float = 1800.0) -> torch.device:
    """Join this process to a tensor-parallel group of ``world_size`` ranks; return its device.

    Rank 0 hosts the rendezvous store on ``master_addr:master_port`` (it listens on that address
    only, not on every interface). ``backend`` defaults to NCCL for a CUDA device, gloo otherwise.
    ``timeout_s`` bounds every collective: a rank that dies or freezes makes the others fail
    after at most this long instead of hanging. ``setup_timeout_s`` bounds the waits that include
    process start-up and model loading (the rendezvous and each replica's set-up handshake),
    which legitimately take much longer than a step.
    """
    global _group
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid tensor-parallel rank {rank} of world_size {world_size}")
    if dist.is_initialized():
        raise TPError("this process already belongs to a process group; call destroy_tp_group() first")
    if not 0 < master_port < 65536:
        raise ValueError(f"master_port must be in 1..65535, got {master_port}")
    if timeout_s <= 0 or setup_timeout_s <= 0:
        raise ValueError(f"timeouts must be positive, got timeout_s={timeout_s}, setup_timeout_s={setup_timeout_s}")
    dev = tp_device(device, rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if _is_loopback(master_addr):
        # Keep the data connections on loopback too, not on whatever the hostname resolves to.
        ifname = _loopback_ifname()
        os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", ifname)
    setup_timeout = timedelta(seconds=setup_timeout_s)
    if rank == 0:
        # TCPStore would listen on every interface; a socket bound here restricts it to master_addr.
        family = socket.AF_INET6 if ":" in master_addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((master_addr, master_port))
        except OSError as e:
            sock.close()
            raise TPError(f"rank 0 cannot listen on {master_addr}:{master_port}: {e}") from e
        sock.listen()
        # detach(): the store owns (and eventually closes) the descriptor, not this socket object.
        store = dist.TCPStore(master_addr, master_port, world_size, True, timeout=setup_timeout,
                              master_listen_fd=sock.detach(), wait_for_workers=False)
    else:
        store = dist.TCPStore(master_addr, master_port, world_size, False, timeout=setup_timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    _group = _Group(store, timeout_s, setup_timeout_s)
    return dev


def destroy_tp_group() -> None:
    """Leave and free the process group (safe to call when there is none)."""
    global _group
    if dist.is_initialized():
        dist.destroy_process_group()
    _group = None


def _require_group(leader: bool) -> tuple[int, int, _Group]:
    if not dist.is_initialized() or _group is None:
        raise TPError("no tensor-parallel group: call init_tp_group(rank, world_size, ...) first")
    rank, world = dist.get_rank(), dist.get_world_size()
    if leader and rank != 0:
        raise TPError(f"TPLeaderLLM runs on rank 0; this process is rank {rank} (use follower_loop)")
    if not leader and rank == 0:
        raise TPError("follower_loop runs on ranks 1..N-1; rank 0 runs TPLeaderLLM")
    return rank, world, _group


# ---------------------------------------------------------------------------------------------
# Set-up handshake, shared by leader and followers
# ---------------------------------------------------------------------------------------------

_FINGERPRINT = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim")


class _Setup:
    """One replica set-up round, through the store: JSON values under per-round keys.

    The store rather than a collective carries it because it waits for model loading, which may
    take minutes and differ between ranks (the store's timeout is the long set-up one), and
    because it can carry a rank's error message to the others.
    """

    def __init__(self, group: _Group, rank: int) -> None:
        group.setups += 1
        self.store, self.rank = group.store, rank
        self.prefix = f"batchgen/tp/setup{group.setups}/"
        self.timeout = timedelta(seconds=group.setup_timeout_s)

    def put(self, key: str, value: dict) -> None:
        self.store.set(self.prefix + key, json.dumps(value))

    def get(self, key: str, who: str) -> dict:
        k = self.prefix + key
        try:
            self.store.wait([k], self.timeout)
            return json.loads(self.store.get(k))
        except Exception as e:  # a timeout, or rank 0 (the store's host) is gone
            raise TPError(f"rank {self.rank}: no {key!r} from {who} within "
                          f"{self.timeout.total_seconds():g} s: {e}") from e


def _fingerprint(model: Transformer, lora: Any = None) -> dict[str, Any]:
    """What must agree across ranks for their slices to form one model (and one adapter stack)."""
    out: dict[str, Any] = {k: getattr(model.args, k) for k in _FINGERPRINT}
    out["adapters"] = [[n, f] for n, f in zip(lora.names, lora.fingerprints)] if lora is not None else []
    out["dtype"] = str(next(model.parameters()).dtype)
    out["world_size"] = model.world_size
    return out


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _kv_budget(kv_cache_bytes: Optional[int], device: torch.device) -> int:
    """This rank's KV cache budget in bytes (every rank's block has the same size)."""
    return kv_cache_bytes if kv_cache_bytes is not None else default_kv_cache_bytes(device)


def _load_slice(model_dir: Optional[Union[str, Path]], model: Optional[Transformer], dtype: str,
                device: torch.device, world: int, rank: int,
                merged: Optional[Mapping[str, AdapterSource]] = None) -> Transformer:
    if model is None:
        if model_dir is None:
            raise ValueError("give a model directory or a model")
        from batchgen.checkpoint import load_args, load_model

        adapters = load_adapters(merged, load_args(model_dir)) if merged else []
        return load_model(model_dir, dtype=dtype, device=device, world_size=world, rank=rank, adapters=adapters)
    if model.world_size != world or model.rank != rank:
        raise ValueError(f"the given model is slice {model.rank} of {model.world_size}; "
                         f"this is rank {rank} of {world}")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Rank 0
# ---------------------------------------------------------------------------------------------


class TPLeaderLLM(LLM):
    """:class:`~batchgen.engine.LLM` on rank 0 of a tensor-parallel group; same API.

    Construction is collective: every follower must be inside :func:`follower_loop`. The KV
    cache holds as many blocks as the smallest rank's budget allows (``kv_cache_bytes`` per rank;
    default as in ``LLM``); rank 0 decides the count, block size and context length for all.
    Prefix caching is rank 0's alone: it decides which blocks a request shares, and followers
    only see the block tables and each prefill's cached length in the step's metadata.
    Call :meth:`shutdown` (or use ``with``) to release the followers; until then a keep-alive
    thread holds them. After a :class:`TPError` the object is unusable: every rank must leave the
    group and a new one be formed.
    """

    def __init__(self, model_dir: Optional[Union[str, Path]] = None, *, model: Optional[Transformer] = None,
                 tokenizer: Optional[Tokenizer] = None, dtype: str = "auto",
                 device: Optional[Union[str, torch.device]] = None, kv_cache_bytes: Optional[int] = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: Optional[int] = None, block_size: int = 16,
                 max_model_len: Optional[int] = None, keepalive_s: Optional[float] = None,
                 adapters: Optional[Mapping[str, AdapterSource]] = None, merge_adapter: bool = False,
                 prefix_caching: bool = True) -> None:
        """As :class:`~batchgen.engine.LLM`; ``adapters``/``merge_adapter`` as there, and every
        follower must be given the same ones (each rank cuts its own slice of them)."""
        _, world, group = _require_group(leader=True)
        if merge_adapter and (not adapters or len(adapters) != 1 or model is not None):
            raise ValueError("merge_adapter needs a model directory and exactly one adapter")
        self.world_size = world
        dev = tp_device(device, 0)
        self._channel = StepChannel(dev)
        self._lock = threading.Lock()  # one collective sequence at a time: a step, or a keep-alive
        self._broken: Optional[BaseException] = None
        self._closed = False
        self._stop = threading.Event()
        self._keepalive: Optional[threading.Thread] = None

        setup = _Setup(group, 0)
        failure: Optional[Exception] = None
        try:
            model = _load_slice(model_dir, model, dtype, dev, world, 0, adapters if merge_adapter else None)
            stack = (build_stack(adapters, model.args, world, 0, next(model.parameters()).dtype, dev)
                     if adapters and not merge_adapter else None)
            if tokenizer is None and model_dir is not None:
                tokenizer = load_tokenizer(model_dir)
            mlen = max_model_len or model.args.max_seq_len
            budget = _kv_budget(kv_cache_bytes, dev)
        except Exception as e:  # still answer the followers, so that they stop waiting at once
            failure = e
        answers = {r: setup.get(f"budget/{r}", f"rank {r}") for r in range(1, world)}
        errors = "; ".join(f"rank {r}: {a['error']}" for r, a in answers.items() if "error" in a)
        if failure is None and not errors:
            try:  # what the smallest rank's budget holds
                num_blocks = kv_blocks_for_budget(model, min([budget] + [a["bytes"] for a in answers.values()]),
                                                  block_size, max_num_seqs, mlen, next(model.parameters()).dtype)
            except ValueError as e:
                failure = ValueError(f"the smallest rank's {e}")
        if failure is not None or errors:
            setup.put("config", {"error": _describe(failure) if failure is not None else errors})
            if failure is not None:
                raise failure
            raise TPError(f"followers could not load their model slices: {errors}")
        setup.put("config", {"num_blocks": num_blocks, "block_size": block_size, "max_model_len": mlen,
                             "model": _fingerprint(model, stack)})
        refusals = "; ".join(f"rank {r}: {a['error']}" for r in range(1, world)
                             if "error" in (a := setup.get(f"ready/{r}", f"rank {r}")))
        if refusals:
            raise TPError(f"followers rejected the replica set-up: {refusals}")

        sig = inspect.signature(model.forward)
        if len(sig.parameters) != 4:
            raise TPError(f"Transformer.forward{sig} no longer takes (tokens, positions, attn, lora); "
                          "batchgen/engine/tp.py must be updated to match")
        self._forward_sig = sig
        # Any forward rank 0 runs (also a warm-up inside LLM.__init__) must run on every rank.
        hook = model.register_forward_pre_hook(self._broadcast_step, with_kwargs=True)
        try:
            super().__init__(model=model, tokenizer=tokenizer, device=str(dev), num_kv_blocks=num_blocks,
                             max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             block_size=block_size, max_model_len=mlen, prefix_caching=prefix_caching)
            self.lora = self.runner.lora = stack  # already cut for rank 0 (LLM would load it again)
            if merge_adapter and adapters:
                self.merged_adapter = next(iter(adapters))
        except BaseException:
            hook.remove()
            self._send_stop()
            raise
        self._keepalive_s = keepalive_s if keepalive_s is not None else group.timeout_s / 4
        self._last_sent = time.monotonic()
        self._keepalive = threading.Thread(target=self._keepalive_loop, name="tp-keepalive", daemon=True)
        self._keepalive.start()

    def _broadcast_step(self, module: Transformer, args: tuple, kwargs: dict) -> None:
        bound = self._forward_sig.bind(*args, **kwargs)
        self._channel.send_step(*bound.args)
        self._last_sent = time.monotonic()

    def _check_usable(self) -> None:
        if self._closed:
            raise TPError("this TPLeaderLLM was shut down")
        if self._broken is not None:
            raise TPError(f"the tensor-parallel group failed earlier ({self._broken}); recreate it")

    def step(self) -> list[CompletionOutput]:
        """One engine step, run on all ranks. Raises :class:`TPError` if any rank fails."""
        with self._lock:
            self._check_usable()
            try:
                return super().step()
            except Exception as e:
                self._broken = e
                raise TPError(f"tensor-parallel step failed; the group of {self.world_size} ranks must be "
                              f"torn down and recreated: {e}") from e

    def _keepalive_loop(self) -> None:
        if self._channel.device.type == "cuda":
            torch.cuda.set_device(self._channel.device)  # the current device is per thread
        while not self._stop.wait(self._keepalive_s / 2):
            with self._lock:
                if self._closed or self._broken is not None:
                    return
                if time.monotonic() - self._last_sent < self._keepalive_s:
                    continue
                try:
                    self._channel.send_op(OP_NOOP)
                    self._last_sent = time.monotonic()
                except Exception as e:  # surfaces in the next step()
                    self._broken = e
                    return

    def _send_stop(self) -> None:
        try:
            self._channel.send_op(OP_STOP)
        except Exception as e:  # the followers are gone or will time out on their own
            self._broken = self._broken or e

    def shutdown(self) -> None:
        """Tell the followers to leave :func:`follower_loop`. Idempotent; the group stays up."""
        if self._closed:
            return
        self._stop.set()
        with self._lock:
            self._closed = True
            if self._broken is None:
                self._send_stop()
        if self._keepalive is not None:
            self._keepalive.join()

    def __enter__(self) -> "TPLeaderLLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# ---------------------------------------------------------------------------------------------
# Ranks 1..N-1
# ---------------------------------------------------------------------------------------------


def follower_loop(model_dir: Optional[Union[str, Path]] = None, *, model: Optional[Transformer] = None,
                  dtype: str = "auto", device: Optional[Union[str, torch.device]] = None,
                  kv_cache_bytes: Optional[int] = None, adapters: Optional[Mapping[str, AdapterSource]] = None,
                  merge_adapter: bool = False) -> int:
    """Serve rank 0's steps with this rank's model slice until it says stop; return the step count.

    ``adapters``/``merge_adapter`` must be rank 0's: this rank cuts its slice of each adapter.

    Loads this rank's slice of ``model_dir`` (or takes a ``model`` built for this rank). The
    number of KV blocks, the block size and the context length come from rank 0; ``kv_cache_bytes``
    is only this rank's budget, which caps the count rank 0 picks. Raises :class:`TPError` when
    rank 0 disappears, the ranks disagree, or a collective times out.
    """
    rank, world, group = _require_group(leader=False)
    dev = tp_device(device, rank)
    setup = _Setup(group, rank)
    try:
        model = _load_slice(model_dir, model, dtype, dev, world, rank, adapters if merge_adapter else None)
        stack = (build_stack(adapters, model.args, world, rank, next(model.parameters()).dtype, dev)
                 if adapters and not merge_adapter else None)
        budget = _kv_budget(kv_cache_bytes, dev)
    except Exception as e:
        setup.put(f"budget/{rank}", {"error": _describe(e)})
        raise
    setup.put(f"budget/{rank}", {"bytes": budget})
    cfg = setup.get("config", "rank 0")
    if "error" in cfg:
        raise TPError(f"rank {rank}: rank 0 could not set up the replica: {cfg['error']}")
    theirs = cfg["model"]
    problem = "; ".join(f"{k}: rank 0 has {theirs.get(k)}, rank {rank} has {v}"
                        for k, v in _fingerprint(model, stack).items() if theirs.get(k) != v)
    if not problem:
        try:
            model.set_max_seq_len(cfg["max_model_len"])  # as LLM does on rank 0
            cache = allocate_kv_cache(model, cfg["num_blocks"], cfg["block_size"], next(model.parameters()).dtype, dev)
        except Exception as e:
            problem = f"cannot allocate {cfg['num_blocks']} KV blocks: {_describe(e)}"
    setup.put(f"ready/{rank}", {"error": problem} if problem else {"ok": True})
    if problem:
        raise TPError(f"rank {rank}: {problem}")

    channel = StepChannel(dev)
    steps = 0
    with torch.inference_mode():
        while True:
            try:
                item = channel.recv_step()
            except TPError:
                raise
            except Exception as e:
                raise TPError(f"rank {rank}: lost rank 0 after {steps} steps: {e}") from e
            if item is None:
                return steps
            tokens, positions, metadata, lora_index = item
            try:
                if lora_index is not None and stack is None:
                    raise TPError("rank 0 sent adapter rows but this rank was given no adapters")
                lora = StepLora(stack, lora_index) if lora_index is not None else None
                model(tokens, positions, PagedAttention(cache, metadata), lora)
            except Exception as e:
                raise TPError(f"rank {rank}: step {steps} failed: {e}") from e
            steps += 1


__all__ = ["TPError", "TPLeaderLLM", "destroy_tp_group", "follower_loop", "init_tp_group", "tp_device"]
