"""A tiny random-weight Qwen2.5-Omni thinker built locally, for tests, the demo and install checks.

It has the real model's architecture, tokenizer layout, processor and chat template at a
size of well under a megabyte, so the whole captioning path (vLLM's multimodal processor,
structured decoding, parsing, storage) runs on a CPU without downloading anything. Its
weights are random: the text it writes is meaningless.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

WARNING = "random weights: this model writes meaningless text (for tests and install checks only)"

# The placeholders and markers the Omni processor and vLLM look up by name.
OMNI_TOKENS = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML with Qwen2.5-Omni's multimodal placeholders, the layout of the released template.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif part['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _training_text() -> list[str]:
    """Text that covers JSON punctuation and the words of the prompts, so BPE merges exist."""
    words = (
        "facial vocal cues reasoning emotion intensity description face voice pitch energy tempo "
        "gaze brow smile frown eyes mouth head angry happy sad neutral fear disgust surprise calm "
        "low medium high the a and of with is in it to person looks sounds speaks loud soft fast slow"
    ).split()
    lines = []
    for i in range(400):
        picked = [words[(i * 7 + k * 3) % len(words)] for k in range(6)]
        lines.append(json.dumps({picked[0]: " ".join(picked[1:]), "n": i, "ok": i % 2 == 0}))
    lines += ["0123456789 {}[]:,\"' \n\t.!?-_" * 4, "system user assistant"]
    return lines


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = CHAT_TOKENS + list(OMNI_TOKENS.values())
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_specific_special_tokens=OMNI_TOKENS,
    )


def _config(tokenizer):
    from transformers import Qwen2_5OmniConfig

    token = tokenizer.convert_tokens_to_ids
    head_dim = 32  # vLLM's CPU attention needs head_dim >= 32
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "max_position_embeddings": 8192,
        # Multimodal RoPE: the three sections cover head_dim / 2 rotary frequencies.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        "tie_word_embeddings": False,
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "out_hidden_size": text["hidden_size"],
        "fullatt_block_indexes": [1],
    }
    audio = {
        "num_mel_bins": 128,
        "encoder_layers": 2,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 128,
        "d_model": 64,
        "output_dim": text["hidden_size"],
        "n_window": 100,
        "max_source_positions": 1500,
    }
    thinker = {
        "text_config": text,
        "vision_config": vision,
        "audio_config": audio,
        "audio_token_index": token(OMNI_TOKENS["audio_token"]),
        "image_token_index": token(OMNI_TOKENS["image_token"]),
        "video_token_index": token(OMNI_TOKENS["video_token"]),
        "audio_start_token_id": token(OMNI_TOKENS["audio_bos_token"]),
        "audio_end_token_id": token(OMNI_TOKENS["audio_eos_token"]),
        "vision_start_token_id": token(OMNI_TOKENS["vision_bos_token"]),
        "vision_end_token_id": token(OMNI_TOKENS["vision_eos_token"]),
        "user_token_id": token("user") if token("user") is not None else 0,
        "position_id_per_seconds": 25,
        "seconds_per_chunk": 2,
    }
    config = Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)
    config.architectures = ["Qwen2_5OmniModel"]
    return config


def _processor(tokenizer):
    from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    # Small pixel caps keep the number of vision tokens per frame low (one merged token = 28x28).
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    image = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **pixels)
    video = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **pixels)
    audio = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000)
    return Qwen2_5OmniProcessor(
        image_processor=image, video_processor=video, feature_extractor=audio,
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    )


def build_tiny_mllm(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-Omni model (config, thinker weights, tokenizer, processor) to `folder`."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration
    from transformers.utils import logging as hf_logging

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused speech talker's default token ids lie outside the tiny vocabulary
    try:
        config = _config(tokenizer)
    finally:
        hf_logging.set_verbosity(verbosity)
    torch.manual_seed(seed)
    thinker = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config)
    # Only the thinker is served; the released checkpoints prefix its weights with "thinker.".
    weights = {f"thinker.{k}": v.contiguous() for k, v in thinker.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    _processor(tokenizer).save_pretrained(out)
    # transformers' full Omni class loads a speaker table even without audio output.
    torch.save({}, out / "spk_dict.pt")
    (out / "README.md").write_text(f"Tiny Qwen2.5-Omni thinker built by `vaemo dev tiny-mllm`: {WARNING}.\n")
    return out
