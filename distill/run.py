"""Distill a teacher's image embeddings into a TinyViT student.

    python -m distill.run --teacher medsam --teacher-checkpoint medsam_vit_b.pth --student fast --out runs/distill/fast
    torchrun --nproc_per_node=N -m distill.run ...        (DistributedDataParallel: gloo on CPU, nccl on CUDA)

Teacher embeddings are cached once (float16, content-keyed, in --cache-dir); later epochs and runs only run the
student. --resume continues from OUT/last.pt exactly. The result, OUT/student.pt, is a zoo checkpoint
(student encoder + LiteMedSAM's prompt encoder and mask decoder) usable by zoo.predict and benchmarks.run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from distill.cache import EmbeddingCache
from distill.data import find_samples, parse_fractions
from distill.train import Trainer, TrainSettings, world
from zoo.checkpoint import init_from_litemedsam, save_checkpoint, sha256_file
from zoo.class_prompt import ClassPromptSAM, ModelConfig
from zoo.cli import RUNS_DIR, add_settings_options, run_cli, settings_from_args
from zoo.embedding_cache import DEFAULT_CACHE_DIR, encoder_cache_id
from zoo.encoders import ENCODER_CONFIGS, TinyViTEncoder
from zoo.io import SHARED_DATA
from zoo.teachers import CHECKPOINT_ENV, TEACHERS, build_teacher

DEFAULT_TRAIN = SHARED_DATA / "train"


def teacher_id(kind: str, checkpoint: str | None, teacher) -> str:
    """Names the cache folder: the teacher kind and its weights' hash, so different weights never share entries.
    LiteMedSAM's is its encoder's, shared with fine-tuning and pruning (zoo.embedding_cache.encoder_cache_id)."""
    if kind == "litemedsam":
        return encoder_cache_id(teacher)
    return f"{kind}-{sha256_file(checkpoint)[:16]}"


def build_student(name: str, init: str) -> ClassPromptSAM:
    """A student encoder by config name with LiteMedSAM's prompt encoder and mask decoder; its encoder from
    LiteMedSAM's weights where shapes match (--init litemedsam) or random (--init none)."""
    if name not in ENCODER_CONFIGS:
        raise ValueError(f"unknown student {name!r}; expected one of {', '.join(ENCODER_CONFIGS)}")
    student = ClassPromptSAM(ModelConfig(encoder=ENCODER_CONFIGS[name]))
    init_from_litemedsam(student)
    if init == "none":
        student.image_encoder = TinyViTEncoder(student.config.encoder)
    return student


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m distill.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", choices=TEACHERS, default="medsam")
    p.add_argument("--teacher-checkpoint", default=None, help=f"MedSAM/SAM checkpoint (default ${CHECKPOINT_ENV})")
    p.add_argument("--student", default="fast", help=f"student encoder config: {', '.join(ENCODER_CONFIGS)}")
    p.add_argument("--init", choices=("litemedsam", "none"), default="litemedsam")
    p.add_argument("--data", type=Path, nargs="+", default=[DEFAULT_TRAIN], help="challenge npz directories")
    p.add_argument("--out", type=Path, default=RUNS_DIR / "distill")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--slice-step", type=int, default=5, help="take every n-th slice of 3D volumes")
    p.add_argument("--fractions", default=None, help="per-modality fraction kept, e.g. CT=0.02,default=0.1 (paper)")
    add_settings_options(p, TrainSettings)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def run(args) -> Path:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
    rank, _ = world()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    teacher = build_teacher(args.teacher, args.teacher_checkpoint)  # a missing checkpoint fails here, first
    ident = teacher_id(args.teacher, args.teacher_checkpoint or os.environ.get(CHECKPOINT_ENV), teacher)
    samples = find_samples(args.data, args.slice_step, parse_fractions(args.fractions), args.seed,
                           skipped=getattr(args, "skipped", None))
    cache = EmbeddingCache(args.cache_dir, ident)
    if rank == 0:
        keys = cache.build(samples, teacher.to(args.device), args.device)
    if distributed:
        dist.barrier()
    if rank != 0:
        keys = cache.build(samples, teacher, args.device, progress=False)  # all hits: only the keys
    del teacher

    student = build_student(args.student, args.init)
    settings = settings_from_args(TrainSettings, args, out_dir=args.out)
    trainer = Trainer(student, samples, keys, cache, settings)
    if args.resume:
        trainer.resume()
    result = trainer.fit()
    out = args.out / "student.pt"
    if rank == 0:
        save_checkpoint(out, trainer.student.cpu().eval(), {
            "stage": "distill", "teacher": args.teacher, "teacher_id": ident, "student": args.student,
            "init": args.init, "data": [str(d) for d in args.data], "samples": len(samples),
            "slice_step": args.slice_step, "settings": settings.to_dict(), **result,
        })
        print(f"wrote {out} after {result['steps']} steps (final loss {result['final_loss']:.5g}); "
              f"teacher cache: {cache.hits} hits, {cache.misses} computed")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
