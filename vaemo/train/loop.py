"""One training loop for Stage 1 and Stage 2: they differ only by the objective they plug in.

AdamW with warm-up + cosine, gradient clipping and accumulation, bf16 autocast on GPU, DDP when
launched by torchrun, and checkpoints that resume to the same loss curve: a checkpoint holds the
model, optimizer, scheduler, step, RNG states and the data position (epoch and batches consumed;
on resume the epoch's stream, seeded by (seed, epoch), is replayed up to that batch; the training
view's loader makes the replayed batches without decoding them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vaemo.artifacts import ModelFolder
from vaemo.config import TrainConfig
from vaemo.data.loader import ShardLosses
from vaemo.errors import ArtifactError

# batches(epoch, skip) -> the epoch's batches, of which the caller discards the first ``skip`` unread (a loader
# may make those without decoding); objective(model, batch) -> {"loss": ..., other scalars}
Batches = Callable[[int, int], Iterable[dict]]
Objective = Callable[[nn.Module, dict], dict[str, torch.Tensor]]
StepLogger = Callable[[int, dict[str, float]], None]
# prepare(raw batch, device) -> the model's batch: a loader that leaves batches raw (bytes) for the device to decode
Prepare = Callable[[dict, torch.device], dict]


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Join the process group that torchrun describes in the environment; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(int(os.environ.get("RANK", "0")), world, local_rank, device)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def optimizer_for(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases, norms, tokens and embeddings of positions/modalities get no weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "pos" in name or "token" in name or "modality" in name else decay).append(
                param
            )
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def autocast(precision: str, device: torch.device):
    """bf16 autocast for ``precision`` bf16, or auto on a GPU; otherwise full precision."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the data stream's epoch and batch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of this epoch already consumed


def _save_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, position: Position, keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "position": [position.step, position.epoch, position.batch],
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_python": list(random.getstate()[1]),
    }
    path = folder / f"step-{position.step:08d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = ModelFolder(out_dir).checkpoints()
    return found[-1] if found else None


def _load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, device: torch.device) -> Position:
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"].cpu())
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
    random.setstate((3, tuple(state["rng_python"]), None))
    return Position(*state["position"])


class _Stream:
    """Endless batches across epochs, remembering the position; skipped-sample counts are summed.

    An epoch that ends without a batch of clips is an error, not a reason to start another: the
    next one would read the same data (and DataLoader workers restart for each).
    """

    def __init__(self, batches: Batches, position: Position):
        self.batches, self.position, self.skipped = batches, position, 0
        self._iter = self._epoch_iter(fast_forward=position.batch)
        self._usable = position.batch > 0  # the batches replayed on resume were usable when first met

    def _epoch_iter(self, fast_forward: int = 0) -> Iterator[dict]:
        iterator = iter(self.batches(self.position.epoch, fast_forward))
        for _ in range(fast_forward):  # replay to the checkpointed batch; its skips were counted before
            next(iterator)
        return iterator

    def next(self) -> dict:
        while True:
            try:
                batch = next(self._iter)
            except StopIteration:
                if not self._usable:
                    raise ArtifactError(
                        f"epoch {self.position.epoch} of the training data gave no batch of clips "
                        f"({self.skipped} sample(s) skipped so far): no clip of the shards could be decoded"
                    ) from None
                self.position.epoch += 1
                self.position.batch = 0
                self._usable = False
                self._iter = self._epoch_iter()
                continue
            self.position.batch += 1
            self.skipped += int(batch.get("skipped", 0))
            if len(batch.get("clip_id", [None])):
                self._usable = True
                return batch


@dataclass
class TrainResult:
    losses: list[float]
    skipped: int
    seconds: float
    samples: int
    resumed_from: int | None


def train(
    model: nn.Module,
    objective: Objective,
    batches: Batches,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    log_step: StepLogger | None = None,
    seen_clips: list[str] | None = None,
    prepare: Prepare | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps; rank 0 writes checkpoints and the step log.

    ``seen_clips`` collects the clip ids this process trained on (for checks of data sharding).
    ``prepare`` turns the raw batches (those with a "jpeg" key) into the model's batches on the
    training device; the samples counted are the rows it gives (repeated augmentations included).
    """
    env = init_distributed()
    if env.device.type == "cpu":
        # Oversubscribed cores make a CPU step several times slower, not a little.
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // env.world - cfg.num_workers))
    torch.manual_seed(cfg.seed + env.rank)
    random.seed(cfg.seed + env.rank)
    model = model.to(env.device)
    optimizer = optimizer_for(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    position, resumed_from = Position(), None
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        position = _load_checkpoint(checkpoint, model, optimizer, scheduler, env.device)
        resumed_from = position.step
    wrapped = DistributedDataParallel(model) if env.world > 1 else model
    log_path = out_dir / ModelFolder.STEP_LOG
    if env.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, position.step)

    stream = _Stream(batches, position)
    losses, samples, begin = [], 0, time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=position.step, desc="train", unit="step", disable=not env.main)
    while position.step < cfg.steps:
        step_begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        parts: dict[str, float] = {}
        for micro in range(cfg.accumulation):
            batch = stream.next()
            if batch.get("jpeg") is not None:
                if prepare is None:
                    raise TypeError("a raw batch (encoded frames) reached the training loop without a prepare function")
                batch = prepare(batch, env.device)
            if seen_clips is not None:
                seen_clips.extend(batch["clip_id"])
            sync = env.world == 1 or micro == cfg.accumulation - 1
            with (nullcontext() if sync else wrapped.no_sync()), autocast(cfg.precision, env.device):
                out = objective(wrapped, {k: v.to(env.device) if torch.is_tensor(v) else v for k, v in batch.items()})
            (out["loss"] / cfg.accumulation).backward()
            samples += len(batch["clip_id"]) * env.world
            for key, value in out.items():
                if torch.is_tensor(value) and value.ndim == 0:
                    parts[key] = parts.get(key, 0.0) + float(value.detach()) / cfg.accumulation
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        optimizer.step()
        scheduler.step()
        position.step += 1
        losses.append(parts["loss"])
        record = {
            **parts,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "samples_per_second": len(batch["clip_id"])
            * cfg.accumulation
            * env.world
            / (time.perf_counter() - step_begin),
        }
        if env.main:
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}", refresh=False)
            if position.step % cfg.log_every == 0 or position.step == cfg.steps:
                with open(log_path, "a") as handle:
                    handle.write(json.dumps({"step": position.step, **record}) + "\n")
                if log_step:
                    log_step(position.step, record)
            if position.step % cfg.checkpoint_every == 0 or position.step == cfg.steps:
                _save_checkpoint(
                    ModelFolder(out_dir).checkpoints_dir, model, optimizer, scheduler, position, cfg.keep_checkpoints
                )
    bar.close()
    skipped = stream.skipped
    if env.world > 1:
        counts = torch.tensor([skipped], device=env.device)
        dist.all_reduce(counts)
        skipped = int(counts.item())
    return TrainResult(losses, skipped, time.perf_counter() - begin, samples, resumed_from)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the step log consistent with the checkpoint a run resumes from."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(row + "\n" for row in rows))


def read_step_log(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / ModelFolder.STEP_LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def last_logged_step(out_dir: Path) -> int:
    """The step of the step log's last whole line (0 before the first), read from the file's end: the log of a
    long run is large, and a line being written is not whole yet."""
    path = Path(out_dir) / ModelFolder.STEP_LOG
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            whole = handle.read().rsplit(b"\n", 1)[0].splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(whole):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # the first line of the tail may be cut
    return 0


def edge_mean(values: list[float], first: bool) -> float:
    """The mean of the first (or last) tenth of a curve, at least one value: a loss "before" and "after"."""
    count = max(1, len(values) // 10)
    part = values[:count] if first else values[-count:]
    return float(sum(part) / len(part))


@contextmanager
def single_process():
    """Rank 0 evaluates every clip alone: hide the launcher's rank variables from the shard splitter."""
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def write_rank_record(out_dir: Path, rank: int, seen: list[str], model: nn.Module) -> None:
    """The clips one rank trained on and its final weights' digest (for checks of data sharding and DDP)."""
    ranks = Path(out_dir) / ModelFolder.RANKS
    ranks.mkdir(parents=True, exist_ok=True)
    (ranks / f"rank-{rank}.json").write_text(json.dumps({"clips_seen": seen, "weights_sha256": weights_digest(model)}))


def run_summary(result, world: int, losses: ShardLosses) -> dict:
    """What every training stage reports about its run, beside its own metrics (``losses``: already gathered)."""
    return {
        "skipped_samples": result.skipped,
        **losses.summary(),
        "train_seconds": round(result.seconds, 2),
        "samples_per_second": round(result.samples / result.seconds, 3) if result.seconds else None,
        "resumed_from_step": result.resumed_from,
        "processes": world,
        "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
    }


def entry_point(
    prog: str, doc: str | None, settings_type: type[TrainConfig], add_inputs: Callable, run: Callable
) -> Callable:
    """The ``main`` of a stage's torchrun entry: its inputs, then --out, --settings (JSON), --resume
    and the MLflow run the ranks log into; ``run(args, settings, log_step)`` trains."""

    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=doc)
        add_inputs(parser)
        parser.add_argument("--out", required=True, type=Path)
        parser.add_argument("--settings", type=Path, help=f"{settings_type.__name__} as JSON (default: the defaults)")
        parser.add_argument("--resume", action="store_true")
        parser.add_argument("--mlflow-uri", help="log step metrics to this MLflow run (rank 0)")
        parser.add_argument("--mlflow-run-id")
        args = parser.parse_args(argv)
        settings = settings_type.model_validate_json(args.settings.read_text()) if args.settings else settings_type()
        if args.mlflow_uri and args.mlflow_run_id:
            from vaemo.tracking import step_logger

            with step_logger(args.mlflow_uri, args.mlflow_run_id) as log_step:
                run(args, settings, log_step)
        else:
            run(args, settings, None)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0

    return main
