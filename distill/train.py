"""The training loop: AdamW, ReduceLROnPlateau or cosine, bf16 autocast, gradient accumulation, DDP, and
atomic checkpoints from which `--resume` continues exactly.

Every random choice (the epoch's sample order, flips, boxes) is a function of (seed, epoch, step, rank), so a
resumed run draws what the uninterrupted run would have drawn; the checkpoint holds the rest of the state
(weights, optimizer, scheduler, the running epoch loss).
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from distill.cache import EmbeddingCache
from distill.losses import embedding_loss, mask_distillation_loss, segmentation_loss
from zoo.cli import option, positive_int
from zoo.data.io import atomic_path, data_split, read_csv, write_csv_atomic
from zoo.data.samples import (
    Sample,
    balanced_weights,
    find_samples,
    flip,
    flip_box,
    parse_fractions,
    sample_object,
    sample_tensor,
)
from zoo.modalities import prompt_modality
from zoo.models.weights import CheckpointError, read_weights
from zoo.runtime.cpu import BF16_FLAGS, cpu_flags
from zoo.runtime.embedding_cache import DEFAULT_CACHE_DIR

TRAIN_FORMAT = "cp-tinyvit-train/1"
LOG_FIELDS = ["step", "epoch", "loss", "lr", "images_per_s"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class TrainSettings:
    """How a model is trained; distill.run's options (distill.finetune and compress.prune subclass it with their own
    defaults). Every field with a default is a command-line option of those commands (zoo.cli.add_settings_options)."""

    out_dir: Path
    epochs: int = option(10, "passes over the training samples")
    max_steps: int | None = option(None, "stop early after this many optimizer steps")
    batch_size: int = option(8, "samples per micro-batch")
    lr: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    scheduler: str = option("plateau", "learning-rate schedule: 'plateau' (the paper) or 'cosine'",
                            choices=("plateau", "cosine"))
    accumulate: int = option(1, "micro-batches per optimizer step")
    amp: str = option("auto", "'auto' (bf16 where the device computes it fast: CUDA, or a CPU with AVX512_BF16 or "
                              "AMX), 'bf16' or 'none'",
                      choices=("auto", "bf16", "none"))
    device: str = option(default_factory=default_device, help="torch device")
    seed: int = option(0, "seed of every random choice (sample order, flips, boxes)")
    checkpoint_every: int = option(100, "optimizer steps between atomic checkpoints")
    flip: bool = option(True, "no random flips", flag="--no-flip")
    balanced: bool = option(True, "sample uniformly instead of modality-balanced", flag="--no-balance")
    mask_loss_weight: float = option(0.0, "mask-level distillation through the frozen decoder")
    # The teacher's masks carry its errors; the ground truth of the same object, through the same frozen decoder,
    # pulls the student towards what the teacher misses.
    gt_loss_weight: float = option(0.0, "Dice + focal of the student's mask (same box, frozen decoder) against the "
                                        "ground truth")
    # 3D inference prompts every slice but the middle one with the box of its neighbour's predicted mask (plus
    # 3 px), never the tight box: a student that matches its teacher only on tight boxes drifts over a volume.
    mask_box_jitter: int = option(0, "mask and ground-truth losses: each side of the box moves by a random -this..+this pixels")
    train_parts: str = option("", "encoder parts that train, comma-separated module names under image_encoder "
                                  "('fusion': a high-resolution path added to a trained student); default: all")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["out_dir"] = str(self.out_dir)
        return values


def fast_bf16(device_type: str) -> bool:
    """Whether bf16 autocast speeds training up on this device: CUDA with bf16, or a CPU with AVX512_BF16 or AMX
    (1.45x faster per step there; on an AVX2-only CPU it is emulated and about 10x slower)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and any(flag in cpu_flags() for flag in BF16_FLAGS)


@dataclass
class DataSettings:
    """The data options of the training commands (distill.run, distill.finetune, compress.prune), declared once."""

    data: list[Path] = option(default_factory=lambda: [data_split("train")], help="challenge npz directories to train on")
    cache_dir: Path = option(default_factory=lambda: DEFAULT_CACHE_DIR, help="where teacher and encoder embeddings are "
                                                                             "kept (content-keyed, reused across runs)")
    slice_step: int = option(5, "take every n-th slice of 3D volumes", type=positive_int)
    fractions: str | None = option(None, "per-modality fraction of the samples kept, e.g. CT=0.02,default=0.1 (the paper)")
    max_samples: int | None = option(None, "at most this many samples, taken in turn from each modality (a quick try)",
                                     type=positive_int)
    resume: bool = option(False, "continue from the output folder's last training checkpoint")
    threads: int | None = option(None, "torch CPU threads (default: torch's)", type=positive_int)

    def samples(self, seed: int, foreground_only: bool = False, skipped: list[str] | None = None,
                folders: list[Path] | None = None) -> list[Sample]:
        """The training samples (zoo.data.samples.find_samples) of `folders` (default: data) by these options."""
        return find_samples(folders or self.data, self.slice_step, parse_fractions(self.fractions), seed,
                            foreground_only=foreground_only, skipped=skipped, max_samples=self.max_samples)


def start_run(args) -> None:
    """What every training command does first: its CPU threads (--threads) and its seed."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def epoch_batches(samples: list[Sample], settings: TrainSettings, epoch: int) -> list[list[int]]:
    """This rank's micro-batches of an epoch: a seeded order (modality-balanced draws or a permutation), split
    across ranks by a DistributedSampler, in full batches."""
    rank, size = world()
    g = _generator(settings.seed, epoch)
    if settings.balanced:
        order = torch.multinomial(balanced_weights(samples), len(samples), replacement=True, generator=g).tolist()
    else:
        order = torch.randperm(len(samples), generator=g).tolist()
    shard = DistributedSampler(order, num_replicas=size, rank=rank, shuffle=False, drop_last=True)
    mine = [order[i] for i in shard]
    usable = len(mine) - len(mine) % settings.batch_size
    return [mine[i : i + settings.batch_size] for i in range(0, usable, settings.batch_size)]


def _save_atomic(payload: dict, out_dir: Path) -> None:
    """Write last.pt through a temporary file; the former last.pt becomes previous.pt."""
    last = out_dir / "last.pt"
    with atomic_path(last) as tmp:
        torch.save(payload, tmp)
        if last.exists():
            os.replace(last, out_dir / "previous.pt")


def load_training_state(out_dir: Path) -> dict:
    """The newest readable training checkpoint; a corrupt last.pt falls back to previous.pt with a warning."""
    for name in ("last.pt", "previous.pt"):
        path = out_dir / name
        if not path.exists():
            continue
        try:
            state = read_weights(path)
            if state.get("format") != TRAIN_FORMAT:
                raise CheckpointError(f"{path}: not a training checkpoint")
            return state
        except CheckpointError as err:
            warnings.warn(f"{err}; trying the previous checkpoint")
    raise CheckpointError(f"{out_dir}: no usable training checkpoint (last.pt / previous.pt) to resume from")


class Trainer:
    """The training loop with distillation as its task: `student.image_encoder` learns the cached teacher
    embeddings (and, optionally, the frozen decoder's masks of them and the ground truth); the decoder and prompt
    encoder are frozen.

    Other stages subclass it and override `is_trainable`, `param_groups`, `_micro_batch_loss` and the
    `end_of_epoch` / `extra_state` hooks (see distill.finetune)."""

    stage = "distill"

    def __init__(self, student, samples: list[Sample], keys: list[str], cache: EmbeddingCache, settings: TrainSettings):
        self.student = student.to(settings.device)
        self.samples, self.keys, self.cache, self.settings = samples, keys, cache, settings
        for name, p in self.student.named_parameters():
            p.requires_grad_(self.is_trainable(name))
        if not any(p.requires_grad for p in self.student.parameters()):
            raise ValueError(f"nothing to train: the model has no part named {settings.train_parts!r} in its encoder")
        self.encoder = self.student.image_encoder
        self.rank, self.world_size = world()
        if self.world_size > 1:
            self.wrap_distributed()
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.steps_per_epoch = len(epoch_batches(samples, settings, 0)) // settings.accumulate
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(samples)} samples give no full step of {settings.batch_size}×{settings.accumulate}"
                             f" images per rank; lower --batch-size or --accumulate")
        self.total_steps = settings.epochs * self.steps_per_epoch
        if settings.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.max_steps)
        if settings.scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, self.total_steps))
        elif settings.scheduler == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=0.5, patience=2)
        else:
            raise ValueError(f"unknown scheduler {settings.scheduler!r}; expected plateau or cosine")
        device_type = torch.device(settings.device).type
        use_bf16 = settings.amp == "bf16" or (settings.amp == "auto" and fast_bf16(device_type))
        self.autocast = dict(device_type=device_type, dtype=torch.bfloat16, enabled=use_bf16)
        self.step = 0
        self.epoch_loss = [0.0, 0]  # sum, count over the current epoch (for the plateau scheduler)

    def is_trainable(self, name: str) -> bool:
        parts = tuple(f"image_encoder.{part.strip()}." for part in self.settings.train_parts.split(",") if part.strip())
        return name.startswith(parts or ("image_encoder.",))

    def train_mode(self) -> None:
        """Training mode for the modules that train; the frozen ones stay in eval mode, so their batch norms
        neither use batch statistics nor move their running ones."""
        self.student.train()
        for module in self.student.modules():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.student.parameters() if p.requires_grad]}]

    def wrap_distributed(self) -> None:
        device_ids = [torch.device(self.settings.device).index] if self.settings.device.startswith("cuda") else None
        self.encoder = torch.nn.parallel.DistributedDataParallel(self.encoder, device_ids=device_ids)

    def end_of_epoch(self, epoch: int) -> None:
        """Called after the last step of each epoch (before the checkpoint of that step is written)."""

    def extra_state(self) -> dict:
        return {}

    def restore_extra(self, state: dict) -> None:
        pass

    # -- state -------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"format": TRAIN_FORMAT, "step": self.step, "model": self.student.state_dict(),
                "model_config": self.student.config.to_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch_loss": list(self.epoch_loss),
                "settings": self.settings.to_dict(), "extra": self.extra_state()}

    def resume(self) -> None:
        """--resume: continue from out_dir's newest usable checkpoint. A run killed before it wrote its first
        checkpoint has nothing to continue; it starts at step 0, and says so."""
        out_dir = self.settings.out_dir
        if not any((out_dir / name).exists() for name in ("last.pt", "previous.pt")):
            print(f"{out_dir}: no training checkpoint yet; starting at step 0", file=sys.stderr)
            return
        self.restore(load_training_state(out_dir))

    def restore(self, state: dict) -> None:
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch_loss = list(state["epoch_loss"])
        self.step = int(state["step"])
        self.restore_extra(state.get("extra", {}))

    # -- one step ----------------------------------------------------------------------------------------------
    def _micro_batch_loss(self, indices: list[int], g: torch.Generator) -> torch.Tensor:
        images, targets, boxes, masks = [], [], [], []
        uses_masks = bool(self.settings.mask_loss_weight or self.settings.gt_loss_weight)
        for i in indices:
            h, v = (torch.rand(2, generator=g) < 0.5).tolist() if self.settings.flip else (False, False)
            target = self.cache.get(self.keys[i])
            if target is None:
                raise RuntimeError(f"teacher embedding of {self.samples[i].path} slice {self.samples[i].z} is not cached")
            images.append(flip(sample_tensor(self.samples[i]), h, v))
            targets.append(flip(target.float(), h, v))
            if uses_masks:
                found = sample_object(self.samples[i], g, self.settings.mask_box_jitter)
                boxes.append(None if found is None else flip_box(found[0], h, v))
                masks.append(None if found is None else flip(found[1], h, v))
        device = self.settings.device
        images, targets = torch.stack(images).to(device), torch.stack(targets).to(device)
        with torch.autocast(**self.autocast):
            embeddings = self.encoder(images)
        loss = embedding_loss(embeddings, targets)
        with_box = [j for j, box in enumerate(boxes) if box is not None]
        if with_box:
            box_t = torch.stack([boxes[j] for j in with_box]).to(device)
            # A class-prompt decoder gets the sample's modality, as at inference (not the head's guess on a student
            # embedding that is still learning).
            ids = [prompt_modality(self.student, self.samples[indices[j]].modality) for j in with_box]
            student_logits = torch.cat([self.student.decode(embeddings[j : j + 1].float(), box_t[k : k + 1], ids[k]) for k, j in enumerate(with_box)])
            if self.settings.mask_loss_weight:
                with torch.no_grad():
                    teacher_logits = torch.cat([self.student.decode(targets[j : j + 1], box_t[k : k + 1], ids[k]) for k, j in enumerate(with_box)])
                loss = loss + self.settings.mask_loss_weight * mask_distillation_loss(student_logits, teacher_logits)
            if self.settings.gt_loss_weight:
                truth = torch.stack([masks[j] for j in with_box]).to(device)
                loss = loss + self.settings.gt_loss_weight * segmentation_loss(student_logits, truth)
        return loss

    def _mean_across_ranks(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.settings.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    # -- loop --------------------------------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict:
        out_dir = self.settings.out_dir
        log_path = out_dir / "log.csv"
        if self.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._trim_log(log_path)
        self.train_mode()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.stage, unit="step", disable=not progress or self.rank != 0)
        last_loss = math.nan
        while self.step < self.total_steps:
            epoch, position = divmod(self.step, self.steps_per_epoch)
            batches = epoch_batches(self.samples, self.settings, epoch)
            for s in range(position, self.steps_per_epoch):
                if self.step >= self.total_steps:
                    break
                start = time.perf_counter()
                self.optimizer.zero_grad(set_to_none=True)
                loss_value = 0.0
                for micro in range(self.settings.accumulate):
                    g = _generator(self.settings.seed, epoch, self.step, micro, self.rank, 7)
                    loss = self._micro_batch_loss(batches[s * self.settings.accumulate + micro], g) / self.settings.accumulate
                    loss.backward()
                    loss_value += loss.item()
                self.optimizer.step()
                if isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                    self.scheduler.step()
                self.step += 1
                last_loss = self._mean_across_ranks(loss_value)
                self.epoch_loss[0] += last_loss
                self.epoch_loss[1] += 1
                if s == self.steps_per_epoch - 1 and isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.scheduler.step(self.epoch_loss[0] / self.epoch_loss[1])
                    self.epoch_loss = [0.0, 0]
                if s == self.steps_per_epoch - 1:
                    self.end_of_epoch(epoch)
                rate = self.settings.batch_size * self.settings.accumulate * self.world_size / (time.perf_counter() - start)
                if self.rank == 0:
                    self._log(log_path, {"step": self.step, "epoch": epoch, "loss": f"{last_loss:.6g}",
                                         "lr": f"{self.optimizer.param_groups[0]['lr']:.3g}", "images_per_s": f"{rate:.2f}"})
                    if self.step % self.settings.checkpoint_every == 0 or self.step == self.total_steps:
                        _save_atomic(self.state(), out_dir)
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4g}")
        bar.close()
        return {"steps": self.step, "final_loss": last_loss}

    def _trim_log(self, path: Path) -> None:
        """Keep the log rows up to the resumed step, so a resumed run's log reads as one run."""
        rows = read_csv(path) if path.exists() else []
        rows = [r for r in rows if int(r["step"]) <= self.step]
        write_csv_atomic(path, rows, LOG_FIELDS)

    @staticmethod
    def _log(path: Path, row: dict) -> None:
        with open(path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=LOG_FIELDS).writerow(row)
