"""Generation of chunks of clips, by one engine in this process or by engine replicas in processes of their own.

A chunk's first prompts go to one batched generate call, then each repair round is one call over the
chunk's unusable replies. With ``replicas`` > 1 the captioning run (the only writer of the table)
hands chunks to N processes, each loading its engine pinned to its own GPUs or CPU cores
(vaemo.devices); a chunk whose replica died is handed to another one, once.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from vaemo.caption.engines import CaptionEngine, Generation, Request, load_engine
from vaemo.caption.inputs import ClipMedia
from vaemo.caption.prompt import Prompt, parse_reply
from vaemo.config import CaptionConfig
from vaemo.devices import Placement, placements, visible_gpus
from vaemo.errors import EngineError

log = logging.getLogger(__name__)


def replica_count(cfg: CaptionConfig) -> int:
    """``replicas`` with ``auto`` resolved: the visible GPUs / tensor_parallel_size, 1 on a CPU host."""
    if cfg.replicas != "auto":
        return cfg.replicas
    return max(1, len(visible_gpus()) // cfg.tensor_parallel_size)


def gpus_used(cfg: CaptionConfig) -> int:
    """GPUs a captioning run occupies: replicas x tensor_parallel_size."""
    return replica_count(cfg) * cfg.tensor_parallel_size


@dataclass
class Job:
    """One chunk's generation work: the first prompt and the media of every readable clip."""

    index: int
    first: dict[str, list[dict]]
    media: dict[str, ClipMedia]
    tries: int = 0


@dataclass
class Attempts:
    """The replies one clip got, oldest first."""

    generations: list[Generation] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass
class ChunkResult:
    index: int
    history: dict[str, Attempts]
    calls: int  # generate calls (first prompts, then one per repair round)
    requests: int
    seconds: float  # time spent in generate calls
    replica: int = 0

    @property
    def tokens(self) -> int:
        return sum(g.generated_tokens for a in self.history.values() for g in a.generations)


def generate_chunk(engine: CaptionEngine, job: Job, prompt: Prompt, schema: dict, retries: int) -> ChunkResult:
    """First prompts for the whole chunk in one call, then the repair turns of its unusable replies, batched too."""
    messages, history = dict(job.first), {cid: Attempts() for cid in job.media}
    pending, calls, requests, seconds = list(job.media), 0, 0, 0.0
    for attempt in range(retries + 1):
        if not pending:
            break
        start = time.perf_counter()
        replies = engine.generate([Request(cid, messages[cid], job.media[cid], attempt) for cid in pending], schema)
        seconds += time.perf_counter() - start
        calls, requests = calls + 1, requests + len(pending)
        retry = []
        for cid, reply in zip(pending, replies, strict=True):
            history[cid].generations.append(reply)
            reason = parse_reply(reply.text, prompt.limits).reason
            if reason:
                history[cid].failures.append(f"attempt {attempt + 1}: {reason}")
                messages[cid] = prompt.repair_messages(job.first[cid], reply.text, reason)
                retry.append(cid)
        pending = retry
    return ChunkResult(job.index, history, calls, requests, seconds)


@dataclass
class _Load:
    """What one replica did: how long it was up since its engine was ready, and how long it generated."""

    clips: int = 0
    tokens: int = 0
    busy: float = 0.0
    ready_at: float = 0.0
    end_at: float = 0.0

    def add(self, result: ChunkResult) -> None:
        self.clips += len(result.history)
        self.tokens += result.tokens
        self.busy += result.seconds


class _Tracker:
    """Requests per generate call, clips/s and tokens/s per replica and in total, the engines' share of
    wall time spent waiting for input."""

    def __init__(self, replicas: int):
        self.loads = [_Load() for _ in range(replicas)]
        self.calls = self.requests = 0

    def add(self, result: ChunkResult) -> None:
        self.loads[result.replica].add(result)
        self.calls += result.calls
        self.requests += result.requests

    def end(self) -> None:
        now = time.perf_counter()
        for load in self.loads:
            load.end_at = load.end_at or now

    def summary(self) -> dict:
        up = [max(load.end_at - load.ready_at, 1e-9) for load in self.loads]
        wall = max(up)
        replicas = {
            str(i): {"clips_per_second": round(load.clips / span, 4), "tokens_per_second": round(load.tokens / span, 2),
                     "wait_share": round(1 - min(load.busy / span, 1.0), 4)}
            for i, (load, span) in enumerate(zip(self.loads, up, strict=True))
        }
        return {
            "replicas": len(self.loads),
            "generate_calls": self.calls,
            "requests_per_generate_call": round(self.requests / self.calls, 2) if self.calls else None,
            "clips_per_second": round(sum(load.clips for load in self.loads) / wall, 4),
            "tokens_per_second": round(sum(load.tokens for load in self.loads) / wall, 2),
            "wait_share": round(1 - min(sum(load.busy for load in self.loads) / sum(up), 1.0), 4),
            "replica": replicas,
        }


class InProcess:
    """One engine in this process: chunks are generated one after the other as the reader delivers them."""

    def __init__(self, engine: CaptionEngine, prompt: Prompt, schema: dict, retries: int):
        self.engine, self.prompt, self.schema, self.retries = engine, prompt, schema, retries
        self.tracker, self.replicas = _Tracker(1), 1

    def results(self, jobs: Iterator[Job]) -> Iterator[ChunkResult]:
        self.tracker.loads[0].ready_at = time.perf_counter()
        for job in jobs:  # blocks while the chunk is still being read: the engine's wait
            result = generate_chunk(self.engine, job, self.prompt, self.schema, self.retries)
            self.tracker.add(result)
            yield result
        self.tracker.end()

    def close(self) -> None:
        pass


def _serve(index: int, cfg: CaptionConfig, prompt: Prompt, schema: dict,
           inbox: Connection, outbox: Connection, load: Callable[[CaptionConfig], CaptionEngine]) -> None:
    """A replica's process (started pinned: Placement.starting): load the engine, then generate the chunks it
    is sent until told to stop."""
    try:
        engine = load(cfg)
    except Exception as exc:  # noqa: BLE001 - the coordinator reports it with the replica's device
        outbox.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    outbox.send(("ready", None))
    while True:
        try:
            job = inbox.recv()
        except EOFError:  # the coordinator is gone
            return
        if job is None:
            return
        try:
            outbox.send(("done", generate_chunk(engine, job, prompt, schema, cfg.retries)))
        except Exception:  # noqa: BLE001 - a bug: the coordinator raises it with this traceback
            outbox.send(("error", traceback.format_exc()))
            return


@dataclass
class _Replica:
    index: int
    placement: Placement
    process: multiprocessing.process.BaseProcess
    inbox: Connection
    outbox: Connection
    job: Job | None = None


class ReplicaPool:
    """N engine processes fed by this one: each replica has one chunk at a time; results come back as they end."""

    def __init__(self, cfg: CaptionConfig, prompt: Prompt, schema: dict, replicas: int,
                 load: Callable[[CaptionConfig], CaptionEngine] = load_engine):
        try:
            where = placements(replicas, cfg.tensor_parallel_size)
        except ValueError as exc:
            raise EngineError(f"caption replicas: {exc}") from None
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited CUDA or vLLM state
        self.replicas, self.tracker, self.live = replicas, _Tracker(replicas), []
        for index, placement in enumerate(where):
            job_recv, job_send = context.Pipe(duplex=False)
            result_recv, result_send = context.Pipe(duplex=False)
            process = context.Process(target=_serve, name=f"caption-replica-{index}",
                                      args=(index, cfg, prompt, schema, job_recv, result_send, load))
            with placement.starting():
                process.start()
            job_recv.close()  # the replica's ends: a dead replica's pipe then reads as closed
            result_send.close()
            self.live.append(_Replica(index, placement, process, job_send, result_recv))
        try:
            self._wait_ready()
        except BaseException:
            self.close(wait=False)
            raise

    def _describe(self, replica: _Replica) -> str:
        return f"caption replica {replica.index} ({replica.placement.describe()})"

    def _receive(self, replica: _Replica):
        """The replica's next message, or None when its process has died."""
        try:
            return replica.outbox.recv()
        except (EOFError, OSError):
            replica.process.join()
            return None

    def _wait_ready(self) -> None:
        waiting = {r.outbox: r for r in self.live}
        while waiting:
            for conn in wait(list(waiting)):
                replica = waiting.pop(conn)
                message = self._receive(replica)
                if message is None:
                    raise EngineError(f"{self._describe(replica)} died while loading its engine "
                                      f"(exit code {replica.process.exitcode})")
                kind, detail = message
                if kind == "failed":
                    raise EngineError(f"{self._describe(replica)} could not load its engine: {detail}")
                self.tracker.loads[replica.index].ready_at = time.perf_counter()

    def results(self, jobs: Iterator[Job]) -> Iterator[ChunkResult]:
        redo: deque[Job] = deque()
        exhausted = False
        while True:
            for replica in [r for r in self.live if r.job is None]:
                if not redo and exhausted:
                    break
                job = redo.popleft() if redo else next(jobs, None)
                if job is None:
                    exhausted = True
                    break
                replica.job = job
                try:
                    replica.inbox.send(job)
                except (BrokenPipeError, OSError):
                    pass  # it died: its next read says so
            busy = {r.outbox: r for r in self.live if r.job is not None}
            if not busy:
                break
            for conn in wait(list(busy)):
                replica = busy[conn]
                message = self._receive(replica)
                if message is None:
                    redo.append(self._lost(replica))
                    continue
                kind, detail = message
                if kind == "error":
                    raise RuntimeError(f"{self._describe(replica)} failed on chunk {replica.job.index}:\n{detail}")
                replica.job = None
                detail.replica = replica.index
                self.tracker.add(detail)
                yield detail
        self.tracker.end()

    def _lost(self, replica: _Replica) -> Job:
        """A replica died: its chunk goes to another replica, once."""
        job, replica.job = replica.job, None
        self.live.remove(replica)
        self.tracker.loads[replica.index].end_at = time.perf_counter()
        what = f"{self._describe(replica)} died (exit code {replica.process.exitcode}) on chunk {job.index}"
        if job.tries >= 1:
            raise EngineError(f"{what}, which had been redone once already")
        if not self.live:
            raise EngineError(f"{what}; no replica is left")
        log.warning("%s; another replica redoes it", what)
        job.tries += 1
        return job

    def close(self, wait: bool = True) -> None:
        """Stop the replicas: each ends after its chunk (``wait``), or at once (a replica may still be loading)."""
        for replica in self.live:
            try:
                replica.inbox.send(None)
            except (BrokenPipeError, OSError):
                pass
        for replica in self.live:
            replica.process.join(timeout=30 if wait else 0)
            if replica.process.is_alive():
                replica.process.kill()
                replica.process.join()
