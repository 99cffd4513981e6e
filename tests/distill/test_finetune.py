import shutil

import numpy as np
import pytest
import torch

from distill.finetune import CLICK_PROMPT_PARTS, build_model, main
from tests.helpers import TINY_STUDENT, empty_zoo, write_npz
from zoo.data.io import load_case, read_csv
from zoo.data.preprocess import box_from_mask
from zoo.models.checkpoint import load_checkpoint, save_checkpoint
from zoo.models.class_prompt import ClassPromptSAM
from zoo.predict import ModalityChoice, segment_case


def _case(path, rng, modality_shift):
    gts = np.zeros((40, 48), np.uint8)
    gts[5 + modality_shift : 25, 8:30] = 1
    gts[28:36, 30:44] = 2
    write_npz(path, imgs=rng.integers(0, 255, (40, 48, 3), dtype=np.uint8),
              boxes=np.array([[8, 5 + modality_shift, 29, 24], [30, 28, 43, 35]]), gts=gts)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    train, val = tmp_path / "train", tmp_path / "val"
    train.mkdir()
    val.mkdir()
    for i in range(4):
        _case(train / f"2DBox_{'US' if i % 2 else 'Dermoscopy'}_{i}.npz", rng, i)
    volume_gts = np.zeros((12, 32, 32), np.uint8)
    volume_gts[2:9, 8:20, 10:24] = 1  # slices 0, 5, 10 taken; only slice 5 has an object
    write_npz(train / "3DBox_CT_0.npz", imgs=rng.integers(0, 255, (12, 32, 32), dtype=np.uint8),
              boxes=np.array([[10, 8, 2, 23, 19, 8]]), gts=volume_gts, spacing=np.array([2.0, 1.0, 1.0]))
    for i in range(2):
        _case(val / f"2DBox_US_v{i}.npz", rng, i)
    student = ClassPromptSAM(TINY_STUDENT)
    save_checkpoint(tmp_path / "tiny.pt", student, {"stage": "distill"})
    return tmp_path


def _args(data, out, *extra):
    return ["--init", str(data / "tiny.pt"), "--data", str(data / "train"), "--val", str(data / "val"),
            "--out", str(out), "--cache-dir", str(data / "cache"), "--batch-size", "2", "--epochs", "2",
            "--threads", "1", "--checkpoint-every", "1", "--head-epochs", "100", *extra]


def test_finetune_trains_selects_and_ships_a_zoo_checkpoint(data, capsys):
    out = data / "out"
    assert main(_args(data, out)) == 0
    model, meta = load_checkpoint(out / "best.pt")
    assert model.has_modality_head and meta["stage"] == "finetune" and meta["class_prompt"]
    assert meta["samples"] == 5 and meta["val_samples"] == 2  # the volume's empty slices are skipped
    assert set(meta["val"]["per_modality"]) == {"US"} and 0 <= meta["val"]["head_accuracy"] <= 1
    rows = read_csv(out / "val.csv")
    assert [int(r["step"]) for r in rows] == [2, 4]  # one validation per epoch of 2 steps
    assert max(float(r["score"]) for r in rows) == pytest.approx(meta["val"]["score"], abs=1e-4)
    assert (out / "confusion.png").stat().st_size > 0
    # only the decoder, the head and the class prompt moved; the frozen encoder did not
    start = ClassPromptSAM(TINY_STUDENT)
    start.load_state_dict(load_checkpoint(data / "tiny.pt")[0].state_dict())
    final = model
    for name, before in start.image_encoder.state_dict().items():
        assert torch.equal(before, final.image_encoder.state_dict()[name]), name
    assert not torch.equal(start.mask_decoder.output_upscaling[0].weight, final.mask_decoder.output_upscaling[0].weight)
    # the result segments a case through the zoo's inference path, naming the modality it used
    case = load_case(data / "val" / "2DBox_US_v0.npz")
    result = segment_case(model, case, ModalityChoice(model, "head"))
    assert result.segs.shape == (40, 48) and result.modality_source == "head"


def test_resume_continues_exactly(data):
    full, cut = data / "full", data / "cut"
    assert main(_args(data, full)) == 0
    cut.mkdir()
    shutil.copy(full / "previous.pt", cut / "last.pt")  # the state after step 3 of 4, as a run killed there left it
    shutil.copy(full / "best.pt", cut / "best.pt")  # (and the best checkpoint it had written)
    assert main(_args(data, cut, "--resume")) == 0
    a, b = torch.load(full / "last.pt", weights_only=True), torch.load(cut / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert read_csv(full / "val.csv") == read_csv(cut / "val.csv")
    a, b = load_checkpoint(full / "best.pt"), load_checkpoint(cut / "best.pt")  # the head refit is seeded too
    assert torch.equal(a[0].modality_head.mlp[0].weight, b[0].modality_head.mlp[0].weight)


def test_ablation_has_no_class_prompt(data):
    out = data / "ablation"
    assert main(_args(data, out, "--no-class-prompt", "--epochs", "1")) == 0
    model, meta = load_checkpoint(out / "best.pt")
    assert not model.has_modality_head and meta["class_prompt"] is False
    assert not (out / "confusion.png").exists()


def test_light_decoder_starts_from_the_checkpoints_decoder_and_is_kept(data):
    """--decoder-token-stride 2 fine-tunes the light decoder (zoo.models.pooled_decoder) from the init's SAM decoder
    weights; the result records the stride, so zoo.load rebuilds the light decoder."""
    from zoo.models.pooled_decoder import PooledTwoWayTransformer

    start = build_model(str(data / "tiny.pt"), class_prompt=True, decoder_token_stride=2)
    source, _ = load_checkpoint(data / "tiny.pt")
    assert isinstance(start.mask_decoder.transformer, PooledTwoWayTransformer)
    for name, tensor in source.mask_decoder.state_dict().items():
        assert torch.equal(tensor, start.mask_decoder.state_dict()[name]), name
    out = data / "light"
    assert main(_args(data, out, "--decoder-token-stride", "2", "--epochs", "1")) == 0
    model, meta = load_checkpoint(out / "best.pt")
    assert isinstance(model.mask_decoder.transformer, PooledTwoWayTransformer) and meta["decoder_token_stride"] == 2


def test_build_model_from_litemedsam_starts_as_litemedsam(litemedsam):
    model = build_model("litemedsam", class_prompt=True)
    assert model.has_modality_head and not model.class_prompt.weight.any()
    for name, tensor in litemedsam.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_build_model_takes_a_zoo_checkpoint_by_name(data, tmp_path, monkeypatch):
    import zoo.index

    empty_zoo(tmp_path, monkeypatch)
    zoo.index.add_model("tiny", data / "tiny.pt")
    torch.manual_seed(0)  # the checkpoint has no head: each build makes a fresh one
    by_name = build_model("tiny", class_prompt=True)
    torch.manual_seed(0)
    by_path = build_model(str(data / "tiny.pt"), class_prompt=True)
    for name, tensor in by_path.state_dict().items():
        assert torch.equal(tensor, by_name.state_dict()[name]), name


def test_clear_errors(data, capsys):
    assert main(_args(data, data / "o", "--init", str(data / "missing.pt"))) == 2
    assert "missing.pt" in capsys.readouterr().err
    no_gts = data / "nogts"
    no_gts.mkdir()
    write_npz(no_gts / "2DBox_US_x.npz", imgs=np.zeros((8, 8, 3), np.uint8), boxes=np.array([[1, 1, 5, 5]]))
    assert main(_args(data, data / "o2", "--data", str(no_gts))) == 2
    assert "2DBox_US_x.npz: no 'gts'" in capsys.readouterr().err


def test_fit_modality_head_learns_separable_modalities():
    from distill.finetune import fit_modality_head
    from zoo.models.class_prompt import ModalityHead

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 256, generator=g) * 0.05  # pooled embeddings are small and close together
    labels = torch.arange(3).repeat_interleave(20)
    features = centers[labels] + 0.01 * torch.randn(60, 256, generator=g)
    head = ModalityHead()
    fit_modality_head(head, features, labels, epochs=300)
    with torch.inference_mode():
        assert (head.mlp(features).argmax(dim=1) == labels).float().mean() == 1.0


def test_out_is_never_an_input(data, capsys):
    for out in (data / "train", data / "val", data):  # data folders; the folder holding the --init checkpoint
        assert main(_args(data, out)) == 2
        assert "--out is the" in capsys.readouterr().err
    assert not (data / "best.pt").exists() and not list((data / "train").glob("*.pt"))


def test_head_only_refits_the_head_of_a_distilled_student(data, capsys):
    out = data / "head"
    out.mkdir()
    # a distilled student with a head (from --decoder-from) but, as distillation writes it, no validation metadata
    before = build_model(str(data / "tiny.pt"), class_prompt=True)
    save_checkpoint(out / "best.pt", before, {"stage": "distill"})
    assert main(_args(data, out, "--head-only")) == 0
    model, meta = load_checkpoint(out / "best.pt")
    assert 0 <= meta["val"]["head_accuracy"] <= 1 and "modality head fitted" in capsys.readouterr().out
    assert not torch.equal(before.modality_head.mlp[0].weight, model.modality_head.mlp[0].weight)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.state_dict().items() if not k.startswith("modality_head."))


def test_click_stage_trains_by_simulated_interaction_and_selects_by_the_protocol(data):
    """--clicks 2: each sample the box step then two simulated clicks, every step in the loss; the init is scored
    first (its box-only DSC is the bar) and every epoch by the protocol on the val samples; the head and the encoder
    do not train, the decoder and the click parts of the prompt encoder do."""
    out = data / "clicks"
    # one train and one val sample (one step an epoch): quick, and every part still runs
    assert main(_args(data, out, "--clicks", "2", "--click-val-samples", "1", "--decoder-token-stride", "2",
                      "--click-parts", "decoder", "--max-samples", "1", "--batch-size", "1")) == 0
    rows = read_csv(out / "val.csv")
    assert [int(r["epoch"]) for r in rows] == [-1, 0, 1] and [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(r["dsc_step0"] == r["dsc"] or abs(float(r["dsc_step0"]) - float(r["dsc"])) < 1e-9 for r in rows)
    assert all(r["dsc_step2"] != "" and r["box_dsc_kept"] in ("yes", "no") for r in rows) and rows[0]["box_dsc_kept"] == "yes"
    model, meta = load_checkpoint(out / "best.pt")
    assert meta["settings"]["clicks"] == 2 and set(meta["val"]["clicks"]["per_modality"]) == {"US"}
    kept = [r for r in rows if r["box_dsc_kept"] == "yes"]
    assert meta["val"]["clicks"]["score"] == pytest.approx(max(float(r["click_score"]) for r in kept), abs=1e-4)
    torch.manual_seed(0)  # the run's seed: the same fresh head and zero class prompt as its start
    start = build_model(str(data / "tiny.pt"), class_prompt=True, decoder_token_stride=2)
    before, after = start.state_dict(), model.state_dict()
    if meta["steps"]:  # an epoch was kept: it trained what a click needs, and nothing else
        assert not torch.equal(before["prompt_encoder.mask_downscaling.0.weight"], after["prompt_encoder.mask_downscaling.0.weight"])
        assert not torch.equal(before["mask_decoder.iou_token.weight"], after["mask_decoder.iou_token.weight"])
    for name in before:
        if name.startswith(("image_encoder.", "modality_head.", "prompt_encoder.point_embeddings.2", "prompt_encoder.no_mask")):
            assert torch.equal(before[name], after[name]), name


def test_click_stage_on_the_prompt_parts_leaves_box_only_masks_exactly_the_inits(data):
    out = data / "prompt"
    assert main(_args(data, out, "--clicks", "1", "--click-val-samples", "1", "--click-parts", "prompt",
                      "--epochs", "1", "--box-tolerance", "1", "--max-samples", "1", "--batch-size", "1")) == 0
    torch.manual_seed(0)
    start = build_model(str(data / "tiny.pt"), class_prompt=True)
    model = build_model(str(data / "tiny.pt"), class_prompt=True)
    model.load_state_dict(torch.load(out / "last.pt", weights_only=True)["model"])  # the trained weights
    before, after = start.state_dict(), model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(("prompt_encoder.point_embeddings.0", "prompt_encoder.point_embeddings.1",
                                            "prompt_encoder.not_a_point", "prompt_encoder.mask_downscaling"))
                           for name in changed), changed
    embedding, boxes = torch.randn(1, 256, 64, 64), torch.tensor([[4.0, 5.0, 30.0, 40.0]])
    with torch.inference_mode():
        assert torch.equal(start.decode(embedding, boxes, 3), model.decode(embedding, boxes, 3))


def test_a_separate_click_decoder_leaves_the_box_decoder_and_box_only_masks_exactly_the_inits(data):
    """--click-parts separate (the default): the click decoder starts as the box decoder (or --click-decoder-from's),
    only it and the click prompt parts train; box-only decodes are the init's bit for bit, clicks go to the new one."""
    first = data / "first"
    assert main(_args(data, first, "--clicks", "1", "--click-val-samples", "1", "--epochs", "1", "--max-samples", "1", "--batch-size", "1")) == 0
    torch.manual_seed(0)
    start = build_model(str(data / "tiny.pt"), class_prompt=True)
    model = load_checkpoint(first / "best.pt")[0]
    assert model.config.click_decoder and not start.config.click_decoder
    assert model.clicks_trained and not start.clicks_trained  # zoo.segment and the app warn only on untrained ones
    trained = build_model(str(first / "best.pt"), class_prompt=True)
    trained.load_state_dict(torch.load(first / "last.pt", weights_only=True)["model"])
    before, after = start.state_dict(), trained.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(CLICK_PROMPT_PARTS))
    assert any(not torch.equal(after[f"click_mask_decoder.{k}"], v) for k, v in start.mask_decoder.state_dict().items())
    embedding, boxes = torch.randn(1, 256, 64, 64), torch.tensor([[4.0, 5.0, 30.0, 40.0]])
    click = dict(points=torch.tensor([[[10.0, 20.0]]]), point_labels=torch.ones(1, 1))
    with torch.inference_mode():
        assert torch.equal(start.decode(embedding, boxes, 3), trained.decode(embedding, boxes, 3))
        assert not torch.equal(start.decode(embedding, boxes, 3, **click), trained.decode(embedding, boxes, 3, **click))
    rows = read_csv(first / "val.csv")
    assert len({r["dsc"] for r in rows}) == 1 and all(r["box_dsc_kept"] == "yes" for r in rows)  # scored once

    # a second stage takes its click decoder from the first one's checkpoint
    second = data / "second"
    assert main(_args(data, second, "--clicks", "1", "--click-val-samples", "1", "--epochs", "1", "--max-steps", "1",
                      "--click-decoder-from", str(first / "last_weights.pt"))) == 2  # a missing file is named
    save_checkpoint(data / "donor.pt", trained)
    assert main(_args(data, second, "--clicks", "1", "--click-val-samples", "1", "--epochs", "1", "--max-steps", "1",
                      "--max-samples", "1", "--batch-size", "1", "--click-decoder-from", str(data / "donor.pt"))) == 0
    assert load_checkpoint(second / "best.pt")[1]["click_decoder_from"] == str(data / "donor.pt")


def test_click_zoom_gives_a_small_objects_clicks_on_its_zoom_crop(data, monkeypatch):
    """--click-zoom: an object zoo.interactive would zoom on (16 px in a 512 px image: a 128 px crop, 2x at the
    crop's 256 frame against 0.5x at the whole image's) takes its clicks on that crop, its box step's logits carried
    there; the stage trains and selects as without it."""
    from distill.finetune import FineTuner

    small = data / "small"
    small.mkdir()
    gts = np.zeros((512, 512), np.uint8)
    gts[200:216, 300:316] = 1
    write_npz(small / "2DBox_X-Ray_0.npz", imgs=np.random.default_rng(1).integers(0, 255, (512, 512, 3), dtype=np.uint8),
              boxes=np.array([[300, 200, 315, 215]]), gts=gts)
    carried = []
    into_crop = FineTuner._into_crop

    def spy(self, crop, logits):
        result = into_crop(self, crop, logits)
        carried.append((crop, logits, result))
        return result

    monkeypatch.setattr(FineTuner, "_into_crop", spy)
    args = _args(data, data / "zoomed", "--clicks", "2", "--click-val-samples", "1", "--click-zoom", "--epochs", "1",
                 "--batch-size", "1", "--box-jitter", "0")
    args[args.index("--data") + 1] = str(small)
    assert main(args) == 0 and carried
    crop, logits, (embedding, box, mask, area, prompt) = carried[0]
    assert crop["crop"].scale == 0.5 and crop["whole"].scale == 2.0  # a 128 px crop; the 512 px image
    assert embedding.shape == (256, 64, 64) and prompt.shape == logits.shape == (1, 256, 256)
    assert mask.sum() == 16 * 16 / 0.25 and area.all()  # the object 32 x 32 px at the crop's frame (16x its area)
    ys, xs = np.nonzero(mask[0].numpy())  # box and mask flipped alike
    x0, y0, x1, y1 = box.tolist()
    # the box holds it, to the whole frame's pixel its 256 box was truncated to (4 crop pixels), as at inference
    assert x0 - 4 <= xs.min() and xs.max() <= x1 + 4 and y0 - 4 <= ys.min() and ys.max() <= y1 + 4
    assert read_csv(data / "zoomed" / "val.csv")


def _ring_case(folder):
    """A sparse object: a square ring 4 px wide, 300 px across, in a 512 px image (too large for a zoom crop)."""
    folder.mkdir()
    gts = np.zeros((512, 512), np.uint8)
    gts[100:400, 100:400] = 1
    gts[104:396, 104:396] = 0
    write_npz(folder / "2DBox_Fundus_0.npz", imgs=np.random.default_rng(2).integers(0, 255, (512, 512, 3), dtype=np.uint8),
              boxes=np.array([[100, 100, 399, 399]]), gts=gts)
    return gts


def _spy_decodes(monkeypatch):
    import distill.finetune as finetune

    calls, truths = [], []
    decode, loss = finetune.decode_batch, finetune.segmentation_loss

    def decode_spy(model, embedding, boxes, modality, **clicks):
        logits = decode(model, embedding, boxes, modality, **clicks)
        calls.append((embedding, boxes, clicks, logits))
        return logits

    monkeypatch.setattr(finetune, "decode_batch", decode_spy)
    monkeypatch.setattr(finetune, "segmentation_loss", lambda logits, truth, w: truths.append(truth) or loss(logits, truth, w))
    return calls, truths


def test_click_carry_decodes_a_neighbouring_slice_with_the_latest_logits_as_its_only_prompt(data, monkeypatch):
    """--click-carry: a volume's sample, after its clicks, decodes its slice's neighbour (4 or 6 of slice 5) with the
    box of its latest mask and its latest logits as the mask prompt, and no clicks, as zoo.interactive carries a
    click's correction; that decode is in the loss against the neighbour's mask, flipped as the sample."""
    volume = data / "volume"
    volume.mkdir()
    shutil.copy(data / "train" / "3DBox_CT_0.npz", volume)
    calls, truths = _spy_decodes(monkeypatch)
    args = _args(data, data / "carried", "--clicks", "1", "--click-val-samples", "1", "--click-carry", "--epochs", "1",
                 "--batch-size", "1", "--box-jitter", "0")
    args[args.index("--data") + 1] = str(volume)
    assert main(args) == 0
    # one training step: the box, one click, the carry
    assert [sorted(c[2]) for c in calls] == [[], ["mask_input", "point_labels", "points"], ["mask_input"]]
    (box_embedding, _, _, _), (_, _, _, clicked), (embedding, box, carried, _) = calls
    assert torch.equal(carried["mask_input"], clicked)  # the click step's logits, as they came out
    mask = (clicked[0, 0] > 0).numpy().astype(np.uint8)
    assert mask.any() and box[0].tolist() == box_from_mask(mask).tolist()  # widened as zoo.interactive widens it
    assert embedding.shape == box_embedding.shape and not torch.equal(embedding, box_embedding)  # the neighbour's
    assert len(truths) == 3 and torch.equal(truths[2][0], truths[1][0])  # slices 4..6 hold the same rectangle
    assert read_csv(data / "carried" / "val.csv")


def test_click_focus_decodes_a_sparse_objects_click_again_on_the_crop_around_it(data, monkeypatch):
    """--click-focus: a sparse object's click (its mask under SPARSE_FILL of its box) is decoded again on the focus
    crop around it, as zoo.interactive.refine_on_focus decodes it: the box clipped to the crop, the click inside it
    and the click step's logits carried in as the mask prompt; the crop's mask in the loss, and the next click starts
    from the whole frame's logits with the crop's answer pasted in."""
    import distill.finetune as finetune
    from zoo.data.samples import Sample, object_crop
    from zoo.interactive import focus_window, full_frame, paste_focus, resample_logits, window_frame

    gts = _ring_case(data / "ring")
    calls, truths = _spy_decodes(monkeypatch)
    monkeypatch.setattr(finetune, "SPARSE_FILL", float("inf"))  # every mask counts as sparse: the focus always runs
    args = _args(data, data / "focused", "--clicks", "2", "--click-val-samples", "1", "--click-focus", "--epochs", "1",
                 "--batch-size", "1", "--box-jitter", "0", "--no-flip", "--max-steps", "1")
    args[args.index("--data") + 1] = str(data / "ring")
    assert main(args) == 0
    # one training step: the box; the first click, its focus crop; the second click, its focus crop
    assert [sorted(c[2]) for c in calls[:5]] == [[]] + [["mask_input", "point_labels", "points"]] * 4
    (_, _, _, box_logits), (whole_embedding, box, first, clicked), (embedding, crop_box, focus, answer) = calls[:3]
    assert torch.equal(first["mask_input"], box_logits)
    x, y = first["points"][0, 0].tolist()
    window = focus_window((x, y), gts.shape)
    assert window[2] - window[0] == window[3] - window[1] == 128  # a quarter of the long side, around the click
    crop = window_frame(window)
    assert not torch.equal(embedding, whole_embedding) and embedding.shape == whole_embedding.shape
    # the click in the crop's frame (4x), the box clipped to the crop
    assert focus["points"][0, 0].tolist() == pytest.approx([(x * 2 - window[0]) * 2, (y * 2 - window[1]) * 2])
    assert focus["point_labels"][0, 0] == first["point_labels"][0, 0]
    expected_box = np.clip((box[0].numpy().reshape(2, 2) * 2 - np.array(window[:2])) * 2, 0, 256)
    assert crop_box[0].tolist() == pytest.approx(expected_box.reshape(4).tolist())
    assert torch.allclose(focus["mask_input"][0], resample_logits(clicked[0], full_frame(gts.shape), crop))
    _, mask, _ = object_crop(Sample(data / "ring" / "2DBox_Fundus_0.npz", None, "Fundus"), 1, window)
    assert torch.equal(truths[2][0], mask)  # the losses: box, click, focus crop, ...
    # the second click starts from the whole frame's logits with the crop's answer pasted into its window
    second = calls[3][2]
    assert torch.allclose(second["mask_input"][0], paste_focus(clicked[0], answer[0], window, gts.shape))
    assert not torch.equal(second["mask_input"], clicked)
    assert read_csv(data / "focused" / "val.csv")


@pytest.mark.parametrize("flips", [(True, False), (False, True), (True, True)])
def test_click_focus_flips_the_crop_as_the_sample(data, monkeypatch, flips):
    """A flipped sample's focus crop is the crop around its click unflipped, flipped back: its click and clipped box
    there are flipped as the crop's mask, and the click lies on that mask where it is positive, off it where it is
    negative (the ring is 8 px wide at the crop's frame)."""
    import distill.finetune as finetune
    from zoo.data.samples import flip_box, flip_point
    from zoo.interactive import focus_window

    gts = _ring_case(data / "ring")
    calls, truths = _spy_decodes(monkeypatch)
    monkeypatch.setattr(finetune, "SPARSE_FILL", float("inf"))
    monkeypatch.setattr(finetune.torch, "rand", lambda n, generator=None: torch.tensor([0.0 if f else 1.0 for f in flips]))
    args = _args(data, data / "flipped", "--clicks", "1", "--click-val-samples", "1", "--click-focus", "--epochs", "1",
                 "--batch-size", "1", "--box-jitter", "0", "--max-steps", "1")
    args[args.index("--data") + 1] = str(data / "ring")
    assert main(args) == 0
    focus, truth = calls[2][2], truths[2][0, 0]
    (x, y), positive = focus["points"][0, 0].tolist(), focus["point_labels"][0, 0].item()
    assert positive in (0.0, 1.0) and truth[round(y), round(x)].item() == positive
    # at the whole frame the click and box are flipped; unflipped, they give the window, and in it, flipped back
    xu, yu = flip_point(*calls[1][2]["points"][0, 0].tolist(), *flips)
    window = focus_window((xu, yu), gts.shape)
    in_crop = lambda px, py: flip_point((px * 2 - window[0]) * 2, (py * 2 - window[1]) * 2, *flips)  # noqa: E731
    assert (x, y) == pytest.approx(in_crop(xu, yu))
    # the box: unflipped, into the crop, clipped to it (0..256), flipped there as flip_box flips it
    bx0, by0, bx1, by1 = flip_box(calls[1][1][0], *flips).tolist()
    clipped = np.clip([(bx0 * 2 - window[0]) * 2, (by0 * 2 - window[1]) * 2, (bx1 * 2 - window[0]) * 2,
                       (by1 * 2 - window[1]) * 2], 0, 256)
    assert calls[2][1][0].tolist() == pytest.approx(flip_box(torch.tensor(clipped), *flips).tolist())


def test_click_focus_leaves_objects_whose_mask_fills_their_box(data, monkeypatch):
    import distill.finetune as finetune

    _ring_case(data / "ring")
    calls, _ = _spy_decodes(monkeypatch)
    monkeypatch.setattr(finetune, "SPARSE_FILL", 0.0)  # no mask is sparse: no focus crop
    args = _args(data, data / "unfocused", "--clicks", "2", "--click-val-samples", "1", "--click-focus", "--epochs", "1",
                 "--batch-size", "1", "--box-jitter", "0", "--max-steps", "1")
    args[args.index("--data") + 1] = str(data / "ring")
    assert main(args) == 0
    assert len(calls) >= 3 and [sorted(c[2]) for c in calls[:3]] == [[]] + [["mask_input", "point_labels", "points"]] * 2
    assert torch.equal(calls[2][2]["mask_input"], calls[1][3])  # the next click starts from the click's own logits


@pytest.mark.parametrize("flag", ["--click-zoom", "--click-carry", "--click-focus"])
def test_click_options_need_the_click_stage(data, capsys, flag):
    assert main(_args(data, data / "x", flag)) == 2
    assert f"{flag} is about the click stage" in capsys.readouterr().err
