"""Scripted captioning engines that replica processes load by reference (a light module: each replica imports it).

They stand in for a model only where the test is about the coordinator: a replica that dies in the middle
of a chunk, or one that cannot load. Their replies are usable answers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vaemo.caption.engines import Generation
from vaemo.errors import EngineError

GOOD = json.dumps({"facial_cues": "raised brows", "vocal_cues": "high pitch", "reasoning": "both signal arousal",
                   "emotion": "fear", "intensity": "high", "description": "The speaker looks and sounds frightened."})
CRASH_MARKER = "VAEMO_TEST_CRASH_MARKER"  # a file path: the first replica to generate creates it and dies


class Replies:
    name = "scripted"

    def generate(self, requests, schema):
        marker = os.environ.get(CRASH_MARKER)
        if marker and not Path(marker).exists():
            Path(marker).touch()
            os._exit(9)  # as if killed in the middle of the chunk
        return [Generation(GOOD, 10, 5, 0.01) for _ in requests]


def replies(cfg) -> Replies:
    return Replies()


def fails_on_core_1(cfg) -> Replies:
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == "1":
        raise EngineError("no memory left for the KV cache")
    return Replies()


def threads_and_cores() -> tuple[int, list[int]]:
    """In a replica's process: torch's thread count, as torch sized it at import, and the cores it may use."""
    import torch

    return torch.get_num_threads(), sorted(os.sched_getaffinity(0))
