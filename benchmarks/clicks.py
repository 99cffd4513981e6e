"""The interactive protocol of the CVPR 2025 challenge ("Foundation Models for Interactive 3D Biomedical Image
Segmentation"), run by `python -m benchmarks.run --clicks 5` on every case, and scored from saved steps by
`python -m benchmarks.evaluate --clicks 5`.

A case is segmented from its boxes (step 0: the box-only result, zoo.predict's bit for bit), then refined by 5
simulated clicks (steps 1..5): at each step every object gets one click at the centre of its largest error component
(zoo.interactive.next_click, on the whole label map: 2D on the image, 3D in the volume), positive on missed object,
negative on false object; its slice is decoded again with its clicks and the previous logits (a small object on a
zoom crop, a sparse one refined on a focus crop around the click, unless --no-zoom), and in 3D propagation is rerun from that slice outward (zoo.interactive.Refinement).
DSC and NSD are scored after every step, as the challenge scores them; DSC_AUC and NSD_AUC are the trapezoid under
the click steps' scores, as CVPR25_iter_eval.py computes them (zoo.interactive.interaction_auc: its AUC leaves the
box step out; with 5 clicks it lies in 0..4).

cases.csv gains dsc_1..dsc_5, nsd_1..nsd_5 (dsc, nsd stay the box step's), dsc_auc, nsd_auc, click_seconds (the
time of one step, all objects, the image's embeddings kept: the decoder, and the crops' encoder runs) and
crop_embeddings (the encoder runs on zoom and focus crops over the case's clicks); the leaderboard gains per modality
the AUCs and the DSC after the last click, their means over modalities, click_zoom (whether crops were used),
click_ms (one click on a 256² image, its embedding cached: the decoder alone, at steady state by benchmarks.latency's
rule) and dsc_clicks_gain (mean DSC after the last click minus the box-only mean); clicks.csv holds the curves (mean
DSC and NSD per model, modality and step) that clicks.png plots.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from benchmarks.latency import BUDGET_S, steady_seconds
from zoo.data.io import Case, write_csv_atomic
from zoo.data.preprocess import IMAGE_SIZE
from zoo.data.scoring import case_scores
from zoo.interactive import CLICK_SEED, PROTOCOL_CLICKS, Refinement, interaction_auc
from zoo.modalities import MODALITIES
from zoo.predict import ModalityChoice

CURVE_FIELDS = ["model", "modality", "step", "cases", "dsc", "nsd"]


def case_fields(clicks: int) -> list[str]:
    """cases.csv's columns beside the box step's dsc and nsd."""
    return ([f"dsc_{k}" for k in range(1, clicks + 1)] + [f"nsd_{k}" for k in range(1, clicks + 1)]
            + ["dsc_auc", "nsd_auc", "click_seconds", "crop_embeddings"])


def leaderboard_fields() -> list[str]:
    """The leaderboard's click columns (empty in a box-only run's rows)."""
    return (["clicks", "click_zoom", "click_ms", "dsc_clicks_mean_modalities", "nsd_clicks_mean_modalities",
             "dsc_clicks_gain", "dsc_auc_mean_modalities", "nsd_auc_mean_modalities"]
            + [f"{metric}_{m}" for m in MODALITIES for metric in ("dsc_clicks", "dsc_auc", "nsd_auc")])


def run_protocol(model, case: Case, modalities: ModalityChoice, clicks: int = PROTOCOL_CLICKS,
                 seed: int = CLICK_SEED, zoom: bool = True) -> dict:
    """One case through the protocol: {'steps': [segs of each step], 'dsc': [...], 'nsd': [...], 'seconds': the
    box-only segmentation's, 'click_seconds': the mean time of a click step, 'crop_embeddings': the encoder runs on
    zoom and focus crops}. The case needs gts."""
    spacing = case.spacing.tolist()
    with torch.inference_mode():
        refinement = Refinement(model, case, modalities, zoom=zoom)
        steps = [refinement.segs]
        for _ in range(clicks):
            refinement.simulate(case.gts, seed)
            steps.append(refinement.segs)
    scores = [case_scores(case.gts, segs, spacing) for segs in steps]
    return {"steps": steps, "dsc": [d for d, _ in scores], "nsd": [n for _, n in scores],
            "seconds": refinement.box_seconds, "click_seconds": refinement.decode_seconds / max(clicks, 1),
            "crop_embeddings": refinement.crop_embeddings, "head_modality": refinement.result.head_modality}


def step_scores(row: dict, dscs: list[float], nsds: list[float], clicks: int) -> dict:
    """A cases.csv row with the scores of every step (the box step as dsc, nsd) and the AUCs."""
    row.update(dsc=dscs[0], nsd=nsds[0], dsc_auc=interaction_auc(dscs, clicks), nsd_auc=interaction_auc(nsds, clicks))
    row.update({f"dsc_{k}": dscs[k] for k in range(1, clicks + 1)})
    row.update({f"nsd_{k}": nsds[k] for k in range(1, clicks + 1)})
    return row


def _value(row: dict, key: str) -> float:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else np.nan


def clicks_of(cases: list[dict]) -> int:
    """How many click steps the rows hold (0 for box-only rows)."""
    steps = 0
    while cases and all(_value(c, f"dsc_{steps + 1}") == _value(c, f"dsc_{steps + 1}") for c in cases):
        steps += 1
    return steps


def curves(cases: list[dict], clicks: int) -> list[dict]:
    """Mean DSC and NSD per model, modality and step (0: the box), then per model the means over modalities."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for case in cases:
        groups[(case["model"], case["modality"])].append(case)
    rows = []
    for model in dict.fromkeys(c["model"] for c in cases):
        modalities = [m for m in MODALITIES if (model, m) in groups] + sorted(
            m for (k, m) in groups if k == model and m not in MODALITIES)
        means = []
        for m in modalities:
            group = groups[(model, m)]
            for step in range(clicks + 1):
                keys = ("dsc", "nsd") if step == 0 else (f"dsc_{step}", f"nsd_{step}")
                means.append({"model": model, "modality": m, "step": step, "cases": len(group),
                              "dsc": float(np.mean([_value(c, keys[0]) for c in group])),
                              "nsd": float(np.mean([_value(c, keys[1]) for c in group]))})
        rows += means
        for step in range(clicks + 1):
            at_step = [r for r in means if r["step"] == step]
            rows.append({"model": model, "modality": "mean over modalities", "step": step,
                         "cases": sum(r["cases"] for r in at_step), "dsc": float(np.mean([r["dsc"] for r in at_step])),
                         "nsd": float(np.mean([r["nsd"] for r in at_step]))})
    return rows


def leaderboard_columns(cases: list[dict], clicks: int, zoom: bool = True) -> dict:
    """One model's click columns from its cases.csv rows: per modality the mean DSC after the last click and the
    mean AUCs, and their means over modalities (as the box-only columns, the mean of the modalities' means)."""
    by_modality: dict[str, list[dict]] = defaultdict(list)
    for case in cases:
        by_modality[case["modality"]].append(case)
    row = {"clicks": clicks, "click_zoom": "yes" if zoom else "no"}
    means = defaultdict(list)
    for m, group in by_modality.items():
        for key, column in ((f"dsc_{clicks}", "dsc_clicks"), ("dsc_auc", "dsc_auc"), ("nsd_auc", "nsd_auc"),
                            (f"nsd_{clicks}", "nsd_clicks"), ("dsc", "dsc_box")):
            value = float(np.mean([_value(c, key) for c in group]))
            means[column].append(value)
            if m in MODALITIES and column in ("dsc_clicks", "dsc_auc", "nsd_auc"):
                row[f"{column}_{m}"] = value
    for column in ("dsc_clicks", "nsd_clicks", "dsc_auc", "nsd_auc"):
        row[f"{column}_mean_modalities"] = float(np.mean(means[column]))
    row["dsc_clicks_gain"] = row["dsc_clicks_mean_modalities"] - float(np.mean(means["dsc_box"]))
    return row


def click_latency(model, budget_s: float = BUDGET_S, seed: int = 0) -> float:
    """Milliseconds of one click on a 256² image whose embedding is cached: the decoder alone, with the box, one
    positive click and the box step's logits as the mask prompt, at steady state (benchmarks.latency's rule, within
    `budget_s`)."""
    tensor = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    box = torch.tensor([[60.0, 70.0, 180.0, 200.0]])
    points, labels = torch.tensor([[[120.0, 130.0]]]), torch.tensor([[1.0]])
    with torch.inference_mode():
        embedding = model.embed(tensor)
        logits = model.decode(embedding, box, 0)
        seconds, _, _ = steady_seconds(
            lambda: model.decode(embedding, box, 0, points=points, point_labels=labels, mask_input=logits),
            budget_s=budget_s)
    return seconds * 1e3


def write_click_outputs(out: Path, cases: list[dict], rows: list[dict]) -> list[Path]:
    """OUT/clicks.csv (the curves) and OUT/clicks.png (DSC and NSD against the step, per modality) for the models
    with click steps; nothing when none has them."""
    from benchmarks.plots import click_curves_plot

    clicked = [c for c in cases if _value(c, "dsc_1") == _value(c, "dsc_1")]
    clicks = clicks_of(clicked)
    if not clicked or not clicks:
        return []
    table = curves(clicked, clicks)
    write_csv_atomic(out / "clicks.csv", [{**r, "dsc": f"{r['dsc']:.4f}", "nsd": f"{r['nsd']:.4f}"} for r in table],
                     CURVE_FIELDS)
    click_curves_plot(table, out / "clicks.png", {r["model"]: r for r in rows})
    return [out / "clicks.csv", out / "clicks.png"]


def summary(rows: list[dict], clicks: int) -> str:
    """One line per model: mean DSC over modalities with the box and after the last click, the AUCs, a click's ms."""
    lines = [f"interactive protocol, box + {clicks} clicks (means over modalities; AUC as CVPR25_iter_eval.py, 0..{clicks - 1}):"]
    for row in rows:
        if row.get("clicks", "") == "":
            continue
        ms = f"{row['click_ms']:.0f} ms per click" if row.get("click_ms", "") != "" else "click not timed"
        lines.append(f"  {row['model']}: DSC {row['dsc_mean_modalities']:.4f} -> {row['dsc_clicks_mean_modalities']:.4f} "
                     f"({row['dsc_clicks_gain']:+.4f}), DSC_AUC {row['dsc_auc_mean_modalities']:.4f}, NSD_AUC "
                     f"{row['nsd_auc_mean_modalities']:.4f}, {ms}")
    return "\n".join(lines)
