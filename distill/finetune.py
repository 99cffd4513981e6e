"""Stage 2: fine-tune the mask decoder with a class prompt and a modality head (the class-prompt TinyViT paper).

    python -m distill.finetune --init litemedsam --out runs/finetune/cp_tinyvit
    python -m distill.finetune --init litemedsam --no-class-prompt --out runs/finetune/ablation
    python -m distill.finetune --init runs/distill/fast/student.pt --train-encoder --out runs/finetune/fast

Trains the mask decoder (Dice + focal loss on one ground-truth object per sample, prompted by its box with each
side moved out by 0..--box-jitter px), the modality head (cross-entropy) and the class-prompt table. The encoder is
frozen and its embeddings come from the same content-keyed cache as distillation, so a fine-tuning epoch only runs
the decoder; --train-encoder trains it too (images then go through the encoder). Flips (p=0.5 each way) apply to
the image, or with a frozen encoder to its cached embedding, and to the mask and box alike.

After every epoch the model is scored on the validation samples (every 2D image and every --slice-step-th slice
with ground truth, each object prompted by its tight box, masks at the original resolution, official DSC/NSD); the
checkpoint with the best mean over modalities of (DSC + NSD) / 2 is kept as OUT/best.pt (zoo format, with its
validation metrics), with OUT/val.csv (one row per validation) and OUT/confusion.png (the modality head's).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.plots import confusion_plot
from distill.cache import EmbeddingCache
from distill.losses import segmentation_loss
from distill.train import DataSettings, Trainer, TrainSettings, start_run
from zoo.cli import RUNS_DIR, add_settings_options, option, positive_int, redefault, run_cli, settings_from_args
from zoo.data.io import data_split, refuse_overwriting_inputs, write_csv_atomic
from zoo.data.preprocess import IMAGE_SIZE, box_from_mask
from zoo.data.samples import (
    DataError,
    Sample,
    flip,
    flip_box,
    flip_point,
    mask_256,
    object_crop,
    read_case,
    round_robin,
    sample_area,
    sample_image,
    sample_labelled_object,
    sample_object,
    sample_tensor,
)
from zoo.index import model_file
from zoo.interactive import (
    PROTOCOL_CLICKS,
    SPARSE_FILL,
    box_fill,
    focus_window,
    full_frame,
    next_click,
    padded_clicks,
    paste_focus,
    prompts_in_crop,
    resample_logits,
    window_frame,
    zoom_window,
)
from zoo.modalities import MODALITIES, head_accuracy, modality_confusion, modality_id
from zoo.models.checkpoint import load_checkpoint, save_checkpoint
from zoo.models.class_prompt import ClassPromptSAM, ModalityHead
from zoo.models.factory import build_litemedsam, create_model
from zoo.models.pooled_decoder import PooledMaskDecoder
from zoo.models.weights import CheckpointError
from zoo.runtime.embedding_cache import ENCODER_CACHE_DIR, CachedEncoder, encoder_cache_id
from zoo.validate import score_samples, score_samples_clicks

NEW_PARTS = ("modality_head.", "class_prompt.")
# What a click needs beside the box prompt: the positive / negative point embeddings, the padding token and the mask
# prompt's encoder. A box-only decode uses none of them.
CLICK_PROMPT_PARTS = ("prompt_encoder.point_embeddings.0.", "prompt_encoder.point_embeddings.1.",
                      "prompt_encoder.not_a_point_embed.", "prompt_encoder.mask_downscaling.")


@dataclass
class FinetuneSettings(TrainSettings):
    """distill.finetune's options: TrainSettings' with this stage's defaults, and its losses."""

    lr: float = redefault(TrainSettings, "lr", 1e-4)
    scheduler: str = redefault(TrainSettings, "scheduler", "cosine")
    checkpoint_every: int = redefault(TrainSettings, "checkpoint_every", 50)
    box_jitter: int = option(5, "each side of a training box moves out by 0..this many pixels")
    # Dice + focal 1:1. SAM's 20:1 focal to Dice erased thin vessels (Fundus DSC .22 -> 0) and small caries (X-Ray
    # .17 -> .03) on val after one epoch: focal terms reward background on such objects.
    focal_weight: float = option(1.0, "focal loss weight; Dice has weight 1")
    head_weight: float = option(1.0, "modality-head cross-entropy weight")
    head_epochs: int = option(3000, "full-batch steps of the modality head's refit on pooled embeddings", type=positive_int)
    new_parts_lr_scale: float = option(10.0, "learning-rate factor of the zero-initialized class prompt and the fresh head")
    train_encoder: bool = option(False, "train the encoder too (no embedding cache)")
    # What ships is stored this way (zoo.index add copies such a file as it is), so that the board and the INT8
    # variants are made from the very weights that ship.
    half: bool = option(False, "store OUT/best.pt in float16")
    encoder_from: str | None = option(None, "leave LiteMedSAM's unchanged encoder out of OUT/best.pt (checked)",
                                      choices=("litemedsam",))
    # The click stage (issue #31): each sample is a simulated interaction, its box step and every click step in the
    # loss (see FineTuner._click_loss); the epoch is chosen by the interactive protocol on the val samples.
    clicks: int = option(0, "click stage: simulated clicks after the box per sample (the protocol's 5); 0: boxes only",
                         type=int)
    click_parts: str = option("separate", "what the click stage trains: 'separate' (a click decoder of its own, from "
                                          "the box decoder or --click-decoder-from, and the prompt encoder's point "
                                          "and mask parts: box-only masks stay exactly the init's), 'decoder' (the "
                                          "box decoder itself and the class prompt too: box-only masks change) or "
                                          "'prompt' (the prompt encoder's point and mask parts alone)",
                              choices=("separate", "decoder", "prompt"))
    click_prompt_lr_scale: float = option(1.0, "click stage: learning-rate factor of the prompt encoder's point and "
                                               "mask parts")
    click_val_samples: int = option(66, "click stage: val samples the protocol scores each epoch, taken in turn from "
                                        "each modality (the box-only score uses every val sample)", type=int)
    # zoo.interactive decodes a small object's clicks on a zoom crop (its first click's mask prompt: the box step's
    # logits carried into the crop); trained on whole images alone, the click decoder never saw such a crop.
    click_zoom: bool = option(False, "click stage: an object small enough for zoo.interactive's zoom crop gets its "
                                     "clicks on that crop (embedded by the frozen encoder), as at inference")
    # zoo.interactive carries a 3D click's correction to the neighbouring slices: each is decoded with the walked-from
    # slice's box and new logits as its mask prompt, and no clicks, an input the click decoder was never shown.
    click_carry: bool = option(False, "click stage: a volume's sample, after its clicks, also decodes a neighbouring "
                                      "slice with the box of its new mask and its new logits as the mask prompt (no "
                                      "clicks), as zoo.interactive carries a click's correction; that slice's mask "
                                      "in the loss as one more step")
    # zoo.interactive refines a sparse object's click (a vessel tree, a retinal layer, scattered lesions) on a focus
    # crop around it, the whole frame's new logits as the mask prompt and the box clipped to the crop; trained on
    # whole images and zoom crops alone, the click decoder never saw such a crop.
    click_focus: bool = option(False, "click stage: a sample zoo.interactive would refine on a focus crop (not "
                                      "zoomed, its mask under half of its box) also decodes each click on the crop "
                                      "around it (embedded by the frozen encoder), as at inference; that decode in "
                                      "the loss, and its answer pasted into the logits the next click starts from")
    box_tolerance: float = option(0.005, "click stage: an epoch is kept only if its box-only val DSC is at most this "
                                         "far below the init's")


# The mask loss and encoder parts of distillation do not apply here: fine-tuning learns masks from ground truth
# (--train-encoder trains the whole encoder).
NOT_OPTIONS = ("mask_loss_weight", "gt_loss_weight", "mask_box_jitter", "train_parts")


def build_model(init: str, class_prompt: bool, decoder_token_stride: int | None = None) -> ClassPromptSAM:
    """LiteMedSAM ('litemedsam'), a zoo checkpoint by name (e.g. 'cp_tinyvit_fast') or a checkpoint path, with a
    fresh head and zero class prompt if asked and the checkpoint has none. `decoder_token_stride` 2 or more swaps in zoo.models.pooled_decoder's light decoder
    (the tokens' attention to the image on a pooled grid), with the checkpoint's decoder weights (it has the same)."""
    if init == "litemedsam" and decoder_token_stride in (None, 1):
        return build_litemedsam(class_prompt=class_prompt)
    source = build_litemedsam(class_prompt=class_prompt) if init == "litemedsam" else load_checkpoint(model_file(init))[0]
    stride = source.config.decoder_token_stride if decoder_token_stride is None else decoder_token_stride
    model = create_model(source.config, class_prompt=class_prompt, decoder_token_stride=stride)
    weights = {k: v for k, v in source.state_dict().items() if not k.startswith(NEW_PARTS) or class_prompt}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith(NEW_PARTS) for k in missing):
        raise CheckpointError(f"{init}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def with_click_decoder(model: ClassPromptSAM, source: str | None = None) -> ClassPromptSAM:
    """`model` with a click decoder of its own (ModelConfig.click_decoder), every weight kept. The click decoder starts
    as `source`'s (a zoo checkpoint: its click decoder, or its mask decoder where it has none; its prompt encoder's
    point and mask parts come too), else as the model's box decoder (or its click decoder, where it has one)."""
    donor = load_checkpoint(model_file(source))[0] if source else model
    prefix = "click_mask_decoder." if donor.click_mask_decoder is not None else "mask_decoder."
    if donor.config.decoder_token_stride != model.config.decoder_token_stride:
        raise CheckpointError(f"{source}: its decoder (token stride {donor.config.decoder_token_stride}) is not the model's "
                              f"({model.config.decoder_token_stride})")
    result = create_model(model.config, click_decoder=True)
    weights = dict(model.state_dict())
    weights.update({"click_mask_decoder." + k[len(prefix):]: v for k, v in donor.state_dict().items() if k.startswith(prefix)})
    if source:
        weights.update({k: v for k, v in donor.state_dict().items() if k.startswith(CLICK_PROMPT_PARTS)})
    result.load_state_dict(weights)  # strict: every weight has its place
    return result


def save_best(settings: FinetuneSettings, model: ClassPromptSAM, metadata: dict) -> Path:
    """OUT/best.pt (atomic), stored as the settings say (float16, without LiteMedSAM's encoder)."""
    return save_checkpoint(settings.out_dir / "best.pt", model, metadata, half=settings.half,
                           encoder_from=settings.encoder_from)


class EmbeddingSource:
    """Image embeddings of samples: a frozen encoder's from a cache (the fp16 training cache by key, or a
    CachedEncoder), a trained encoder's computed anew."""

    def __init__(self, samples: list[Sample], encoder, keys: list[str] | None = None, cache: EmbeddingCache | None = None):
        self.samples, self.encoder, self.keys, self.cache = samples, encoder, keys, cache

    def __call__(self, i: int) -> torch.Tensor:
        if self.keys is None:
            return self.encoder.embed(sample_tensor(self.samples[i])[None])
        embedding = self.cache.get(self.keys[i])
        if embedding is None:
            raise RuntimeError(f"embedding of {self.samples[i].path} slice {self.samples[i].z} is not cached")
        return embedding[None].float()


VAL_FIELDS = ["step", "epoch", "score", "dsc", "nsd", "head_accuracy"] + [f"{k}_{m}" for m in MODALITIES for k in ("dsc", "nsd")]
# The click stage's columns: the interactive protocol on the same samples (zoo.validate.score_samples_clicks).
CLICK_VAL_FIELDS = (["click_score", "dsc_auc", "nsd_auc", "box_dsc_kept"] + [f"dsc_step{k}" for k in range(PROTOCOL_CLICKS + 1)]
                    + [f"{k}_{m}" for m in MODALITIES for k in ("dsc_auc", "dsc_last")])


def click_row(result: dict) -> dict:
    """val.csv's click columns of one score_samples_clicks result."""
    row = {"click_score": f"{result['score']:.4f}", "dsc_auc": f"{result['dsc_auc']:.4f}", "nsd_auc": f"{result['nsd_auc']:.4f}"}
    row.update({f"dsc_step{k}": f"{dsc:.4f}" for k, (dsc, _) in enumerate(result["steps"])})
    for m, v in result["per_modality"].items():
        row[f"dsc_auc_{m}"], row[f"dsc_last_{m}"] = f"{v['dsc_auc']:.4f}", f"{v['steps'][-1][0]:.4f}"
    return row


def decode_batch(model: ClassPromptSAM, embedding: torch.Tensor, boxes: torch.Tensor, modality, **clicks) -> torch.Tensor:
    """decode() of B samples, each with its own embedding (B, 256, 64, 64), box and clicks: in one call for the light
    decoder (it broadcasts an embedding per box), sample by sample for SAM's (it repeats one embedding per box)."""
    if isinstance(model.mask_decoder, PooledMaskDecoder):
        return model.decode(embedding, boxes, modality, **clicks)
    rows = []
    for i in range(len(boxes)):
        row = {k: (v[i : i + 1] if v is not None else None) for k, v in clicks.items()}
        rows.append(model.decode(embedding[i : i + 1], boxes[i : i + 1], None if modality is None else modality[i : i + 1], **row))
    return torch.cat(rows)


def resampled_flipped(logits: torch.Tensor, flips: tuple[bool, bool], source, target) -> torch.Tensor:
    """A flipped sample's logits (C, 256, 256) resampled from frame `source` to `target` (zoo.interactive's frames,
    which know no flips: unflipped first, flipped back after), float32."""
    h, v = flips
    return flip(resample_logits(flip(logits, h, v).float(), source, target), h, v)


class FineTuner(Trainer):
    stage = "finetune"

    def __init__(self, model, samples, keys, cache, settings: FinetuneSettings, val_samples, metadata: dict,
                 encoder_cache_dir: Path = ENCODER_CACHE_DIR):
        super().__init__(model, samples, keys, cache, settings)
        self.val_samples, self.metadata = val_samples, metadata
        self.train_embeddings = EmbeddingSource(samples, self.student, keys, cache)
        # Validation embeddings of a frozen encoder are float32 and shared with benchmarks.run's cache.
        val_encoder = self.student if settings.train_encoder else CachedEncoder(self.student, encoder_cache_dir)
        self.val_encoder = val_encoder
        self.val_embeddings = EmbeddingSource(val_samples, val_encoder)
        # the protocol costs 6 decodes and scorings per object: the click stage scores a fixed, balanced subset
        self.click_val_samples = round_robin(val_samples, settings.click_val_samples, settings.seed)
        self.val_rows: list[dict] = []
        self.best = {"score": -math.inf, "step": 0}
        self.box_baseline = -math.inf  # click stage: the init's box-only val DSC
        self.box_result = None  # click stage: the init's box-only validation

    def is_trainable(self, name: str) -> bool:
        if self.settings.clicks:  # the click stage: the head is not trained, nor the encoder
            extra = {"decoder": ("mask_decoder.", "class_prompt."), "separate": ("click_mask_decoder.",), "prompt": ()}
            return name.startswith(CLICK_PROMPT_PARTS + extra[self.settings.click_parts])
        return name.startswith(("mask_decoder.",) + NEW_PARTS) or (self.settings.train_encoder and name.startswith("image_encoder."))

    def param_groups(self) -> list[dict]:
        if self.settings.clicks:  # the class prompt is trained already; the click prompt parts may get their own rate
            prompt = [p for n, p in self.student.named_parameters() if p.requires_grad and n.startswith(CLICK_PROMPT_PARTS)]
            rest = [p for n, p in self.student.named_parameters() if p.requires_grad and not n.startswith(CLICK_PROMPT_PARTS)]
            return [{"params": rest}, {"params": prompt, "lr": self.settings.lr * self.settings.click_prompt_lr_scale}]
        new = [p for n, p in self.student.named_parameters() if p.requires_grad and n.startswith(NEW_PARTS)]
        rest = [p for n, p in self.student.named_parameters() if p.requires_grad and not n.startswith(NEW_PARTS)]
        groups = [{"params": rest}]
        if new:
            groups.append({"params": new, "lr": self.settings.lr * self.settings.new_parts_lr_scale})
        return groups

    def wrap_distributed(self) -> None:
        raise ValueError("fine-tuning runs in one process; start it without torchrun")

    def _micro_batch_loss(self, indices: list[int], g: torch.Generator) -> torch.Tensor:
        if self.settings.clicks:
            return self._click_loss(indices, g)
        settings, device = self.settings, self.settings.device
        seg_losses, embeddings, modalities = [], [], []
        for i in indices:
            h, v = (torch.rand(2, generator=g) < 0.5).tolist() if settings.flip else (False, False)
            found = sample_object(self.samples[i], g, grow=settings.box_jitter)
            if found is None:
                raise DataError(f"{self.samples[i].path}: slice {self.samples[i].z} has no ground-truth object")
            box, mask = found
            if settings.train_encoder:  # flip the image itself
                embedding = self.student.embed(flip(sample_tensor(self.samples[i]), h, v)[None].to(device))
            else:
                embedding = flip(self.train_embeddings(i), h, v).to(device)
            mask, box = flip(mask, h, v).to(device), flip_box(box, h, v).to(device)
            modality = modality_id(self.samples[i].modality)
            with torch.autocast(**self.autocast):
                logits = self.student.decode(embedding, box[None], modality if self.student.has_modality_head else None)
            seg_losses.append(segmentation_loss(logits, mask[None], settings.focal_weight))
            embeddings.append(embedding)
            modalities.append(modality)
        loss = torch.stack(seg_losses).mean()
        if self.student.has_modality_head:
            head_logits = self.student.predict_modality(torch.cat(embeddings).float())
            loss = loss + settings.head_weight * F.cross_entropy(head_logits, torch.tensor(modalities, device=device))
        return loss

    def _click_loss(self, indices: list[int], g: torch.Generator) -> torch.Tensor:
        """The click stage: a simulated interaction per sample, Dice + focal at every step, averaged over steps.

        Step 0 is the box alone (the box-only decode: its accuracy stays in the loss; with a separate click decoder the
        box decoder is frozen and that step is a constant of the loss, as box-only masks cannot change); each of the
        `clicks` steps
        after it adds, per sample, the click zoo.interactive.next_click places on the largest error of the previous
        step's mask (at the 256 frame, inside the image's unpadded area), and feeds that step's logits back as the
        mask prompt (detached: each step learns to correct its input, as SAM was trained). The samples of a
        micro-batch are decoded together (the light decoder broadcasts one embedding per box). With click_zoom, a
        sample whose object zoo.interactive would zoom on takes its clicks on that crop after its box step, the box
        step's logits carried into the crop as the mask prompt (_into_crop). With click_focus, a sparse object's click
        is decoded again on the focus crop around it, in the loss as one more step (_focus_step)."""
        settings, device = self.settings, self.settings.device
        embeddings, boxes, masks, valid, modalities, crops, flips, object_labels, boxes256 = [], [], [], [], [], [], [], [], []
        for i in indices:
            h, v = (torch.rand(2, generator=g) < 0.5).tolist() if settings.flip else (False, False)
            found = sample_labelled_object(self.samples[i], g, grow=settings.box_jitter)
            if found is None:
                raise DataError(f"{self.samples[i].path}: slice {self.samples[i].z} has no ground-truth object")
            box, mask, label = found
            embeddings.append(flip(self.train_embeddings(i), h, v))
            boxes.append(flip_box(box, h, v))
            masks.append(flip(mask, h, v))
            valid.append(flip(sample_area(self.samples[i]), h, v).numpy())
            modalities.append(modality_id(self.samples[i].modality))
            crops.append(self._zoom_crop(self.samples[i], box, label, h, v) if settings.click_zoom else None)
            flips.append((h, v))
            object_labels.append(label)
            boxes256.append(box)
        areas = list(valid)  # the whole frame's, before a zoom crop's replaces them
        embedding, box, truth = torch.cat(embeddings).to(device), torch.stack(boxes).to(device), torch.stack(masks).to(device)
        ids = torch.tensor(modalities, device=device) if self.student.has_modality_head else None
        clicks: list[list[tuple[float, float, int]]] = [[] for _ in indices]
        with torch.set_grad_enabled(settings.click_parts != "separate"):  # a separate click decoder: the box's is frozen
            logits = decode_batch(self.student, embedding, box, ids)
        losses = [segmentation_loss(logits, truth, settings.focal_weight)]
        if any(crop is not None for crop in crops):
            embedding, box, truth, logits = embedding.clone(), box.clone(), truth.clone(), logits.clone()
            for j, crop in enumerate(crops):
                if crop is not None:
                    embedding[j], box[j], truth[j], valid[j], logits[j] = self._into_crop(crop, logits[j])
        truths = [t[0].cpu().numpy() > 0.5 for t in truth]
        for _ in range(settings.clicks):
            previous = logits.detach()
            predicted = (previous[:, 0] > 0).cpu().numpy()
            focused = []  # the samples whose click this step zoo.interactive would refine on a focus crop
            for j, (prediction, area) in enumerate(zip(predicted, valid)):
                click = next_click(prediction & area, truths[j] & area)
                if click is not None:
                    clicks[j].append((float(click.position[1]), float(click.position[0]), int(click.positive)))
                    if (settings.click_focus and crops[j] is None
                            and box_fill(prediction & area, boxes256[j].numpy(), (IMAGE_SIZE, IMAGE_SIZE)) < SPARSE_FILL):
                        focused.append(j)
            points, labels = padded_clicks(clicks)
            logits = decode_batch(self.student, embedding, box, ids, points=points.to(device),
                                  point_labels=labels.to(device), mask_input=previous)
            losses.append(segmentation_loss(logits, truth, settings.focal_weight))
            if focused:
                focus_loss, logits = self._focus_step(indices, focused, flips, object_labels, boxes256, clicks, logits, ids)
                losses.append(focus_loss)
        if settings.click_carry:
            carry = self._carry_loss(indices, flips, object_labels, areas, crops, logits.detach(), ids, g)
            if carry is not None:
                losses.append(carry)
        return torch.stack(losses).mean()

    def _carry_loss(self, indices: list[int], flips: list[tuple[bool, bool]], labels: list[int], areas: list[np.ndarray],
                    crops: list[dict | None], logits: torch.Tensor, ids: torch.Tensor | None,
                    g: torch.Generator) -> torch.Tensor | None:
        """The carry step of the volume samples of a micro-batch: each one's neighbouring slice (up or down, drawn;
        the other way where the object is not on that one) decoded with the box of the sample's latest mask (widened
        as zoo.interactive widens it: box_from_mask) and its latest logits (N, 1, 256, 256; a zoom crop's carried back
        to the whole frame) as the mask prompt, no clicks; Dice + focal against that slice's mask of the object.
        None where no sample has such a neighbour (2D samples, empty masks, an object on one slice)."""
        device, rows = self.settings.device, []
        for j, i in enumerate(indices):
            sample, (h, v) = self.samples[i], flips[j]
            if sample.z is None:
                continue
            whole = logits[j]
            if crops[j] is not None:
                whole = resampled_flipped(whole, (h, v), crops[j]["crop"], crops[j]["whole"]).to(logits.dtype)
            box = box_from_mask(((whole[0] > 0).cpu().numpy() & areas[j]).astype(np.uint8))  # 256 frame: not resized
            if box is None:
                continue
            gts = read_case(sample.path).gts
            step = 1 if torch.rand(1, generator=g).item() < 0.5 else -1
            near = [z for z in (sample.z + step, sample.z - step) if 0 <= z < len(gts) and (gts[z] == labels[j]).any()]
            if not near:
                continue
            with torch.no_grad():
                embedding = self.student.embed(sample_tensor(replace(sample, z=near[0]))[None].to(device))
            rows.append((flip(embedding, h, v), torch.as_tensor(box, dtype=torch.float32),
                         flip(mask_256(gts[near[0]], labels[j]), h, v), whole, j))
        if not rows:
            return None
        embedding, box, truth, mask_input, kept = (list(c) for c in zip(*rows))
        logits = decode_batch(self.student, torch.cat(embedding), torch.stack(box).to(device),
                              None if ids is None else ids[kept], mask_input=torch.stack(mask_input))
        return segmentation_loss(logits, torch.stack(truth).to(device), self.settings.focal_weight)

    def _zoom_crop(self, sample: Sample, box: torch.Tensor, label: int, h: bool, v: bool) -> dict | None:
        """The zoom crop zoo.interactive would decode a click of this object on (box: 256 frame, unflipped), its
        embedding, box, mask and image area there, flipped as the sample; None where it would not zoom."""
        shape = sample_image(sample).shape[:2]
        window = zoom_window(box.numpy(), np.zeros((0, 2)), shape)
        return None if window is None else self._crop(sample, label, window, box, [], h, v)

    def _crop(self, sample: Sample, label: int, window: tuple[int, int, int, int], box: torch.Tensor,
              clicks: list[tuple[float, float, int]], h: bool, v: bool) -> dict:
        """A crop (x0, y0, x1, y1), original pixels, of a sample as zoo.interactive decodes it (a zoom or a focus
        crop): its embedding by the frozen encoder, the box (4,) clipped to it and the clicks [(x, y, label)] inside
        it (from the whole image's 256 frame, unflipped: prompts_in_crop), the object's mask and the image's area
        there, flipped as the sample (h, v); with the frames of the whole image and of the crop."""
        tensor, mask, area = object_crop(sample, label, window)
        whole = full_frame(sample_image(sample).shape[:2])
        crop_box, inside = prompts_in_crop(box.numpy(), clicks, whole, window)
        with torch.no_grad():
            embedding = self.student.embed(tensor[None].to(self.settings.device))[0]
        return {"embedding": flip(embedding, h, v), "box": flip_box(torch.as_tensor(crop_box[0], dtype=torch.float32), h, v),
                "clicks": [(*flip_point(x, y, h, v), c) for x, y, c in inside], "mask": flip(mask, h, v),
                "area": flip(area, h, v).numpy(), "flips": (h, v), "whole": whole, "crop": window_frame(window),
                "window": window}

    def _focus_step(self, indices: list[int], focused: list[int], flips: list[tuple[bool, bool]], labels: list[int],
                    boxes: list[torch.Tensor], clicks: list[list[tuple[float, float, int]]], logits: torch.Tensor,
                    ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The focus crops of a click step (click_focus), as zoo.interactive.refine_on_focus decodes them: each
        `focused` sample (positions in the micro-batch) is decoded again on the crop around its latest click
        (focus_window), with its box (boxes: 256 frame, unflipped) clipped to the crop, its clicks inside it and the
        step's whole-frame logits (N, 1, 256, 256) carried in as the mask prompt (detached, as every step's).
        -> (Dice + focal against the objects' masks in their crops; the step's logits with each crop's answer pasted
        into its window, detached: what the next click starts from, as at inference)."""
        device, rows = self.settings.device, []
        for j in focused:
            sample, (h, v) = self.samples[indices[j]], flips[j]
            unflipped = [(*flip_point(x, y, h, v), c) for x, y, c in clicks[j]]
            shape = sample_image(sample).shape[:2]
            crop = self._crop(sample, labels[j], focus_window(unflipped[-1][:2], shape), boxes[j], unflipped, h, v)
            crop["prompt"] = resampled_flipped(logits[j].detach(), (h, v), crop["whole"], crop["crop"]).to(logits.dtype)
            crop["shape"] = shape
            rows.append(crop)
        points, point_labels = padded_clicks([crop["clicks"] for crop in rows])
        crop_logits = decode_batch(self.student, torch.stack([c["embedding"] for c in rows]).to(device),
                                   torch.stack([c["box"] for c in rows]).to(device), None if ids is None else ids[focused],
                                   points=points.to(device), point_labels=point_labels.to(device),
                                   mask_input=torch.stack([c["prompt"] for c in rows]).to(device))
        loss = segmentation_loss(crop_logits, torch.stack([c["mask"] for c in rows]).to(device), self.settings.focal_weight)
        pasted = logits.detach().clone()
        for j, crop, answer in zip(focused, rows, crop_logits.detach()):
            h, v = crop["flips"]
            pasted[j] = flip(paste_focus(flip(pasted[j], h, v), flip(answer, h, v), crop["window"], crop["shape"]), h, v)
        return loss, pasted

    def _into_crop(self, crop: dict, logits: torch.Tensor) -> tuple:
        """A sample's tensors in its zoom crop's frame: embedding, box, mask, image area and its box step's logits
        (1, 256, 256) carried into the crop (unflipped, resampled, flipped back), as zoo.interactive carries them."""
        carried = resampled_flipped(logits.detach(), crop["flips"], crop["whole"], crop["crop"])
        device = self.settings.device
        return (crop["embedding"].to(device), crop["box"].to(device), crop["mask"].to(device), crop["area"],
                carried.to(logits.dtype).to(device))

    def end_of_epoch(self, epoch: int) -> None:
        self.validate(epoch)

    def validate(self, epoch: int) -> None:
        if self.settings.clicks and self.settings.click_parts in ("separate", "prompt") and self.box_result is not None:
            result = self.box_result  # box-only masks cannot change: scored once, on the init
        else:
            result = score_samples(self.val_encoder, self.val_samples)
        if self.settings.clicks and self.box_result is None:
            self.box_result = result
        clicks = score_samples_clicks(self.val_encoder, self.click_val_samples, self.settings.clicks) if self.settings.clicks else None
        self.train_mode()
        row = {"step": self.step, "epoch": epoch, **{k: f"{result[k]:.4f}" for k in ("score", "dsc", "nsd", "head_accuracy")}}
        for m, (dsc, nsd) in result["per_modality"].items():
            row[f"dsc_{m}"], row[f"nsd_{m}"] = f"{dsc:.4f}", f"{nsd:.4f}"
        score = result["score"]
        if clicks is not None:
            row.update(click_row(clicks))
            if not self.val_rows:  # the init's box-only DSC: the bar every later epoch's box-only DSC is held to
                self.box_baseline = result["dsc"]
            kept = result["dsc"] >= self.box_baseline - self.settings.box_tolerance
            row["box_dsc_kept"] = "yes" if kept else "no"
            score = clicks["score"] if kept else -math.inf
        self.val_rows.append(row)
        write_csv_atomic(self.settings.out_dir / "val.csv", self.val_rows, VAL_FIELDS + (CLICK_VAL_FIELDS if clicks else []))
        tqdm.write(f"step {self.step} (epoch {epoch}): val DSC {result['dsc']:.4f} NSD {result['nsd']:.4f} "
                   f"head accuracy {result['head_accuracy']:.3f}"
                   + (f"; clicks: DSC after {self.settings.clicks} {clicks['steps'][-1][0]:.4f}, DSC_AUC "
                      f"{clicks['dsc_auc']:.4f}, NSD_AUC {clicks['nsd_auc']:.4f}" if clicks else ""))
        if score > self.best["score"]:
            self.best = {"score": score, "step": self.step}
            metrics = {k: result[k] for k in ("score", "dsc", "nsd", "head_accuracy")}
            metrics["per_modality"] = {m: {"dsc": d, "nsd": n} for m, (d, n) in result["per_modality"].items()}
            if clicks is not None:
                metrics["clicks"] = {k: clicks[k] for k in ("score", "dsc_auc", "nsd_auc", "steps", "per_modality")}
            metrics["confusion"] = result["confusion"].tolist()
            save_best(self.settings, self.student.eval(), {**self.metadata, "steps": self.step, "epoch": epoch, "val": metrics})
            self.train_mode()
            if self.student.has_modality_head:
                confusion_plot(result["confusion"], self.settings.out_dir / "confusion.png",
                               f"modality head on val samples (step {self.step}): accuracy {result['head_accuracy']:.3f}")

    def extra_state(self) -> dict:
        return {"best": dict(self.best), "val_rows": list(self.val_rows), "box_baseline": self.box_baseline}

    def restore_extra(self, state: dict) -> None:
        self.best = dict(state.get("best", self.best))
        self.val_rows = list(state.get("val_rows", []))
        self.box_baseline = state.get("box_baseline", self.box_baseline)

    def fit(self, progress: bool = True) -> dict:
        if self.settings.clicks and not self.val_rows:  # the init, scored first: box-only baseline and a candidate
            self.validate(-1)
        result = super().fit(progress)
        if self.best["step"] != self.step and not any(int(r["step"]) == self.step for r in self.val_rows):
            self.validate(self.step // self.steps_per_epoch)  # stopped mid-epoch (--max-steps): score the last weights too
        return {**result, "best_step": self.best["step"], "best_score": self.best["score"]}


def pooled_embeddings(source: EmbeddingSource, count: int, desc: str) -> torch.Tensor:
    """(count, 256): each sample's embedding averaged over space, the modality head's input."""
    with torch.no_grad():  # not inference_mode: the head trains on these
        return torch.cat([source(i).mean(dim=(2, 3)) for i in tqdm(range(count), desc=desc, unit="img", leave=False)])


def fit_modality_head(head: ModalityHead, features: torch.Tensor, labels: torch.Tensor, epochs: int = 3000,
                      lr: float = 3e-3, seed: int = 0) -> None:
    """Train the head on pooled embeddings, full batch, cross-entropy weighted so every modality counts alike.

    With a frozen encoder the head's input never changes, so it is fitted here to convergence in seconds; during
    decoder fine-tuning it sees each image only a few times and stays far from it (42% on val after an epoch).
    Epochs and learning rate were chosen on val samples (300/1000/3000 × 1e-3/3e-3/1e-2: 92.8-95.0%)."""
    torch.manual_seed(seed)
    for layer in head.mlp:
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()  # a fresh, seeded start: the result depends on the features only
    counts = torch.bincount(labels, minlength=len(MODALITIES)).float()
    weights = torch.where(counts > 0, counts.sum() / counts.clamp(min=1), torch.zeros_like(counts))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    head.train()
    threads = torch.get_num_threads()
    # One thread: a 256-wide MLP gains nothing from more, and each of its thousands of steps would wait on every
    # thread of the pool (256 s instead of 12 for 3000 steps on 2 cores shared with another process).
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(head.mlp(features), labels, weight=weights).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    head.eval()


def refit_head(settings: FinetuneSettings, samples, keys, cache, val_samples, val_source: EmbeddingSource) -> dict:
    """Fit the modality head of OUT/best.pt on the training samples' pooled embeddings and rewrite best.pt (atomic)
    with its accuracy and confusion matrix on the validation samples; the segmentation weights are unchanged."""
    best = settings.out_dir / "best.pt"
    model, metadata = load_checkpoint(best)
    train_x = pooled_embeddings(EmbeddingSource(samples, model, keys, cache), len(samples), "train features")
    val_x = pooled_embeddings(val_source, len(val_samples), "val features")
    train_y = torch.tensor([modality_id(s.modality) for s in samples])
    val_y = torch.tensor([modality_id(s.modality) for s in val_samples])
    fit_modality_head(model.modality_head, train_x, train_y, epochs=settings.head_epochs, seed=settings.seed)
    with torch.inference_mode():
        predicted = model.modality_head.mlp(val_x).argmax(dim=1)
    confusion = modality_confusion()
    np.add.at(confusion, (val_y.numpy(), predicted.numpy()), 1)
    accuracy = head_accuracy(confusion)
    metadata.setdefault("val", {}).update(head_accuracy=accuracy, confusion=confusion.tolist(), head="fitted on pooled train embeddings")
    save_best(settings, model, metadata)
    confusion_plot(confusion, best.parent / "confusion.png", f"modality head on {len(val_samples)} val samples: accuracy {accuracy:.3f}")
    return {"head_accuracy": accuracy}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="litemedsam", help="'litemedsam', a zoo checkpoint's name (e.g. cp_tinyvit_fast) or a checkpoint path (e.g. a distilled student)")
    p.add_argument("--no-class-prompt", action="store_true", help="the ablation: the same fine-tuning without head and class prompt")
    p.add_argument("--decoder-token-stride", type=int, default=None,
                   help="2 or more: the decoder's token-to-image attention on a pooled grid (zoo.models.pooled_decoder; default: the init's)")
    p.add_argument("--click-decoder-from", default=None,
                   help="click stage (--click-parts separate): a zoo checkpoint whose click decoder (or mask decoder) "
                        "and click prompt parts the click decoder starts from (default: the init's box decoder)")
    p.add_argument("--val", type=Path, nargs="+", default=[data_split("val")],
                   help="model selection data (--max-samples caps it too)")
    p.add_argument("--out", type=Path, default=RUNS_DIR / "finetune")
    add_settings_options(p, DataSettings)
    add_settings_options(p, FinetuneSettings, skip=NOT_OPTIONS)
    p.add_argument("--head-only", action="store_true",
                   help="only refit the modality head: of OUT/best.pt, or where there is none yet, of --init's model")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def run(args) -> Path:
    start_run(args)
    for flag in ("click_zoom", "click_carry", "click_focus"):
        if getattr(args, flag) and not args.clicks:
            raise ValueError(f"--{flag.replace('_', '-')} is about the click stage: give --clicks N")
    init = [Path(m) for m in (args.init, args.click_decoder_from) if m and Path(m).exists()]
    refuse_overwriting_inputs(args.out, [*args.data, *args.val, *init], "--out")
    model = build_model(args.init, class_prompt=not args.no_class_prompt, decoder_token_stride=args.decoder_token_stride)
    if args.clicks and args.click_parts == "separate":
        model = with_click_decoder(model, args.click_decoder_from)
    if args.clicks:  # its checkpoints and their exports say so (zoo.segment and the app warn on untrained ones)
        model.config = replace(model.config, clicks_trained=True)
    skipped = getattr(args, "skipped", None)
    data = settings_from_args(DataSettings, args)
    samples = data.samples(args.seed, foreground_only=True, skipped=skipped)
    val_samples = replace(data, fractions=None).samples(args.seed, foreground_only=True, skipped=skipped, folders=args.val)
    for sample in samples + val_samples:
        modality_id(sample.modality)  # every sample needs a known modality for the head and the class prompt
    cache = EmbeddingCache(args.cache_dir, encoder_cache_id(model))
    keys = None
    if not args.train_encoder:  # the frozen encoder's embeddings, computed once
        keys = cache.build(samples, model.to(args.device).eval(), args.device)
    settings = settings_from_args(FinetuneSettings, args, out_dir=args.out)
    metadata = {"stage": "finetune", "init": args.init, "class_prompt": not args.no_class_prompt,
                "click_decoder_from": args.click_decoder_from,
                "decoder_token_stride": model.config.decoder_token_stride,
                "data": [str(d) for d in args.data], "val_data": [str(d) for d in args.val], "samples": len(samples),
                "val_samples": len(val_samples), "slice_step": args.slice_step, "settings": settings.to_dict()}
    trainer = FineTuner(model, samples, keys, cache, settings, val_samples, metadata, args.cache_dir / "encoders")
    best = args.out / "best.pt"
    if not args.head_only:
        if args.resume:
            trainer.resume()
        result = trainer.fit()
        print(f"wrote {best}: step {result['best_step']} of {result['steps']}, val (DSC + NSD) / 2 = {result['best_score']:.4f}")
    elif not best.exists():  # the head of --init's model, which is otherwise kept as it is
        args.out.mkdir(parents=True, exist_ok=True)
        save_best(settings, model, {**metadata, "head_only": True})
    if trainer.student.has_modality_head and not args.train_encoder and not args.clicks:  # the click stage keeps the head
        head = refit_head(settings, samples, keys, cache, val_samples, trainer.val_embeddings)
        print(f"modality head fitted on {len(samples)} pooled train embeddings: val accuracy {head['head_accuracy']:.4f}")
    return best


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
