"""Captioning engines: vLLM's offline batched generation (default) and a transformers fallback.

Both implement :class:`CaptionEngine`: the same requests (chat messages + one clip's frames and
voice) in, the raw text out; parsing, retries and storage are the same for both
(vaemo.caption.run). Engines are named in ``vaemo.registry.ENGINES``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vaemo.caption.inputs import SAMPLE_RATE, ClipMedia
from vaemo.config import CaptionConfig
from vaemo.errors import EngineError
from vaemo.registry import ENGINES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    clip_id: str
    messages: list[dict]
    media: ClipMedia
    attempt: int  # 0 for the first prompt, n for the n-th repair

    def seed(self, base: int) -> int:
        """A per clip and attempt seed: a clip's reply does not depend on which others share its batch."""
        return int(hashlib.sha256(f"{base}:{self.clip_id}:{self.attempt}".encode()).hexdigest()[:8], 16)


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    generated_tokens: int
    seconds: float  # this request's share of the batch's wall time


class CaptionEngine(Protocol):
    """What the captioning run needs of an engine, loaded once per process for one CaptionConfig."""

    name: str

    def __init__(self, cfg: CaptionConfig) -> None: ...

    def generate(self, requests: list[Request], schema: dict) -> list[Generation]:
        """One reply per request, in order; ``schema`` is the JSON schema replies must follow (where supported)."""
        ...


def resolve_model(model: str) -> Path:
    """A local folder, or a hub id already in the local Hugging Face cache; nothing is downloaded."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EngineError(f"model folder {path} has no config.json")
        return path
    if path.is_absolute() or model.startswith(".") or model.count("/") != 1:
        raise EngineError(f"model {model!r}: no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except LocalEntryNotFoundError:
        raise EngineError(
            f"model {model!r} is neither a local folder nor in the Hugging Face cache; vaemo never downloads "
            f"at run time: fetch it first (`huggingface-cli download {model}`) or give a local folder"
        ) from None


def _render(processor, messages: list[dict]) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class VLLMEngine:
    """One vLLM engine per process; a whole shard's requests go to one ``LLM.generate`` call."""

    name = "vllm"

    def __init__(self, cfg: CaptionConfig):
        import torch

        self.cfg = cfg
        self.path = resolve_model(cfg.model)
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            # In-process engine: about 3 s to start instead of 20, and no spawn guard needed.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))
        from transformers import AutoProcessor
        from vllm import LLM

        self.processor = AutoProcessor.from_pretrained(self.path)
        if on_gpu:
            options = {"gpu_memory_utilization": cfg.gpu_memory_utilization,
                       "tensor_parallel_size": cfg.tensor_parallel_size}
        else:
            # vLLM's CPU runner cannot rewind a seeded request's generator when a prefill is split
            # ("CPU Generator does not use offset"): prompts are prefilled whole instead.
            options = {"enable_chunked_prefill": False, "max_num_batched_tokens": cfg.max_model_len}
        self.llm = LLM(
            model=str(self.path), seed=cfg.seed, max_model_len=cfg.max_model_len,
            limit_mm_per_prompt={"video": 1, "audio": 1},
            # Without this, small or weak models emit "{" and whitespace until max_tokens.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            enforce_eager=not on_gpu,  # torch.compile costs ~45 s at start on a CPU
            **options,
        )

    def generate(self, requests: list[Request], schema: dict) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        s = self.cfg.sampling
        inputs = [
            {
                "prompt": _render(self.processor, r.messages),
                "multi_modal_data": {
                                     "video": [(r.media.frames,
                                                {**r.media.video_metadata(), "do_sample_frames": False})],
                                     "audio": [(r.media.wave, SAMPLE_RATE)]},
                # The voice is the video's own track: one VIDEO placeholder carries both (no AUDIO placeholder).
                "mm_processor_kwargs": {"use_audio_in_video": True},
            }
            for r in requests
        ]
        params = [SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                 repetition_penalty=s.repetition_penalty, seed=r.seed(self.cfg.seed),
                                 structured_outputs=StructuredOutputsParams(json=schema)) for r in requests]
        start = time.perf_counter()
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        share = (time.perf_counter() - start) / max(1, len(requests))
        return [
            Generation(o.outputs[0].text, len(o.prompt_token_ids or ()), len(o.outputs[0].token_ids), share)
            for o in outputs
        ]


class TransformersEngine:
    """Any local model folder through transformers, one request at a time (no structured decoding: the
    prompt and the repair turns carry the format)."""

    name = "transformers"

    def __init__(self, cfg: CaptionConfig):
        import torch
        from transformers import AutoConfig, AutoProcessor

        self.cfg = cfg
        self.path = resolve_model(cfg.model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        config = AutoConfig.from_pretrained(self.path)
        self.processor = AutoProcessor.from_pretrained(self.path)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        if config.model_type == "qwen2_5_omni":
            from transformers import Qwen2_5OmniForConditionalGeneration

            # Only the thinker writes text; the speech talker is never used.
            self.model = Qwen2_5OmniForConditionalGeneration.from_pretrained(self.path, dtype=dtype).thinker
            self.with_audio = True
        else:
            from transformers import AutoModelForImageTextToText

            self.model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=dtype)
            self.with_audio = False
            log.warning("%s is not an audio-visual model: it only sees the face frames", self.path)
        self.model.to(self.device).eval()

    def _inputs(self, request: Request):
        media = request.media
        common = {"text": [_render(self.processor, request.messages)], "videos": [media.frames], "return_tensors": "pt",
                  "videos_kwargs": {"video_metadata": [media.video_metadata()], "do_sample_frames": False}}
        if self.with_audio:
            common.update(audio=[media.wave], use_audio_in_video=True)
        return self.processor(**common).to(self.device)

    def generate(self, requests: list[Request], schema: dict) -> list[Generation]:
        """`schema` is unused: transformers has no structured decoding here."""
        import torch

        s = self.cfg.sampling
        results = []
        for request in requests:
            start = time.perf_counter()
            inputs = self._inputs(request)
            torch.manual_seed(request.seed(self.cfg.seed))
            extra = {"use_audio_in_video": True} if self.with_audio else {}
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs, **extra, max_new_tokens=s.max_tokens, do_sample=s.temperature > 0,
                    temperature=s.temperature or None, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                )
            prompt_len = inputs["input_ids"].shape[1]
            new = out[0, prompt_len:]
            text = self.processor.batch_decode(new[None], skip_special_tokens=True)[0]
            results.append(Generation(text, int(prompt_len), int(new.numel()), time.perf_counter() - start))
        return results


_loaded: dict[str, CaptionEngine] = {}


def load_engine(cfg: CaptionConfig) -> CaptionEngine:
    """The engine for these settings, loaded once per worker process (a new setting replaces it)."""
    key = cfg.model_dump_json()
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = ENGINES.load(cfg.engine)(cfg)
    return _loaded[key]


def release_engines() -> None:
    """Free the loaded model for later stages of this process, and undo vLLM's CPU worker replacing
    ``torch.set_num_threads`` (it pins its threads), which would otherwise ignore later training's threads."""
    import gc

    import torch

    _loaded.clear()
    gc.collect()
    torch.set_num_threads = torch._C.set_num_threads
