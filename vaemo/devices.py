"""What a node offers to the GPU stages: its visible GPUs, or its CPU cores on a CPU host, split between
engine replicas so that each replica runs on devices of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (all of the node's when unset)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [name for name in (part.strip() for part in listed.split(",")) if name and name != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass(frozen=True)
class Placement:
    """The devices one engine replica is pinned to: GPUs, or CPU cores on a CPU host."""

    gpus: tuple[str, ...] = ()
    cores: tuple[int, ...] = ()

    def describe(self) -> str:
        if self.gpus:
            return f"GPU {','.join(self.gpus)}"
        return f"CPU core{'s' if len(self.cores) > 1 else ''} {','.join(map(str, self.cores))}"

    def environment(self) -> dict[str, str]:
        """Variables the replica's process sets before loading its engine."""
        if self.gpus:
            return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus)}
        cores = ",".join(map(str, self.cores))
        # vLLM's CPU worker binds its OpenMP threads to these cores; torch and BLAS use as many threads.
        return {"CUDA_VISIBLE_DEVICES": "", "VLLM_CPU_OMP_THREADS_BIND": cores,
                "OMP_NUM_THREADS": str(len(self.cores))}

    @contextmanager
    def starting(self) -> Iterator[None]:
        """Around the start of a replica's process: it inherits the variables and the CPU cores of this
        placement from its first instruction. Set inside the replica, they would come after the unpickling
        of its arguments imports torch, whose OpenMP pool sizes itself then: one thread per core of the
        parent, all crowded onto the replica's share."""
        saved = {name: os.environ.get(name) for name in self.environment()}
        cores = os.sched_getaffinity(0)  # of the calling thread only, which the child copies
        os.environ.update(self.environment())
        if self.cores:
            os.sched_setaffinity(0, self.cores)
        try:
            yield
        finally:
            os.sched_setaffinity(0, cores)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def placements(replicas: int, gpus_per_replica: int) -> list[Placement]:
    """One placement per replica: disjoint GPU groups of ``gpus_per_replica``, or the CPU cores split evenly."""
    gpus = visible_gpus()
    if gpus:
        if replicas * gpus_per_replica > len(gpus):
            raise ValueError(f"{replicas} replica(s) x {gpus_per_replica} GPU(s) each need "
                             f"{replicas * gpus_per_replica} GPUs; this node has {len(gpus)} visible")
        return [Placement(gpus=tuple(gpus[i * gpus_per_replica:(i + 1) * gpus_per_replica])) for i in range(replicas)]
    cores = sorted(os.sched_getaffinity(0))
    if replicas > len(cores):
        raise ValueError(f"{replicas} replicas need a CPU core each; this process may use {len(cores)}")
    share = len(cores) // replicas
    return [Placement(cores=tuple(cores[i * share:(i + 1) * share])) for i in range(replicas)]
