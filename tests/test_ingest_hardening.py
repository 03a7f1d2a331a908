"""What real corpora and real disks do: special files, links, files that change or vanish mid-run, full disks.

Every case ends with a status or one clear line, never a traceback or a hang (each test has a timeout,
so a read that blocks fails the test), and the good clips beside a bad entry are still ingested once.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, cli_env, ingest_folder, vaemo_command
from tests.test_ingest_run import samples
from vaemo.artifacts import write_json_atomic
from vaemo.config import IngestConfig
from vaemo.errors import CorpusError, StorageError, writing
from vaemo.ingest import shards
from vaemo.ingest.adapters import scan_corpus
from vaemo.ingest.run import IngestRun

CFG = IngestConfig(videos_per_batch=1)


def manifest(out: Path) -> dict[str, dict]:
    frame = pd.read_parquet(out / "manifest.parquet")
    assert frame["path"].is_unique, frame
    return {row["path"]: row for row in frame.to_dict("records")}


def good_source(corpus: Path, folder: Path, count: int) -> Path:
    folder.mkdir()
    for path in sorted(corpus.glob("*.mp4"))[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def assert_one_copy_of_each_clip(out: Path, stats: dict) -> None:
    keys = [s["__key__"] for s in samples(out)]
    clips = pd.read_parquet(out / "clips.parquet")
    assert len(keys) == len(set(keys)) == stats["clips"] == len(clips) and set(keys) == set(clips["clip_id"])


@pytest.mark.timeout(180)
def test_special_entries_get_a_status_and_never_block(corpus, tmp_path):
    """A pipe, a socket, a link to /dev/zero, a broken link, a link loop and a file that fails to read (root reads any
    file whatever its mode, so /proc/self/mem, whose first page gives EIO, is the unreadable file) beside two good
    clips; a folder named like a video is walked as a folder (the clip inside is ingested)."""
    source = good_source(corpus, tmp_path / "src", 2)
    os.mkfifo(source / "pipe.mp4")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(source / "socket.mp4"))
    (source / "zero.mp4").symlink_to("/dev/zero")
    (source / "gone.mp4").symlink_to("nowhere.mp4")
    (source / "loop_a.mp4").symlink_to("loop_b.mp4")
    (source / "loop_b.mp4").symlink_to("loop_a.mp4")
    (source / "mem.mp4").symlink_to("/proc/self/mem")
    (source / "folder.mp4").mkdir()
    shutil.copy(sorted(corpus.glob("*.mp4"))[2], source / "folder.mp4" / "inner.mp4")
    try:
        out = tmp_path / "out"
        stats, _ = ingest_folder(source, out, CFG)
        rows = manifest(out)
        good = sorted(p.name for p in corpus.glob("*.mp4"))[:2]
        assert {path: row["status"] for path, row in rows.items()} == {
            **dict.fromkeys(good, "ok"), "folder.mp4/inner.mp4": "ok", "pipe.mp4": "not_a_file",
            "socket.mp4": "not_a_file", "zero.mp4": "not_a_file", "gone.mp4": "broken_link", "loop_a.mp4": "link_loop",
            "loop_b.mp4": "link_loop", "mem.mp4": "unreadable"}
        assert "named pipe" in rows["pipe.mp4"]["reason"] and "socket" in rows["socket.mp4"]["reason"]
        assert "/dev/zero" in rows["zero.mp4"]["reason"] and "character device" in rows["zero.mp4"]["reason"]
        assert "'nowhere.mp4'" in rows["gone.mp4"]["reason"] and "loop" in rows["loop_a.mp4"]["reason"]
        assert "Input/output error" in rows["mem.mp4"]["reason"]
        assert stats["status_counts"] == {"broken_link": 1, "link_loop": 2, "not_a_file": 3, "ok": 3, "unreadable": 1}
        assert stats["last_run"]["skipped_videos"] == 0 and stats["last_run"]["processed_videos"] == 3
        assert_one_copy_of_each_clip(out, stats)

        # A re-run tries the bad entries again (a link may be fixed meanwhile) and does no other work.
        again, batches = ingest_folder(source, out, CFG)
        assert batches == [] and again["status_counts"] == stats["status_counts"]
        assert again["shard_set_digest"] == stats["shard_set_digest"]
    finally:
        listener.close()


@pytest.mark.timeout(180)
def test_files_that_vanish_or_become_a_pipe_after_the_scan(corpus, tmp_path):
    """Between the plan and the batch one file is removed and one replaced by a pipe: both get a status, the third
    is ingested; once they are back, the next run ingests them."""
    source = good_source(corpus, tmp_path / "src", 3)
    names = sorted(p.name for p in source.iterdir())
    out = tmp_path / "out"
    with IngestRun(source, out, "generic", CFG) as run:
        plan = run.plan()
        (source / names[0]).unlink()
        (source / names[1]).unlink()
        os.mkfifo(source / names[1])
        for batch in plan.batches:
            shards.run_batch(batch, out, CFG)
        stats = run.finalize(plan)
    rows = manifest(out)
    assert [rows[name]["status"] for name in names] == ["vanished", "not_a_file", "ok"]
    assert "removed" in rows[names[0]]["reason"] and "named pipe" in rows[names[1]]["reason"]

    (source / names[1]).unlink()
    for name in names[:2]:
        shutil.copy(corpus / name, source / name)
    again, batches = ingest_folder(source, out, CFG)
    assert len(batches) == 2 and again["status_counts"] == {"ok": 3}
    assert_one_copy_of_each_clip(out, again)
    assert again["clips"] == stats["clips"] + 2


@pytest.mark.timeout(60)
def test_a_labels_file_that_is_a_pipe_or_a_folder_is_refused_at_once(corpus, tmp_path):
    fifo = tmp_path / "labels.csv"
    os.mkfifo(fifo)
    with pytest.raises(CorpusError, match=r"labels CSV .*labels.csv: a named pipe \(FIFO\), not a regular file"):
        scan_corpus(corpus, "generic", fifo)
    with pytest.raises(CorpusError, match=r"labels CSV .*: a folder, not a regular file"):
        scan_corpus(corpus, "generic", tmp_path)


def padded(video: Path, size: int) -> bytes:
    """The video with zero bytes after its last box: decoders ignore them, so files of one size can differ."""
    data = video.read_bytes()
    return data + bytes(size - len(data))


@pytest.mark.timeout(240)
def test_a_change_that_keeps_size_and_mtime_is_hashed_again(corpus, tmp_path):
    """What `cp -p` or rsync leave: other content, the same size, the old mtime. The manifest and the stored clips
    follow the new content, the old version's clips are gone, the unchanged file is not processed again."""
    first, second, other = sorted(corpus.glob("*.mp4"))
    size = max(p.stat().st_size for p in (first, second)) + 4096
    source = tmp_path / "src"
    source.mkdir()
    changing = source / "changing.mp4"
    changing.write_bytes(padded(first, size))
    shutil.copy(other, source / other.name)
    out = tmp_path / "out"
    before, _ = ingest_folder(source, out, CFG)
    earlier = manifest(out)
    old = earlier["changing.mp4"]

    stamp = changing.stat()
    changing.write_bytes(padded(second, size))
    os.utime(changing, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert (changing.stat().st_size, changing.stat().st_mtime_ns) == (stamp.st_size, stamp.st_mtime_ns)

    after, batches = ingest_folder(source, out, CFG)
    assert [v["path"] for b in batches for v in b.videos] == ["changing.mp4"]
    rows = manifest(out)
    assert rows["changing.mp4"]["sha256"] == hashlib.sha256(changing.read_bytes()).hexdigest() != old["sha256"]
    assert rows[other.name]["sha256"] == earlier[other.name]["sha256"]
    assert after["status_counts"] == {"ok": 2} and after["clips"] == before["clips"]
    videos = {json.loads(s["json"])["video_id"] for s in samples(out)}
    assert rows["changing.mp4"]["video_id"] in videos and old["video_id"] not in videos
    assert_one_copy_of_each_clip(out, after)


@pytest.mark.timeout(120)
def test_rehash_does_not_trust_the_recorded_hashes(corpus, tmp_path):
    """A commit marker that records another hash for an unchanged file (written into it here): the fast path
    trusts the record; rehash reads the file, finds other content than recorded, and does its batch again."""
    source = good_source(corpus, tmp_path / "src", 1)
    out = tmp_path / "out"
    ingest_folder(source, out, CFG)
    marker_path = next((out / "batches").glob("*.json"))
    marker = json.loads(marker_path.read_text())
    marker["videos"][0].update(sha256="0" * 64, video_id="0" * 16)
    write_json_atomic(marker_path, marker)
    with IngestRun(source, out, "generic", CFG) as run:
        trusted = run.plan()
    assert trusted.pending_videos == 0 and trusted.records[0]["sha256"] == "0" * 64
    with IngestRun(source, out, "generic", IngestConfig(videos_per_batch=1, rehash=True)) as run:
        hashed = run.plan()
    assert hashed.pending_videos == 1 and hashed.retired == [marker["batch_id"]]
    assert hashed.records[0]["sha256"] == hashlib.sha256((source / "demo_00.mp4").read_bytes()).hexdigest()


def test_rehash_is_an_ingest_option_outside_the_processing_digest():
    from flows.cli import SETTING, parse

    assert vars(parse(["ingest", "src", "--out", "o", "--rehash"]))[SETTING + "rehash"] is True
    assert vars(parse(["ingest", "src", "--out", "o"]))[SETTING + "rehash"] is None  # the file's value stands
    assert IngestConfig(rehash=True).processing_digest() == IngestConfig().processing_digest()


@contextmanager
def tmpfs(folder: Path, size: str):
    """A real, small file system (the tests run as root)."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def temporaries(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp-" in p.name or p.parent.name == ".tmp")


@pytest.mark.timeout(300)
def test_a_full_disk_stops_with_one_line_and_the_next_run_resumes(corpus, tmp_path):
    source = good_source(corpus, tmp_path / "src", 1)
    with tmpfs(tmp_path / "small", "256k") as out:
        first, _ = ingest_folder(source, out, CFG)
        for path in sorted(corpus.glob("*.mp4"))[1:]:
            shutil.copy(path, source / path.name)
        with pytest.raises(StorageError) as full:
            ingest_folder(source, out, CFG)
        message = str(full.value)
        assert "\n" not in message and "No space left on device (ENOSPC)" in message
        assert f"in {out}" in message and ("the shards of batch" in message or "the commit" in message)
        # What the first run committed is intact and readable, and the failed batch left nothing behind.
        assert list(manifest(out)) == [p.name for p in sorted(corpus.glob("*.mp4"))[:1]]
        assert temporaries(out) == []

        # A temporary file of a killed write is removed by the next run, which, with room, finishes the rest.
        subprocess.run(["mount", "-o", "remount,size=4m", str(out)], check=True)
        (out / ".manifest.parquet.tmp-12345").write_bytes(b"partial")
        done, _ = ingest_folder(source, out, CFG)
        assert temporaries(out) == [] and ".manifest.parquet.tmp-12345" in done["last_run"]["recovered"]
        assert done["status_counts"] == {"ok": 3} and done["clips"] == first["clips"] + 2
        assert_one_copy_of_each_clip(out, done)


@pytest.mark.timeout(300)
def test_the_command_on_a_full_disk_prints_one_line_and_exits_1(corpus, tmp_path):
    source = good_source(corpus, tmp_path / "src", 1)
    work = tmp_path / "work"
    with tmpfs(tmp_path / "small", "64k") as out:
        done = subprocess.run(vaemo_command("--work-dir", str(work), "ingest", str(source), "--dataset", "generic",
                                            "--out", str(out), "--workers", "1"),
                              capture_output=True, text=True, timeout=240, env=cli_env(work))
        assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
        assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("vaemo: error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0] and str(out) in errors[0], done.stderr
        assert temporaries(out) == []


def test_only_the_storage_s_write_errors_become_one_line():
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
        expected = rf"cannot (read or )?write the stats in /data: .*\({errno.errorcode[code]}\)"
        with pytest.raises(StorageError, match=expected):
            with writing("the stats", "/data"):
                raise OSError(code, os.strerror(code))
    with pytest.raises(FileNotFoundError):  # not the storage's refusal: a bug keeps its traceback
        with writing("the stats", "/data"):
            raise FileNotFoundError(errno.ENOENT, "gone")


def test_videos_a_dataset_leaves_out_get_rows_and_counts(tmp_path):
    """A video-only copy, a sung take and a name off the rule each get a row with their status and reason, every
    run (they are not retried and never planned), and the stats count them; the usable video is planned."""
    source = tmp_path / "ravdess"
    names = {"Actor_05/01-01-03-02-01-02-05.mp4": "pending", "Actor_05/02-01-03-02-01-02-05.mp4": "not_used",
             "Actor_05/01-02-03-02-01-02-05.mp4": "not_used", "Actor_05/interview.mp4": "off_rule"}
    for index, name in enumerate(names):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(b"video %d" % index)
    for _ in range(2):
        with IngestRun(source, tmp_path / "out", "ravdess", CFG) as run:
            plan = run.plan()
            stats = run.finalize(plan)
        assert (plan.left_out, plan.refused, plan.pending_videos) == (3, 0, 1)
        rows = manifest(tmp_path / "out")
        assert {path: row["status"] for path, row in rows.items()} == names
        assert stats["status_counts"] == {"not_used": 2, "off_rule": 1, "pending": 1}
    assert rows["Actor_05/02-01-03-02-01-02-05.mp4"]["reason"] == (
        "a video-only copy (modality 02); only audio-visual speech (names 01-01-*) is ingested")
    assert rows["Actor_05/interview.mp4"]["reason"].startswith("the name does not follow the rule: RAVDESS names")


@pytest.mark.timeout(60)
def test_a_read_only_output_folder_is_refused_with_one_line(corpus, tmp_path):
    with tmpfs(tmp_path / "ro", "64k,ro") as out:
        with pytest.raises(StorageError, match=r"the ingest folder .*Read-only file system \(EROFS\)"):
            IngestRun(corpus, out / "out", "generic", CFG).__enter__()


def test_every_status_ingest_records_is_in_the_readme_table():
    code = "".join(path.read_text() for path in (ROOT / "vaemo" / "ingest").rglob("*.py"))
    recorded = set(re.findall(r'(?:VideoOutcome|MediaError|NoFace|outcome)\(\s*"(\w+)"', code))
    recorded |= set(re.findall(r'(?:skipped\[|"status": |status=)"(\w+)"', code))
    assert {"no_frames", "truncated", "not_a_file", "link_loop", "duplicate", "pending", "error", "off_rule",
            "not_in_splits"} <= recorded
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Bad input gets a status"):readme.index("### Incremental and crash-safe")]
    listed = {name for line in section.splitlines() if line.startswith("| `") for name in
              re.findall(r"`(\w+)`", line.split("|")[1])}
    assert recorded <= listed, recorded - listed
