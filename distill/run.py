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
from distill.teachers import CHECKPOINT_ENV, TEACHERS, build_teacher
from distill.train import DataSettings, Trainer, TrainSettings, start_run, world
from zoo.cli import RUNS_DIR, add_settings_options, run_cli, settings_from_args
from zoo.data.io import refuse_overwriting_inputs
from zoo.index import load
from zoo.models.checkpoint import save_checkpoint
from zoo.models.class_prompt import ClassPromptSAM
from zoo.models.encoders import ENCODER_CONFIGS
from zoo.models.factory import copy_matching_weights, create_model, init_from_litemedsam
from zoo.models.weights import sha256_file
from zoo.runtime.embedding_cache import encoder_cache_id


def teacher_id(kind: str, checkpoint: str | None, teacher) -> str:
    """Names the cache folder: the teacher kind, its weights' hash and the torch version computing it, so different
    weights never share entries. LiteMedSAM's and a zoo model's is its encoder's (whose fingerprint names its
    runtime), shared with fine-tuning and pruning (zoo.runtime.embedding_cache.encoder_cache_id)."""
    if kind in ("medsam", "sam"):
        return f"{kind}-{sha256_file(checkpoint)[:16]}-torch{torch.__version__}"
    return encoder_cache_id(teacher)


def build_student(name: str, init: str, decoder_from: str | None = None,
                  decoder_token_stride: int | None = None) -> ClassPromptSAM:
    """A student encoder by config name with LiteMedSAM's prompt encoder and mask decoder.

    init: 'litemedsam' (its encoder weights where shapes match), 'none' (a random encoder), or a zoo model / checkpoint
    whose weights are copied where names and shapes match (a part the config adds, say a high-resolution path, keeps
    its initialization). decoder_from: a zoo model / checkpoint whose prompt encoder, mask decoder (of its kind: SAM's
    or the light one) and class-prompt parts replace LiteMedSAM's, say a fine-tuned model whose masks the
    --mask-loss-weight term then matches. decoder_token_stride: that decoder made light (zoo.models.pooled_decoder: the same
    weights, the tokens' attention to the image on a pooled grid) or, with 1, SAM's again; default: as it is."""
    if name not in ENCODER_CONFIGS:
        raise ValueError(f"unknown student {name!r}; expected one of {', '.join(ENCODER_CONFIGS)}")
    source = None if decoder_from is None else load(decoder_from)
    if source is not None and not isinstance(source, ClassPromptSAM):
        raise ValueError(f"{decoder_from}: --decoder-from needs a PyTorch model, not an exported variant")
    class_prompt = source is not None and source.has_modality_head
    stride = 1 if source is None else source.config.decoder_token_stride  # its decoder as it is, light or SAM's
    if decoder_token_stride is not None:
        if decoder_token_stride < 1:
            raise ValueError(f"--decoder-token-stride must be at least 1, got {decoder_token_stride}")
        stride = decoder_token_stride
    student = create_model(name, class_prompt=class_prompt, decoder_token_stride=stride)
    init_from_litemedsam(student, skip=("image_encoder.",) if init == "none" else ())  # 'none': a random encoder
    if init not in ("litemedsam", "none"):
        initial = load(init)
        if not isinstance(initial, ClassPromptSAM):
            raise ValueError(f"{init}: --init needs a PyTorch model, not an exported variant")
        if not copy_matching_weights(student, initial, ("image_encoder.",)):
            raise ValueError(f"{init}: no encoder weight fits the {name!r} student")
    if source is not None:
        copy_matching_weights(student, source, ("prompt_encoder.", "mask_decoder.", "modality_head.", "class_prompt."))
    return student


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="medsam",
                   help=f"{', '.join(TEACHERS)}, or a zoo model / checkpoint (its embed() is the teacher)")
    p.add_argument("--teacher-checkpoint", default=None, help=f"MedSAM/SAM checkpoint (default ${CHECKPOINT_ENV})")
    p.add_argument("--student", default="fast", help=f"student encoder config: {', '.join(ENCODER_CONFIGS)}")
    p.add_argument("--init", default="litemedsam",
                   help="litemedsam, none (random encoder), or a zoo model / checkpoint to start the student from")
    p.add_argument("--decoder-from", default=None,
                   help="zoo model / checkpoint whose decoder, prompt encoder and class-prompt parts the student uses")
    p.add_argument("--decoder-token-stride", type=int, default=None,
                   help="that decoder with the tokens' attention to the image on a pooled grid of this stride (4: the "
                        "light decoder, zoo.models.pooled_decoder; same weights), or 1 for SAM's; default: as it is")
    p.add_argument("--out", type=Path, default=RUNS_DIR / "distill")
    add_settings_options(p, DataSettings)
    add_settings_options(p, TrainSettings)
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def run(args) -> Path:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
    rank, _ = world()
    start_run(args)

    refuse_overwriting_inputs(args.out, [*args.data, *filter(None, [args.teacher_checkpoint])], "--out")
    teacher = build_teacher(args.teacher, args.teacher_checkpoint)  # a missing checkpoint fails here, first
    ident = teacher_id(args.teacher, args.teacher_checkpoint or os.environ.get(CHECKPOINT_ENV), teacher)
    samples = settings_from_args(DataSettings, args).samples(args.seed, skipped=getattr(args, "skipped", None))
    cache = EmbeddingCache(args.cache_dir, ident)
    # An exported teacher (ONNX Runtime / OpenVINO) embeds one image at a time, on the CPU.
    on_device = isinstance(teacher, torch.nn.Module)
    batch = 4 if on_device else 1
    if rank == 0:
        keys = cache.build(samples, teacher.to(args.device) if on_device else teacher, args.device, batch_size=batch)
    if distributed:
        dist.barrier()
    if rank != 0:
        keys = cache.build(samples, teacher, args.device, batch_size=batch, progress=False)  # all hits: only the keys
    del teacher

    student = build_student(args.student, args.init, args.decoder_from, args.decoder_token_stride)
    settings = settings_from_args(TrainSettings, args, out_dir=args.out)
    trainer = Trainer(student, samples, keys, cache, settings)
    if args.resume:
        trainer.resume()
    result = trainer.fit()
    out = args.out / "student.pt"
    if rank == 0:
        save_checkpoint(out, trainer.student.cpu().eval(), {
            "stage": "distill", "teacher": args.teacher, "teacher_id": ident, "student": args.student,
            "init": args.init, "decoder_from": args.decoder_from,
            "decoder_token_stride": student.config.decoder_token_stride, "data": [str(d) for d in args.data], "samples": len(samples),
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
