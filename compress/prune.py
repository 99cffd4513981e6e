"""Structured pruning of a model's TinyViT encoder, then recovery by distillation from the unpruned encoder.

    python -m compress.prune zoo/cp_tinyvit.pt --ratio 0.5 --out runs/prune/cp_tinyvit_p50.pt

Every unit of zoo.models.pruning loses `ratio` of its width: conv-chain middle channels (MBConv, patch merging), MLP
hidden units, attention heads (at least one kept). Which ones go is decided by L2 magnitude: for channels and
hidden units over the whole group of coupled weights that torch-pruning's DepGraph finds for them (checked to stay
inside the unit), for heads over each head's qkv rows and proj columns (timm's TinyViT lays qkv out head by head,
which torch-pruning's head grouping does not model). The residual stream and the neck keep their widths, so the
embedding, the modality head and the mask decoder fit unchanged.

Recovery reuses distill.train's loop: the pruned encoder learns the parent encoder's embeddings of the training
images (cached once in float16 under --cache-dir, keyed by the parent encoder's fingerprint); --mask-loss-weight
adds the parent's masks for one ground-truth box per image, decoded from both embeddings by the same decoder. The
work folder holds the pruned starting point and atomic training checkpoints, so `--resume` continues an interrupted
run.
The output is a zoo checkpoint whose config records every pruned width (zoo.load rebuilds it).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch_pruning as tp
from timm.models.tiny_vit import Attention, NormMlp

from compress.export import load_parent
from distill.cache import EmbeddingCache
from distill.train import DataSettings, Trainer, TrainSettings, start_run
from zoo.cli import RUNS_DIR, add_settings_options, option, redefault, run_cli, settings_from_args
from zoo.data.io import refuse_overwriting_inputs
from zoo.models.checkpoint import load_checkpoint, save_checkpoint
from zoo.models.class_prompt import ClassPromptSAM
from zoo.models.factory import create_model
from zoo.models.flops import count_params, encoder_flops
from zoo.models.pruning import head_channels, narrow_unit, prunable_units, unit_width, unit_widths
from zoo.runtime.embedding_cache import encoder_cache_id


def kept_width(width: int, ratio: float) -> int:
    """Width left after removing floor(width × ratio), never below one."""
    return max(1, width - math.floor(width * ratio))


def _group_layers(unit: torch.nn.Module) -> tuple[torch.nn.Module, callable, set[torch.nn.Module]]:
    """(the layer whose output channels root the unit's group, its pruning function, the layers allowed in it)."""
    if isinstance(unit, NormMlp):
        return unit.fc1, tp.prune_linear_out_channels, {unit.fc1, unit.fc2}
    return unit.conv1.conv, tp.prune_conv_out_channels, {
        unit.conv1.conv, unit.conv1.bn, unit.conv2.conv, unit.conv2.bn, unit.conv3.conv}


def head_importance(attn: Attention) -> torch.Tensor:
    """(num_heads,) squared L2 norm of each head's qkv rows (weights and biases) and proj columns."""
    scores = []
    for head in range(attn.num_heads):
        rows, cols = head_channels(attn, head)
        scores.append(attn.qkv.weight[rows].pow(2).sum() + attn.qkv.bias[rows].pow(2).sum()
                      + attn.proj.weight[:, cols].pow(2).sum())
    return torch.stack(scores)


def prune_encoder(encoder: torch.nn.Module, ratio: float) -> dict[str, int]:
    """Narrow every prunable unit of `encoder` in place by `ratio`, keeping its most important channels / heads;
    returns the kept widths by unit name."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}")
    encoder.eval()
    size = encoder.config.img_size // 4  # the graph's structure does not depend on the input size; keep it cheap
    # DepGraph traces through autograd; parameters outside nn layers are declared with their channel dimension.
    unwrapped = [(m.attention_biases, 0) for m in encoder.modules() if isinstance(m, Attention)]
    unwrapped += [(p, 0) for name, p in encoder.named_parameters() if name.startswith("neck.")
                  and p.dim() == 1]
    graph = tp.DependencyGraph().build_dependency(encoder, example_inputs=torch.rand(1, 3, size, size),
                                                  unwrapped_parameters=unwrapped)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    plan = {}
    for name, unit in prunable_units(encoder).items():
        width = unit_width(unit)
        if isinstance(unit, Attention):
            with torch.no_grad():
                scores = head_importance(unit)
        else:
            root, prune_fn, allowed = _group_layers(unit)
            group = graph.get_pruning_group(root, prune_fn, idxs=list(range(width)))
            coupled = {dep.target.module for dep, _ in group} - allowed
            coupled = {m for m in coupled if any(True for _ in m.parameters(recurse=False))}
            if coupled:
                raise RuntimeError(f"{name}: its hidden channels are coupled to layers outside the unit: {coupled}")
            with torch.no_grad():
                scores = importance(group)
        plan[name] = torch.argsort(scores, descending=True)[: kept_width(width, ratio)].tolist()
    units = prunable_units(encoder)
    for name, keep in plan.items():  # narrowed after all scores are taken: the graph refers to the original layers
        narrow_unit(units[name], keep)
    return unit_widths(encoder)


def pruned_model(parent: ClassPromptSAM, ratio: float) -> ClassPromptSAM:
    """A copy of `parent` with its encoder pruned; its config records the widths, so it saves and loads as any
    zoo checkpoint."""
    model = create_model(parent.config)
    model.load_state_dict(parent.state_dict())
    widths = prune_encoder(model.image_encoder, ratio)
    model.image_encoder.config = replace(parent.config.encoder, widths=tuple(sorted(widths.items())))
    model.config = replace(parent.config, encoder=model.image_encoder.config)
    return model.eval()


@dataclass
class PruneSettings(TrainSettings):
    """compress.prune's recovery training: TrainSettings with this stage's defaults."""

    epochs: int = redefault(TrainSettings, "epochs", 1)  # 0: prune only
    # What ships is stored this way (zoo.index add copies such a file as it is), so that its INT8 variant is made from
    # the very weights that ship.
    half: bool = option(False, "store OUT in float16")
    lr: float = redefault(TrainSettings, "lr", 2e-4)
    scheduler: str = redefault(TrainSettings, "scheduler", "cosine")
    checkpoint_every: int = redefault(TrainSettings, "checkpoint_every", 20)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress.prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="zoo name or checkpoint path of the PyTorch model to prune")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of every unit's width removed")
    p.add_argument("--out", type=Path, default=None, help="pruned checkpoint (default runs/prune/<model>_p<ratio>.pt)")
    p.add_argument("--work", type=Path, default=None, help="recovery checkpoints (default: OUT without .pt)")
    add_settings_options(p, DataSettings, skip=("fractions",))
    add_settings_options(p, PruneSettings)
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def run(args) -> Path:
    start_run(args)
    out = args.out or RUNS_DIR / "prune" / f"{Path(args.model).stem}_p{round(args.ratio * 100)}.pt"
    work = args.work or out.with_suffix("")
    inputs = [*args.data, *([Path(args.model)] if Path(args.model).exists() else [])]
    for output, flag in ((out, "--out"), (work, "--work")):
        refuse_overwriting_inputs(output, inputs, flag)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out (nothing is overwritten)")
    parent, metadata = load_parent(args.model)
    start = work / "pruned_start.pt"
    if args.resume and start.exists():
        model, _ = load_checkpoint(start)
    else:
        model = pruned_model(parent, args.ratio)
        work.mkdir(parents=True, exist_ok=True)
        save_checkpoint(start, model, {"stage": "prune-start", **metadata, "ratio": args.ratio})
    sizes = {"parent_encoder_flops": encoder_flops(parent), "encoder_flops": encoder_flops(model),
             "parent_encoder_params": count_params(parent.image_encoder), "encoder_params": count_params(model.image_encoder)}
    print(f"pruned {args.ratio:.0%} of every unit: encoder {sizes['parent_encoder_params'] / 1e6:.2f} M -> "
          f"{sizes['encoder_params'] / 1e6:.2f} M params, {sizes['parent_encoder_flops'] / 1e9:.1f} -> "
          f"{sizes['encoder_flops'] / 1e9:.1f} GFLOPs ({sizes['parent_encoder_flops'] / sizes['encoder_flops']:.2f}× fewer)")
    result = {"steps": 0, "final_loss": None}
    settings = settings_from_args(PruneSettings, args, out_dir=work)
    if args.epochs > 0:
        # the slices with an object: those the decoder is asked about (and whose parent embeddings are cached)
        data = settings_from_args(DataSettings, args, fractions=None)
        samples = data.samples(args.seed, foreground_only=True, skipped=getattr(args, "skipped", None))
        cache = EmbeddingCache(args.cache_dir, encoder_cache_id(parent))
        keys = cache.build(samples, parent.to(args.device).eval(), args.device)
        trainer = Trainer(model, samples, keys, cache, settings)
        if args.resume:
            trainer.resume()
        result = trainer.fit()
        model = trainer.student.cpu().eval()
        metadata.update(data=[str(d) for d in args.data], samples=len(samples), slice_step=args.slice_step)
    save_checkpoint(out, model, {"stage": "prune", **metadata, "ratio": args.ratio, **sizes,
                                 "recovery": {**settings.to_dict(), **result}}, half=settings.half)
    print(f"wrote {out} after {result['steps']} recovery steps (final loss {result['final_loss']})")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
