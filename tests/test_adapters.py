"""Dataset adapters: naming rules, split files, detection and the errors users see."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vaemo.errors import CorpusError
from vaemo.ingest.adapters import VIDEO_EXTENSIONS, detect_dataset, scan_corpus
from vaemo.ingest.records import LeftOut, Scanned, SourceRecord
from vaemo.registry import DATASETS


def touch(root: Path, *paths: str) -> None:
    """Empty placeholder files: adapters only read names and split files."""
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).touch()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- corpus builders, shared by the per-dataset tests and the detection test ---


def make_ravdess(root: Path) -> None:
    touch(
        root,
        "Actor_01/01-01-01-01-01-01-01.mp4",  # neutral, actor 1
        "Actor_05/01-01-03-02-01-02-05.mp4",  # happy, actor 5
        "Actor_24/01-01-08-01-02-01-24.mp4",  # surprised, actor 24
        "Actor_05/02-01-03-02-01-02-05.mp4",  # video-only copy
        "Actor_05/01-02-03-02-01-02-05.mp4",  # sung
        "Actor_05/03-01-03-02-01-02-05.wav",  # audio-only, not a video
    )


def make_cremad(root: Path) -> None:
    touch(
        root,
        "VideoFlash/1001_DFA_ANG_XX.flv",
        "VideoFlash/1018_IEO_HAP_LO.flv",
        "VideoFlash/1019_TIE_SAD_HI.flv",
        "VideoFlash/1073_ITS_FEA_MD.flv",
        "VideoFlash/1091_WSI_NEU_XX.flv",
        "VideoFlash/1092_WSI_NEU_XX.flv",  # no such actor
        "VideoFlash/notes.flv",
        "AudioWAV/1001_DFA_ANG_XX.wav",
        "AudioWAV/1019_TIE_SAD_HI.wav",
    )


def make_voxceleb2(root: Path) -> None:
    touch(
        root,
        "dev/mp4/id00012/21Uxsk56VDQ/00001.mp4",
        "dev/mp4/id00012/21Uxsk56VDQ/00002.mp4",
        "dev/mp4/id00345/a b'c/00001.mp4",
        "dev/stray.mp4",
    )


MAFW_SPLITS = "Train & Test Set/single/no_caption"
# set K's test split holds clip 0000K.
MAFW_TEST = {1: "anger", 2: "contempt", 3: "neutral", 4: "helplessness", 5: "happiness"}


def write_mafw_splits(folder: Path) -> None:
    for fold, emotion in MAFW_TEST.items():
        write(folder / f"set_{fold}/test.txt", f"{fold:05d}.mp4 {emotion}\n")
        others = "".join(f"{k:05d}.mp4 {e}\n" for k, e in MAFW_TEST.items() if k != fold)
        write(folder / f"set_{fold}/train.txt", others)


def make_mafw(root: Path) -> None:
    touch(root, *(f"data/clips/{clip:05d}.mp4" for clip in range(1, 7)))  # 00006 is in no single-label split
    write_mafw_splits(root / MAFW_SPLITS)


# set K's test split holds clip K, with label code K (and 7 for fold 5).
DFEW_TEST = {1: 1, 2: 2, 3: 3, 4: 6, 5: 7}


def write_dfew_splits(folder: Path) -> None:
    for fold, code in DFEW_TEST.items():
        write(folder / f"test(single-labeled)/set_{fold}.csv", f"video_name,label\n{fold},{code}\n")
        write(folder / f"train(single-labeled)/set_{fold}.csv", "video_name,label\n")


def make_dfew(root: Path) -> None:
    touch(root, *(f"Clip/original/part_1/{clip:05d}.mp4" for clip in range(1, 7)))
    write_dfew_splits(root / "EmoLabel_DataSplit")


def make_generic(root: Path) -> None:
    touch(root, "talk one.MP4", 'sub/zoë\'s "clip".mkv', "sub/deeper/c.webm", "notes.txt")


def fields(scanned: list[Scanned], *names: str) -> list[tuple]:
    """The named fields of the videos that are used."""
    return [tuple(getattr(record, name) for name in names) for record in scanned if isinstance(record, SourceRecord)]


def left_out(scanned: list[Scanned]) -> list[tuple[str, str]]:
    return [(item.path, item.status) for item in scanned if isinstance(item, LeftOut)]


# --- naming rules ---


def test_ravdess_keeps_audio_visual_speech_with_actor_folds(tmp_path: Path) -> None:
    make_ravdess(tmp_path)
    records = scan_corpus(tmp_path, "ravdess")
    assert fields(records, "path", "speaker", "label", "fold") == [
        ("Actor_01/01-01-01-01-01-01-01.mp4", "ravdess-01", "neutral", 1),
        ("Actor_05/01-01-03-02-01-02-05.mp4", "ravdess-05", "happy", 2),
        ("Actor_24/01-01-08-01-02-01-24.mp4", "ravdess-24", "surprised", 6),
    ]
    used = [record for record in records if isinstance(record, SourceRecord)]
    assert all(record.whole_file and record.dataset == "ravdess" for record in used)
    # The copies that are not used are still listed, with why (the audio-only .wav is not a video).
    assert left_out(records) == [("Actor_05/01-02-03-02-01-02-05.mp4", "not_used"),
                                 ("Actor_05/02-01-03-02-01-02-05.mp4", "not_used")]
    reasons = {item.path: item.reason for item in records if isinstance(item, LeftOut)}
    assert reasons["Actor_05/02-01-03-02-01-02-05.mp4"].startswith("a video-only copy (modality 02)")
    assert reasons["Actor_05/01-02-03-02-01-02-05.mp4"].startswith("a sung take")


def test_cremad_labels_actor_folds_and_studio_audio(tmp_path: Path) -> None:
    make_cremad(tmp_path)
    records = scan_corpus(tmp_path, "crema-d")
    assert fields(records, "path", "speaker", "label", "fold", "audio_path") == [
        ("VideoFlash/1001_DFA_ANG_XX.flv", "1001", "anger", 1, "AudioWAV/1001_DFA_ANG_XX.wav"),
        ("VideoFlash/1018_IEO_HAP_LO.flv", "1018", "happy", 1, None),
        ("VideoFlash/1019_TIE_SAD_HI.flv", "1019", "sad", 2, "AudioWAV/1019_TIE_SAD_HI.wav"),
        # Actors 1073..1091 form the larger last fold.
        ("VideoFlash/1073_ITS_FEA_MD.flv", "1073", "fear", 5, None),
        ("VideoFlash/1091_WSI_NEU_XX.flv", "1091", "neutral", 5, None),
    ]
    assert all(record.whole_file for record in records if isinstance(record, SourceRecord))
    assert left_out(records) == [("VideoFlash/1092_WSI_NEU_XX.flv", "off_rule"), ("VideoFlash/notes.flv", "off_rule")]
    assert all("CREMA-D names AAAA_SSS_EEE_LL" in item.reason for item in records if isinstance(item, LeftOut))


def test_cremad_without_matching_names_explains_the_rule(tmp_path: Path) -> None:
    touch(tmp_path, "VideoFlash/interview.flv")
    with pytest.raises(CorpusError, match=r"'VideoFlash/interview.flv'.*CREMA-D names AAAA_SSS_EEE_LL"):
        scan_corpus(tmp_path, "crema-d")


def test_voxceleb2_speakers_from_id_folders(tmp_path: Path) -> None:
    make_voxceleb2(tmp_path)
    records = scan_corpus(tmp_path, "voxceleb2")
    assert fields(records, "path", "speaker", "label", "fold", "whole_file") == [
        ("dev/mp4/id00012/21Uxsk56VDQ/00001.mp4", "id00012", None, None, False),
        ("dev/mp4/id00012/21Uxsk56VDQ/00002.mp4", "id00012", None, None, False),
        ("dev/mp4/id00345/a b'c/00001.mp4", "id00345", None, None, False),
    ]
    assert left_out(records) == [("dev/stray.mp4", "off_rule")]


def test_mafw_fold_is_the_set_whose_test_split_holds_the_clip(tmp_path: Path) -> None:
    make_mafw(tmp_path)
    records = scan_corpus(tmp_path, "mafw")
    assert fields(records, "path", "label", "fold", "speaker", "whole_file") == [
        (f"data/clips/{fold:05d}.mp4", emotion, fold, None, True) for fold, emotion in MAFW_TEST.items()
    ]
    [unlabelled] = [item for item in records if isinstance(item, LeftOut)]
    assert (unlabelled.path, unlabelled.status) == ("data/clips/00006.mp4", "not_in_splits")
    assert unlabelled.reason == "no mafw test split names clip '00006', so it has no label or fold"


def test_mafw_split_folder_outside_the_root(tmp_path: Path) -> None:
    touch(tmp_path / "clips", "00001.mp4", "00003.mp4")
    write_mafw_splits(tmp_path / "splits")
    records = scan_corpus(tmp_path / "clips", "mafw", labels=tmp_path / "splits")
    assert fields(records, "path", "label", "fold") == [("00001.mp4", "anger", 1), ("00003.mp4", "neutral", 3)]
    # The split folder alone tells which release it is.
    assert scan_corpus(tmp_path / "clips", labels=tmp_path / "splits") == records


def test_mafw_unknown_emotion_names_file_and_classes(tmp_path: Path) -> None:
    make_mafw(tmp_path)
    write(tmp_path / MAFW_SPLITS / "set_2/test.txt", "00002.mp4 joy\n")
    with pytest.raises(CorpusError, match=r"set_2/test.txt line 1: unknown MAFW emotion 'joy'.*disappointment"):
        scan_corpus(tmp_path, "mafw")


def test_dfew_fold_and_label_codes_from_split_csvs(tmp_path: Path) -> None:
    make_dfew(tmp_path)
    records = scan_corpus(tmp_path, "dfew")
    assert fields(records, "path", "label", "fold", "whole_file") == [
        ("Clip/original/part_1/00001.mp4", "happy", 1, True),
        ("Clip/original/part_1/00002.mp4", "sad", 2, True),
        ("Clip/original/part_1/00003.mp4", "neutral", 3, True),
        ("Clip/original/part_1/00004.mp4", "disgust", 4, True),
        ("Clip/original/part_1/00005.mp4", "fear", 5, True),
    ]
    assert left_out(records) == [("Clip/original/part_1/00006.mp4", "not_in_splits")]


def test_dfew_unknown_label_code(tmp_path: Path) -> None:
    make_dfew(tmp_path)
    write(tmp_path / "EmoLabel_DataSplit/test(single-labeled)/set_3.csv", "video_name,label\n3,1\n4,0\n")
    with pytest.raises(CorpusError, match=r"set_3.csv line 3: unknown DFEW label '0'.*7=fear"):
        scan_corpus(tmp_path, "dfew")


def test_clip_in_two_test_splits_is_rejected(tmp_path: Path) -> None:
    make_dfew(tmp_path)
    write(tmp_path / "EmoLabel_DataSplit/test(single-labeled)/set_2.csv", "video_name,label\n1,2\n")
    with pytest.raises(CorpusError, match=r"'00001' is in the test split of both set 1 and set 2"):
        scan_corpus(tmp_path, "dfew")


def test_generic_without_labels_takes_every_video(tmp_path: Path) -> None:
    make_generic(tmp_path)
    touch(tmp_path, ".cache/hidden.mp4", "sub/.partial.mp4")
    records = scan_corpus(tmp_path, "generic")
    assert fields(records, "path", "label", "whole_file") == [
        ("sub/deeper/c.webm", None, False),
        ('sub/zoë\'s "clip".mkv', None, False),
        ("talk one.MP4", None, False),
    ]
    assert not any(Path(record.path).is_absolute() or "\\" in record.path for record in records)


def test_generic_with_labels_csv(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    make_generic(corpus)
    labels = write(
        tmp_path / "labels.csv",
        'path,label,fold,speaker\n"sub/zoë\'s ""clip"".mkv",happy,2,zoë\ntalk one.MP4,,,\ngone.mp4,sad,1,x\n'
        "sub\\deeper\\c.webm,angry,3,\n",  # written on Windows
    )
    records = scan_corpus(corpus, labels=labels)
    assert fields(records, "path", "label", "speaker", "fold", "whole_file") == [
        ("sub/deeper/c.webm", "angry", None, 3, True),
        ('sub/zoë\'s "clip".mkv', "happy", "zoë", 2, True),
        ("talk one.MP4", None, None, None, True),
    ]


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        (
            "path,emotion\na.mp4,happy\n",
            r"unknown column\(s\) 'emotion'.*allowed columns are path, label, speaker, fold",
        ),
        ("label\nhappy\n", r"missing column\(s\) 'path'"),
        ("path,fold\na.mp4,first\n", r"line 2: fold 'first' is not a whole number"),
        ("path,label\nelsewhere/a.mp4,happy\n", r"none of the 1 rows .*'elsewhere/a.mp4'.*relative to the corpus root"),
        ("path\n/abs/a.mp4\n", r"'/abs/a.mp4' must be relative to the corpus root"),
        ("", r"is empty; expected a header line with path"),
    ],
)
def test_generic_bad_labels_csv(tmp_path: Path, csv: str, message: str) -> None:
    touch(tmp_path / "corpus", "a.mp4")
    with pytest.raises(CorpusError, match=message):
        scan_corpus(tmp_path / "corpus", "generic", labels=write(tmp_path / "labels.csv", csv))


def test_linked_folders_are_followed_once(tmp_path: Path) -> None:
    touch(tmp_path / "store", "a.mp4")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus/linked").symlink_to(tmp_path / "store")
    (tmp_path / "store/loop").symlink_to(tmp_path / "corpus")
    assert [record.path for record in scan_corpus(tmp_path / "corpus")] == ["linked/a.mp4"]


# --- detection ---


@pytest.mark.parametrize(
    ("make", "dataset"),
    [
        (make_ravdess, "ravdess"),
        (make_cremad, "crema-d"),
        (make_voxceleb2, "voxceleb2"),
        (make_mafw, "mafw"),
        (make_dfew, "dfew"),
        (make_generic, "generic"),
    ],
)
def test_detection(tmp_path: Path, make, dataset: str) -> None:
    make(tmp_path)
    assert detect_dataset(tmp_path) == dataset
    records = scan_corpus(tmp_path)
    assert records and {record.dataset for record in records} == {dataset}
    assert records == scan_corpus(tmp_path, dataset)
    assert [record.path for record in records] == sorted(record.path for record in records)
    assert not any(Path(record.path).is_absolute() or str(tmp_path) in record.path for record in records)


def test_public_constants() -> None:
    assert set(DATASETS.names) == {"generic", "ravdess", "crema-d", "mafw", "dfew", "voxceleb2"}
    assert {".mp4", ".flv", ".ts"} <= VIDEO_EXTENSIONS and all(ext == ext.lower() for ext in VIDEO_EXTENSIONS)


# --- errors users see ---


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"corpus root .*nowhere does not exist"):
        scan_corpus(tmp_path / "nowhere")


def test_root_is_a_file(tmp_path: Path) -> None:
    touch(tmp_path, "a.mp4")
    with pytest.raises(CorpusError, match=r"a.mp4 is not a folder"):
        scan_corpus(tmp_path / "a.mp4")


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(
        CorpusError, match=r"unknown dataset 'affwild'; valid names are auto, generic, ravdess, crema-d"
    ):
        scan_corpus(tmp_path, "affwild")


def test_empty_folder_says_what_was_looked_for(tmp_path: Path) -> None:
    touch(tmp_path, "readme.txt", ".hidden/a.mp4")
    with pytest.raises(CorpusError, match=rf"no video files under {re.escape(str(tmp_path))}.*\.mp4.*\.webm"):
        scan_corpus(tmp_path)


def test_missing_split_folder_names_the_expected_files(tmp_path: Path) -> None:
    touch(tmp_path, "data/clips/00001.mp4")
    with pytest.raises(CorpusError, match=r"no split files found under .*single/no_caption/set_K/test.txt"):
        scan_corpus(tmp_path, "mafw")
    with pytest.raises(CorpusError, match=r"EmoLabel_DataSplit/test\(single-labeled\)/set_K.csv"):
        scan_corpus(tmp_path, "dfew")


def test_incomplete_split_folder_lists_missing_files(tmp_path: Path) -> None:
    make_mafw(tmp_path)
    (tmp_path / MAFW_SPLITS / "set_4/test.txt").unlink()
    with pytest.raises(CorpusError, match=r"mafw split files missing: .*set_4/test.txt$"):
        scan_corpus(tmp_path, "mafw")


def test_labels_for_a_dataset_named_by_its_files(tmp_path: Path) -> None:
    make_ravdess(tmp_path)
    with pytest.raises(CorpusError, match=r"ravdess is described by its file names alone"):
        scan_corpus(tmp_path, "ravdess", labels=write(tmp_path / "labels.csv", "path\n"))
