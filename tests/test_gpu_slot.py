"""The `gpu` slot (flows/common.py) against a Prefect server: it counts the node's GPUs, holds a lease through
Prefect's public concurrency API, and frees the slots of a holder that died without releasing them."""

import os
import time
from pathlib import Path

from prefect.client.orchestration import get_client

from flows import common
from tests.conftest import own_prefect_server


def active_slots() -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(common.GPU_SLOT).active_slots


def test_gpu_slot_counts_gpus_and_frees_a_dead_holders_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "visible_gpus", lambda: ["0", "1"])
    with own_prefect_server(tmp_path, monkeypatch) as (server, env):
        monkeypatch.setenv("PREFECT_API_URL", env["PREFECT_API_URL"])
        with common.gpu_slot(5):  # more than the node has: it holds them all
            with get_client(sync_client=True) as client:
                limit = client.read_global_concurrency_limit_by_name(common.GPU_SLOT)
            assert (limit.limit, limit.active_slots) == (2, 2)
            notes = list(Path(env["PREFECT_HOME"], "gpu-leases").iterdir())
            assert len(notes) == 1
        assert active_slots() == 0 and not notes[0].exists()

        # A holder renews its lease, and touches its note, a few times per lease period.
        monkeypatch.setattr(common, "GPU_LEASE_RENEW_SECONDS", 1)
        with common.gpu_slot(1):
            note = next(Path(env["PREFECT_HOME"], "gpu-leases").iterdir())
            made = note.stat().st_mtime
            time.sleep(3)
            assert note.stat().st_mtime > made and active_slots() == 1  # renewed, still held

        # A holder killed while it held both slots: its lease is never renewed nor released.
        with get_client(sync_client=True) as client:
            lease = client.increment_concurrency_slots_with_lease([common.GPU_SLOT], 2, "concurrency",
                                                                  lease_duration=600).json()["lease_id"]
        note = Path(env["PREFECT_HOME"], "gpu-leases", lease)
        note.write_text("2\n")
        stale = time.time() - 2 * common.GPU_LEASE_SECONDS
        os.utime(note, (stale, stale))
        started = time.monotonic()
        with common.gpu_slot(1):
            assert active_slots() == 1
        assert time.monotonic() - started < 30, "the dead holder's slots were not freed at once"
        assert not note.exists() and active_slots() == 0
