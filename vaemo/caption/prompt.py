"""The chain-of-thought prompt (a versioned data file) and the answer it asks for (a bounded JSON object)."""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vaemo.config import read_yaml
from vaemo.errors import ConfigError

PROMPTS_DIR = Path(__file__).parent / "prompts"
LABEL_AWARE_SUFFIX = "+label"


# Plain text without control characters: what a description should be, and what keeps a weak
# model's structured decoding from wandering into escape sequences.
PLAIN = r"^[^\x00-\x1f]+$"


class AffectiveDescription(BaseModel):
    """The answer the prompt asks for, validated after every reply."""

    model_config = ConfigDict(extra="forbid")

    facial_cues: str = Field(min_length=1, max_length=600, pattern=PLAIN)
    vocal_cues: str = Field(min_length=1, max_length=600, pattern=PLAIN)
    reasoning: str = Field(min_length=1, max_length=1200, pattern=PLAIN)
    emotion: str = Field(
        min_length=2, max_length=24, pattern=r"^[a-z]+$", description="one lower-case word (open vocabulary)"
    )
    intensity: Literal["low", "medium", "high"]
    description: str = Field(min_length=1, max_length=1000, pattern=PLAIN)


FIELDS = tuple(AffectiveDescription.model_fields)


TEXT_FIELDS = ("facial_cues", "vocal_cues", "reasoning", "description")


def json_schema(limits: dict[str, int]) -> dict:
    """The schema for structured decoding: every field required, nothing else allowed, text fields
    bounded by the prompt's limits (without patterns: xgrammar cannot combine the two; validation
    checks the patterns)."""
    schema = AffectiveDescription.model_json_schema()
    for name in TEXT_FIELDS:
        field = schema["properties"][name]
        field.pop("pattern")
        field["maxLength"] = limits[name]
    schema["properties"]["emotion"] = {"type": "string", "pattern": "^[a-z]{2,24}$"}
    schema["required"] = list(FIELDS)
    schema["additionalProperties"] = False
    return schema


@dataclass(frozen=True)
class Prompt:
    version: str
    system: str
    user: str
    repair: str
    label_hint: str
    limits: dict[str, int]  # most characters per text field: the answer's size, part of the prompt's design
    digest: str  # of the file's bytes: a changed text under an unchanged version is caught
    path: Path

    def messages(self, label: str | None = None) -> list[dict]:
        """System + user turn; the video placeholder carries the voice too (audio in video)."""
        text = self.user + ("\n" + self.label_hint.format(label=label) if label else "")
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]},
        ]

    def repair_messages(self, first: list[dict], reply: str, reason: str, reply_chars: int = 2000) -> list[dict]:
        """The conversation so far plus a turn that says what was wrong with the reply."""
        return first + [
            {"role": "assistant", "content": reply[:reply_chars]},
            {"role": "user", "content": self.repair.format(reason=reason)},
        ]


class PromptError(ConfigError):
    pass


def _prompt_path(name_or_path: str, relative_to: Path = PROMPTS_DIR) -> Path:
    path = Path(name_or_path)
    if not path.suffix:
        return PROMPTS_DIR / f"{name_or_path}.yaml"
    return path if path.is_absolute() or path.is_file() else relative_to / path


def _read_prompt(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, bytes]:
    """A prompt file's keys over those of the prompt it ``extends`` (by name or path), and the bytes of all of them."""
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.yaml")))
        raise PromptError(
            f"prompt {path.stem if path.parent == PROMPTS_DIR else str(path)!r} not found (bundled prompts: {known}; "
            "or give a path to a .yaml file)"
        )
    if path.resolve() in chain:
        raise PromptError(f"{path}: `extends` loops back to itself")
    raw = path.read_bytes()
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a mapping of prompt keys")
    if data.get("extends"):
        base, base_raw = _read_prompt(_prompt_path(str(data.pop("extends")), path.parent), (*chain, path.resolve()))
        return {**base, **data}, base_raw + raw
    return data, raw


def load_prompt(name_or_path: str) -> Prompt:
    """A prompt by name (a file in vaemo/caption/prompts) or by path to a YAML file."""
    path = _prompt_path(name_or_path, Path.cwd())
    data, raw = _read_prompt(path)
    missing = [k for k in ("version", "system", "user", "repair") if not data.get(k)]
    if missing:
        raise PromptError(f"{path}: missing {', '.join(missing)}")
    if LABEL_AWARE_SUFFIX in data["version"]:
        raise PromptError(f"{path}: the version may not contain {LABEL_AWARE_SUFFIX!r} (it marks label-aware captions)")
    limits = {name: AffectiveDescription.model_fields[name].metadata for name in TEXT_FIELDS}
    caps = {name: next(m.max_length for m in meta if hasattr(m, "max_length")) for name, meta in limits.items()}
    given = data.get("limits") or {}
    wrong = {k: v for k, v in given.items() if k not in caps or not isinstance(v, int) or not 1 <= v <= caps[k]}
    if wrong:
        raise PromptError(f"{path}: limits {wrong} are not text fields with 1 to {caps} characters")
    return Prompt(version=str(data["version"]), limits={**caps, **given}, system=data["system"].strip(),
                  user=data["user"].strip(), repair=data["repair"].strip(),
                  label_hint=(data.get("label_hint") or "").strip(), digest=hashlib.sha256(raw).hexdigest()[:16],
                  path=path)


@dataclass(frozen=True)
class Parsed:
    description: AffectiveDescription | None
    reason: str | None  # why the reply is unusable; None when it is usable


def _repetitive(text: str) -> bool:
    """Degenerate loops: few distinct words, or text that compresses far better than language does."""
    words = text.split()
    if len(words) >= 12 and len(set(words)) / len(words) < 0.25:
        return True
    return len(text) >= 120 and len(zlib.compress(text.encode())) / len(text.encode()) < 0.12


def _object(raw: str) -> dict:
    """The reply's JSON object; a reply wrapped in prose or a code fence is accepted when the object is whole.

    Raw control characters inside strings (some grammars let them through) are tolerated here and
    turned into spaces by :func:`_plain`; the raw reply is stored as it was.
    """
    text = raw.strip()
    try:
        return json.loads(text, strict=False)
    except json.JSONDecodeError:
        match = re.search(r"\{.*\}", text, re.DOTALL)
        if not match:
            raise
        return json.loads(match.group(0), strict=False)


def _plain(data: dict) -> dict:
    """Line breaks, tabs and other control characters in a text value become single spaces."""
    return {k: re.sub(r"\s*[\x00-\x1f]+\s*", " ", v).strip() if isinstance(v, str) else v for k, v in data.items()}


def parse_reply(raw: str, limits: dict[str, int]) -> Parsed:
    """Validate a model reply: JSON, the bounded fields, and not degenerate."""
    if not raw or not raw.strip():
        return Parsed(None, "empty reply")
    try:
        data = _object(raw)
    except json.JSONDecodeError as exc:
        return Parsed(None, f"not JSON ({exc.msg} at character {exc.pos})")
    if not isinstance(data, dict):
        return Parsed(None, f"JSON {type(data).__name__}, not an object")
    try:
        answer = AffectiveDescription.model_validate(_plain(data))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "reply"
        return Parsed(None, f"invalid {where}: {first['msg']} ({len(exc.errors())} problem(s))")
    for field in FIELDS:
        value = getattr(answer, field)
        if _repetitive(value):
            return Parsed(None, f"repetitive {field}")
        if len(value) > limits.get(field, len(value)):
            return Parsed(None, f"{field} longer than {limits[field]} characters")
    return Parsed(answer, None)
