"""Benchmark protocols: which clips, which classes, and deterministic folds with honest validation.

A protocol (docs/method.md, "Downstream protocols") fixes the class list and how clips are grouped
into folds. Every fold has a test part (used once, at the end) and a training part; validation is
carved from the training part only, by holding out whole training speakers when the speakers are
known (several of them), else by a stratified share of the training clips.

Folds are a pure function of the ingest's clip table and the settings (protocol, folds, seed,
validation fraction): running twice gives the same files. They are saved as CSV files of clip ids
and source paths relative to the corpus root, so they stay valid when a corpus moves.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vaemo.artifacts import IngestFolder
from vaemo.errors import ArtifactError, VaemoError
from vaemo.ingest.adapters import cremad, dfew, mafw, ravdess
from vaemo.registry import PROTOCOLS

FOLDS_DIR = "folds"


class EvaluationError(VaemoError):
    """The data or the model cannot be evaluated as asked; the message says why and what exists."""


@dataclass(frozen=True)
class Protocol:
    name: str
    classes: tuple[str, ...] | None  # None: the labels found in the data (sorted)
    folds: int | None  # the official number of folds; None: k (generic)
    grouping: str  # "speaker-folds": the fold column groups speakers; "split-files": official split files; "generic"
    description: str


# The protocols by name: vaemo.registry.PROTOCOLS.
CREMA_D = Protocol("crema-d", tuple(cremad.EMOTIONS.values()), cremad.FOLDS, "speaker-folds",
                   "6 classes, 5 subject-independent folds over 91 actors (18 per fold, 19 in the last)")
MAFW = Protocol("mafw", mafw.EMOTIONS, 5, "split-files", "11 classes, the official 5 folds (single-label set)")
RAVDESS = Protocol("ravdess", ravdess.EMOTIONS, 6, "speaker-folds",
                   "8 classes, audio-visual speech files, 6 subject-independent folds of 4 actors")
DFEW = Protocol("dfew", tuple(dfew.EMOTIONS.values()), 5, "split-files", "7 classes, the official 5 folds")
GENERIC = Protocol("generic", None, None, "generic",
                   "labels from the ingest; k subject-independent folds when speakers are known, else stratified")
DEFAULT_GENERIC_FOLDS = 5


@dataclass
class Fold:
    number: int
    train: list[str]
    val: list[str]
    test: list[str]
    validation_split: str  # "speakers" or "clips"
    test_speakers: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


@dataclass
class FoldPlan:
    protocol: Protocol
    classes: list[str]
    clips: pd.DataFrame  # clip_id (index), label, speaker, fold, source
    folds: list[Fold]
    rule: str  # how the folds were made, for results and the report
    official: bool  # the benchmark's own folds (comparable with published figures)
    # What puts a source video in a fold's test part: "fold" (its fold number), "speaker" (its speaker is one of
    # the fold's test speakers) or "clip" (stratified by clip: a video without a clip belongs to no fold).
    test_by: str

    def summary(self) -> dict:
        return {
            "protocol": self.protocol.name,
            "classes": self.classes,
            "clips": int(len(self.clips)),
            "speakers": int(self.clips["speaker"].nunique()) if self.clips["speaker"].notna().any() else None,
            "clips_per_class": class_counts(self.clips, self.classes),
            "fold_rule": self.rule,
            "official_folds": self.official,
        }


def class_counts(clips: pd.DataFrame, classes: list[str]) -> dict[str, int]:
    counts = Counter(clips["label"])
    return {name: int(counts.get(name, 0)) for name in classes}


def load_clips(ingest_dir: Path) -> pd.DataFrame:
    """The labelled clips of an ingest folder: index clip_id; columns label, speaker, fold, source, dataset and
    video_only (why a clip has no audio, None for the others)."""
    folder = IngestFolder(ingest_dir)
    path = folder / folder.CLIPS
    try:
        table = folder.clips()
    except ArtifactError as err:
        raise EvaluationError(f"{err} (--data)") from None
    if table.empty:
        raise EvaluationError(
            f"{path} lists no clips: the ingest produced none (its manifest gives each video's status)"
        )
    for column in ("label", "speaker", "fold", "source", "dataset", "video_only"):
        if column not in table:
            table[column] = None
    labelled = table[table["label"].notna() & (table["label"].astype(str) != "")]
    if labelled.empty:
        raise EvaluationError(
            f"none of the {len(table)} clips in {path} has a label; ingest a labelled corpus "
            "(a benchmark adapter, or generic with --labels path,label[,speaker] CSV)"
        )
    clips = labelled[["clip_id", "label", "speaker", "fold", "source", "dataset", "video_only"]].copy()
    clips["label"] = clips["label"].astype(str)
    clips["speaker"] = clips["speaker"].map(lambda s: None if s is None or pd.isna(s) or s == "" else str(s))
    clips["fold"] = clips["fold"].map(lambda f: None if f is None or pd.isna(f) else int(f))
    return clips.drop_duplicates("clip_id").set_index("clip_id").sort_index()


def _describe(clips: pd.DataFrame, classes: list[str]) -> str:
    speakers = sorted(s for s in clips["speaker"].dropna().unique())
    counts = ", ".join(f"{name} {n}" for name, n in class_counts(clips, classes).items())
    if speakers:
        shown = ", ".join(speakers[:8]) + (f", ... ({len(speakers)} in all)" if len(speakers) > 8 else "")
        who = f"{len(speakers)} speaker{'s' if len(speakers) != 1 else ''} ({shown})"
    else:
        who = "no speaker information"
    return f"{who} and {len(clips)} labelled clips; clips per class: {counts}"


def _classes(protocol: Protocol, clips: pd.DataFrame, where: str) -> list[str]:
    found = sorted(clips["label"].unique())
    if protocol.classes is None:
        classes = found
    else:
        unknown = [label for label in found if label not in protocol.classes]
        if unknown:
            datasets = ", ".join(sorted(str(d) for d in clips["dataset"].dropna().unique())) or "unknown"
            raise EvaluationError(
                f"{where} holds labels {unknown} that the {protocol.name} protocol does not have (its classes: "
                f"{', '.join(protocol.classes)}; the data was ingested as {datasets}); use --protocol generic or "
                "the protocol of that dataset"
            )
        classes = list(protocol.classes)
    if len([c for c in classes if (clips["label"] == c).any()]) < 2:
        raise EvaluationError(
            f"{where}: classification needs at least 2 classes with clips; found {_describe(clips, classes)}"
        )
    return classes


def _rng(seed: int, *parts: object) -> np.random.Generator:
    """A generator that depends only on the seed and the named purpose (no global state)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _contiguous_groups(items: list[str], k: int) -> list[list[str]]:
    """items (already ordered) cut into k contiguous groups whose sizes differ by at most one."""
    bounds = np.linspace(0, len(items), k + 1).round().astype(int)
    return [items[bounds[i] : bounds[i + 1]] for i in range(k)]


def _speaker_sort_key(speaker: str):
    digits = "".join(ch for ch in speaker if ch.isdigit())
    return (int(digits) if digits else -1, speaker)


def _stratified_folds(clips: pd.DataFrame, k: int, seed: int) -> list[list[str]]:
    """Clip ids in k folds with each class spread evenly (round-robin over a seeded shuffle)."""
    folds: list[list[str]] = [[] for _ in range(k)]
    offset = 0
    for label in sorted(clips["label"].unique()):
        ids = sorted(clips.index[clips["label"] == label])
        order = _rng(seed, "stratified", label).permutation(len(ids))
        for position, index in enumerate(order):
            folds[(position + offset) % k].append(ids[index])
        offset += len(ids)
    return [sorted(f) for f in folds]


def _validation(train: pd.DataFrame, fraction: float, seed: int, fold: int) -> tuple[list[str], list[str], str]:
    """(train ids, validation ids, how): whole training speakers held out when there are several, else clips."""
    speakers = sorted(s for s in train["speaker"].dropna().unique())
    if len(speakers) >= 2 and train["speaker"].notna().all():
        order = [speakers[i] for i in _rng(seed, "validation", fold).permutation(len(speakers))]
        target = max(1, round(fraction * len(train)))
        held: list[str] = []
        per_speaker = train.groupby("speaker").size()
        for speaker in order:
            if len(held) >= len(speakers) - 1 or per_speaker[held].sum() >= target:
                break
            held.append(speaker)
        is_val = train["speaker"].isin(held)
        return sorted(train.index[~is_val]), sorted(train.index[is_val]), "speakers"
    val: list[str] = []
    for label in sorted(train["label"].unique()):
        ids = sorted(train.index[train["label"] == label])
        count = int(round(fraction * len(ids)))
        if len(ids) >= 2:
            count = min(max(count, 1), len(ids) - 1)
        else:
            count = 0
        val += [ids[i] for i in _rng(seed, "validation", fold, label).permutation(len(ids))[:count]]
    return sorted(set(train.index) - set(val)), sorted(val), "clips"


def make_folds(
    ingest_dir: Path, protocol: str, *, folds: int | None = None, val_fraction: float = 0.15, seed: int = 0
) -> FoldPlan:
    """The folds of a protocol over an ingest folder; EvaluationError when the data cannot give them.

    ``folds``: for crema-d and ravdess (speaker-defined folds) and generic, K subject-independent
    folds over the speakers present (contiguous groups in speaker order); None keeps the official
    grouping. For mafw and dfew (official split files) only the first K official folds are run.
    """
    spec = PROTOCOLS.load(protocol)
    where = str(IngestFolder(ingest_dir) / IngestFolder.CLIPS)
    clips = load_clips(ingest_dir)
    classes = _classes(spec, clips, where)
    clips = clips[clips["label"].isin(classes)]
    if folds is not None and folds < 2:
        raise EvaluationError(f"--folds must be at least 2, got {folds}")
    describe = _describe(clips, classes)
    has_speakers = clips["speaker"].notna().all()

    test_sets: list[list[str]]
    official = False
    if spec.grouping == "split-files":
        present = sorted(int(f) for f in clips["fold"].dropna().unique())
        missing = [f for f in range(1, spec.folds + 1) if f not in present]
        if clips["fold"].isna().any() or missing:
            raise EvaluationError(
                f"{protocol}: the official {spec.folds} folds need every clip in one fold; {where} has clips in folds "
                f"{present or 'none'} ({describe}); ingest the corpus with --dataset {protocol} and its split files"
            )
        chosen = list(range(1, (folds or spec.folds) + 1))
        if len(chosen) > spec.folds:
            raise EvaluationError(f"{protocol} has {spec.folds} official folds; --folds {folds} asks for more")
        test_sets = [sorted(clips.index[clips["fold"] == f]) for f in chosen]
        rule = (
            f"official folds {chosen[0]}-{chosen[-1]} of {spec.folds}" if folds else f"the official {spec.folds} folds"
        )
        official = folds is None or folds == spec.folds
        test_by = "fold"
    elif has_speakers:
        speakers = sorted(clips["speaker"].unique(), key=_speaker_sort_key)
        k = folds or spec.folds or DEFAULT_GENERIC_FOLDS
        if spec.grouping == "speaker-folds" and folds in (None, spec.folds) and clips["fold"].notna().all():
            by_fold = clips.groupby("fold")
            empty = [f for f in range(1, spec.folds + 1) if f not in by_fold.groups]
            if empty:
                raise EvaluationError(
                    f"{protocol}: the official {spec.folds} subject-independent folds need actors in every fold, but "
                    f"{where} has none in fold(s) {', '.join(map(str, empty))}: it holds {describe}. "
                    + _fewer_folds_hint(len(speakers))
                )
            test_sets = [sorted(by_fold.get_group(f).index) for f in range(1, spec.folds + 1)]
            rule = f"the official {spec.folds} subject-independent folds"
            official, test_by = True, "fold"
        else:
            if len(speakers) < k:
                raise EvaluationError(
                    f"{protocol}: {k} subject-independent folds need at least {k} speakers, but {where} holds "
                    f"{describe}. " + _fewer_folds_hint(len(speakers))
                )
            groups = _contiguous_groups(speakers, k)
            test_sets = [sorted(clips.index[clips["speaker"].isin(group)]) for group in groups]
            rule = f"{k} subject-independent folds over {len(speakers)} speakers (contiguous groups in speaker order)"
            test_by = "speaker"
            # Regrouped speakers are not the benchmark's folds, even with the official count.
    else:
        if spec.grouping == "speaker-folds":
            raise EvaluationError(
                f"{protocol}: subject-independent folds need the speaker of every clip; {where} holds {describe}"
            )
        k = folds or DEFAULT_GENERIC_FOLDS
        smallest = min(n for n in class_counts(clips, classes).values() if n > 0)
        if smallest < k:
            raise EvaluationError(
                f"{protocol}: {k} stratified folds need at least {k} clips in every class, but {where} holds "
                f"{describe}; use --folds with a smaller K (at least 2) or add clips"
            )
        test_sets = _stratified_folds(clips, k, seed)
        rule = f"{k} stratified folds (speakers unknown, so not subject-independent)"
        test_by = "clip"

    result = []
    for number, test in enumerate(test_sets, start=1):
        test_set = set(test)
        train = clips[~clips.index.isin(test_set)]
        train_ids, val_ids, how = _validation(train, val_fraction, seed, number)
        if not train_ids:
            raise EvaluationError(f"{protocol}: fold {number} leaves no clip to train on; {where} holds {describe}")
        missing = [
            c
            for c in classes
            if (clips.loc[test, "label"] == c).any() and not (clips.loc[train_ids, "label"] == c).any()
        ]
        if missing:
            raise EvaluationError(
                f"{protocol}: fold {number} tests class(es) {', '.join(missing)} that its training speakers never "
                "show; "
                f"{where} holds {describe}; use fewer folds or add clips"
            )
        test_speakers = sorted(clips.loc[test, "speaker"].dropna().unique().tolist())
        result.append(Fold(number, train_ids, val_ids, sorted(test), how, test_speakers))
    return FoldPlan(spec, classes, clips, result, rule, official, test_by)


def _fewer_folds_hint(speakers: int) -> str:
    if speakers < 2:
        return "Subject-independent evaluation needs at least 2 speakers (one to train on, one to test); add data."
    return f"Use --folds K with 2 <= K <= {speakers} for a smaller, unofficial split, or add data."


def save_folds(plan: FoldPlan, out_dir: Path) -> list[Path]:
    """``folds/fold-K.csv`` with clip_id, source (relative to the corpus root), speaker, label, split."""
    folder = Path(out_dir) / FOLDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fold in plan.folds:
        rows = [(clip, split) for split in ("train", "val", "test") for clip in getattr(fold, split)]
        table = plan.clips.loc[[clip for clip, _ in rows], ["source", "speaker", "label"]].reset_index()
        table["split"] = [split for _, split in rows]
        path = folder / f"fold-{fold.number}.csv"
        table.to_csv(path, index=False)
        paths.append(path)
    return paths
