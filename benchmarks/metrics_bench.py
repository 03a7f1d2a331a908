"""Per-step MLflow logging cost for the training loop: a write per step against the background sender.

    .venv/bin/python benchmarks/metrics_bench.py [--steps 300] [--gpu-step-ms 58.9] [--out FILE]

Both log the training loop's step record (8 values) into a real MLflow SQLite store, one run each,
in the same process. ``sync``: ``MlflowClient.log_batch`` per step, as training did before; the cost
is the call's wall time. ``async``: :class:`vaemo.tracking.StepMetrics`; the training process pays
the call (queueing) and the CPU time of the queue's pickling thread (process CPU minus the training
thread's; it holds the GIL the loop needs, so it counts in full). The sender process's CPU time
(its start, importing MLflow, included) runs on another core and is reported beside. The
training side's sum is compared with ``--gpu-step-ms``, a ``base`` step at batch 128 on one H100
(README, Benchmarks). Every value sent is read back from the store.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import mlflow

from vaemo.tracking import StepMetrics, write_metrics

RECORD = ("loss", "rec_video", "rec_audio", "contrastive", "temperature", "lr", "grad_norm", "samples_per_second")


def record(step: int) -> dict[str, float]:
    return {name: 1.0 / (step + i + 1) for i, name in enumerate(RECORD)}


def sync_ms(client: mlflow.MlflowClient, run_id: str, steps: int) -> float:
    begin = time.perf_counter()
    for step in range(steps):
        stamp = int(time.time() * 1000)
        write_metrics(client, run_id, [mlflow.entities.Metric(k, v, stamp, step) for k, v in record(step).items()])
    return (time.perf_counter() - begin) * 1000 / steps


def async_ms(uri: str, run_id: str, steps: int) -> dict:
    sender = StepMetrics(uri, run_id)
    cpu, own, call = time.process_time(), time.thread_time(), 0.0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    for step in range(steps):
        begin = time.perf_counter()
        sender(step, record(step))
        call += time.perf_counter() - begin
    drain = time.perf_counter()
    sender.close()
    drain = time.perf_counter() - drain
    feeder_cpu = (time.process_time() - cpu) - (time.thread_time() - own)  # the queue's thread, in this process
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    sender_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    return {"call_ms_per_step": call * 1000 / steps, "queue_thread_cpu_ms_per_step": feeder_cpu * 1000 / steps,
            "sender_process_cpu_s_total": sender_cpu, "close_after_last_step_ms": drain * 1000, "lost": sender.lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--gpu-step-ms", type=float, default=58.9, help="base, batch 128, one H100 (README)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = mlflow.MlflowClient(uri)
        experiment = client.create_experiment("metrics-bench", artifact_location=f"{tmp}/artifacts")
        runs = {mode: client.create_run(experiment).info.run_id for mode in ("sync", "async")}
        sync = sync_ms(client, runs["sync"], args.steps)
        result = async_ms(uri, runs["async"], args.steps)
        for mode, run_id in runs.items():
            arrived = {name: len(client.get_metric_history(run_id, name)) for name in RECORD}
            if set(arrived.values()) != {args.steps}:
                raise SystemExit(f"{mode}: not every step arrived: {arrived}")
    per_step = result["call_ms_per_step"] + result["queue_thread_cpu_ms_per_step"]
    out = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "steps": args.steps,
        "values_per_step": len(RECORD),
        "sync_ms_per_step": round(sync, 3),
        **{k: round(v, 4) for k, v in result.items()},
        "async_ms_per_step": round(per_step, 4),
        "gpu_step_ms": args.gpu_step_ms,
        "sync_fraction_of_gpu_step": round(sync / args.gpu_step_ms, 4),
        "async_fraction_of_gpu_step": round(per_step / args.gpu_step_ms, 5),
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
