"""Per-slice validation: every 2D image and chosen slice of a volume segmented as a 2D case of its own, through
zoo.predict's inference path, and scored as the challenge scores (DSC, NSD at 2 px). Fine-tuning selects its epoch
by it, and a recipe reports it for every stage. score_samples_clicks runs the interactive protocol on the same
samples (zoo.interactive): the click stage of distill.finetune selects by it."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from zoo.data.io import Case
from zoo.data.preprocess import label_box
from zoo.data.samples import Sample, sample_image, sample_labels
from zoo.data.scoring import case_scores
from zoo.interactive import PROTOCOL_CLICKS, Refinement, interaction_auc, next_click
from zoo.modalities import canonical_modality, head_accuracy, modality_confusion, modality_id
from zoo.predict import ModalityChoice, segment_2d


def sample_case(sample: Sample) -> Case:
    """A sample as a 2D case: its labels renumbered 1..k (a slice's, as a case of its own), each prompted by its tight
    box; the file's modality."""
    gts = sample_labels(sample)
    labels = np.unique(gts)
    labels = labels[labels > 0]
    lookup = np.zeros(int(gts.max()) + 1, dtype=np.uint8)
    lookup[labels] = np.arange(1, len(labels) + 1)
    gts = lookup[gts]
    boxes = np.array([label_box(gts, label) for label in range(1, len(labels) + 1)], dtype=np.float64).reshape(-1, 4)
    return Case(path=sample.path, image=sample_image(sample), boxes=boxes, gts=gts, spacing=np.ones(2),
                modality=canonical_modality(sample.modality))


@torch.inference_mode()
def score_samples(model, samples: list[Sample], progress: bool = True) -> dict:
    """Official DSC/NSD of every sample (each object prompted by its tight box, masks at the original size, the class
    prompt given the file's modality), per modality and as means over modalities; the modality head's accuracy and
    confusion matrix. `model` answers zoo.runtime's interface (a CachedEncoder around one reuses its embeddings)."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    scores: dict[str, list[tuple[float, float]]] = {}
    confusion = modality_confusion()
    modalities = ModalityChoice(model)
    for sample in tqdm(samples, desc="validate", unit="img", leave=False, disable=not progress):
        case = sample_case(sample)
        result = segment_2d(model, case, modalities)
        if result.head_modality is not None and case.modality is not None:
            confusion[modality_id(case.modality), modality_id(result.head_modality)] += 1
        scores.setdefault(sample.modality, []).append(case_scores(case.gts, result.segs))
    per_modality = {m: (float(np.mean([d for d, _ in v])), float(np.mean([n for _, n in v]))) for m, v in scores.items()}
    dsc = float(np.mean([d for d, _ in per_modality.values()]))
    nsd = float(np.mean([n for _, n in per_modality.values()]))
    return {"per_modality": per_modality, "dsc": dsc, "nsd": nsd, "score": (dsc + nsd) / 2,
            "head_accuracy": head_accuracy(confusion), "confusion": confusion}


@torch.inference_mode()
def score_samples_clicks(model, samples: list[Sample], clicks: int = PROTOCOL_CLICKS, progress: bool = True,
                         box_free: bool = False) -> dict:
    """The interactive protocol per slice (zoo.interactive): every sample as a 2D case (sample_case), each object
    prompted by its tight box, then `clicks` simulated clicks, all objects at once per step; official DSC/NSD after
    every step. Per modality and as means over modalities: 'steps' [(DSC, NSD) per step, the box step first],
    'dsc_auc' / 'nsd_auc' (zoo.interactive.interaction_auc, per sample then averaged), and 'score', the mean over
    modalities of (DSC_AUC + NSD_AUC) / (2 * (clicks - 1)): 1 when every click step is perfect.

    box_free: the start zoo.segment --points gives a label without a box: every object's box is the whole image
    (step 0, scored as it is), its first click lands at the centre of its ground truth (positive: where a user
    would click first), the others as the protocol places them."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    per_sample: dict[str, list[tuple[list, list]]] = {}
    modalities = ModalityChoice(model)
    for sample in tqdm(samples, desc="validate clicks", unit="img", leave=False, disable=not progress):
        case = sample_case(sample)
        if box_free:
            height, width = case.gts.shape
            case.boxes = np.tile(np.array([0, 0, width - 1, height - 1], dtype=np.float64), (len(case.boxes), 1))
        refinement = Refinement(model, case, modalities)
        dscs, nsds = [], []
        for step in range(clicks + 1):
            if step == 1 and box_free:
                empty = np.zeros(case.gts.shape, dtype=bool)
                refinement.clicks({i: next_click(empty, case.gts == i + 1) for i in range(len(case.boxes))})
            elif step:
                refinement.simulate(case.gts)
            dsc, nsd = case_scores(case.gts, refinement.segs)
            dscs.append(dsc)
            nsds.append(nsd)
        per_sample.setdefault(sample.modality, []).append((dscs, nsds))
    per_modality = {}
    for m, rows in per_sample.items():
        steps = [(float(np.mean([d[k] for d, _ in rows])), float(np.mean([n[k] for _, n in rows]))) for k in range(clicks + 1)]
        per_modality[m] = {"steps": steps, "dsc_auc": float(np.mean([interaction_auc(d, clicks) for d, _ in rows])),
                           "nsd_auc": float(np.mean([interaction_auc(n, clicks) for _, n in rows]))}
    mean = {k: float(np.mean([v[k] for v in per_modality.values()])) for k in ("dsc_auc", "nsd_auc")}
    steps = [tuple(float(np.mean([v["steps"][k][i] for v in per_modality.values()])) for i in (0, 1)) for k in range(clicks + 1)]
    return {"per_modality": per_modality, "steps": steps, **mean,
            "score": (mean["dsc_auc"] + mean["nsd_auc"]) / (2 * max(clicks - 1, 1))}
