"""Per-slice validation: every 2D image and chosen slice of a volume segmented as a 2D case of its own, through
zoo.predict's inference path, and scored as the challenge scores (DSC, NSD at 2 px). Fine-tuning selects its epoch
by it, and a recipe reports it for every stage."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from zoo.data.io import Case
from zoo.data.preprocess import label_box
from zoo.data.samples import Sample, sample_image, sample_labels
from zoo.data.scoring import case_scores
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
