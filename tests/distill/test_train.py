import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from distill.cache import EmbeddingCache
from distill.train import Trainer, TrainSettings, epoch_batches, load_training_state
from tests.helpers import TINY_STUDENT, CountingTeacher, write_npz
from zoo.data.io import TEMP_PREFIX, read_csv
from zoo.data.samples import find_samples
from zoo.models.class_prompt import ClassPromptSAM


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        gts = np.zeros((32, 32), np.uint8)
        gts[4 + i : 20, 6:25] = 1
        write_npz(data / f"2DBox_{'US' if i % 2 else 'CT'}_{i}.npz", imgs=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                  boxes=np.array([[6, 4 + i, 24, 19]]), gts=gts)
    samples = find_samples([data])
    cache = EmbeddingCache(tmp_path / "cache", "t")
    keys = cache.build(samples, CountingTeacher(), progress=False)
    return samples, keys, cache


def make_trainer(setup, out_dir, **overrides):
    torch.manual_seed(0)
    samples, keys, cache = setup
    settings = TrainSettings(out_dir=out_dir, epochs=2, batch_size=2, lr=1e-3, checkpoint_every=2, device="cpu",
                             mask_loss_weight=0.5, **overrides)
    return Trainer(ClassPromptSAM(TINY_STUDENT), samples, keys, cache, settings)


def losses(out_dir):
    return [(int(r["step"]), r["loss"]) for r in read_csv(out_dir / "log.csv")]


@pytest.fixture
def one_thread():
    """Bit-exact comparisons need one thread: on some CPUs (an AVX-512 EPYC here) two identical 2-thread runs
    already differ in the last bits, since parallel reductions may sum in another order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_continues_exactly(setup, tmp_path, one_thread):
    full = make_trainer(setup, tmp_path / "full")
    full.fit(progress=False)
    assert full.step == 6

    first = make_trainer(setup, tmp_path / "split", max_steps=4)
    first.fit(progress=False)
    second = make_trainer(setup, tmp_path / "split")
    second.restore(load_training_state(tmp_path / "split"))
    assert second.step == 4
    second.fit(progress=False)

    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # same next-step losses, one log
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, second.student.state_dict()[key]), key
    assert not any(p.name.startswith(TEMP_PREFIX) for p in (tmp_path / "split").iterdir())


def test_only_the_encoder_learns(setup, tmp_path):
    trainer = make_trainer(setup, tmp_path / "run", max_steps=1)
    decoder_before = {k: v.clone() for k, v in trainer.student.mask_decoder.state_dict().items()}
    encoder_before = trainer.student.image_encoder.patch_embed.seq[0].conv.weight.clone()
    trainer.fit(progress=False)
    for k, v in trainer.student.mask_decoder.state_dict().items():
        assert torch.equal(v, decoder_before[k])
    assert not torch.equal(trainer.student.image_encoder.patch_embed.seq[0].conv.weight, encoder_before)


def test_train_parts_moves_only_that_part_and_freezes_the_rest_batch_norms_included(setup, tmp_path):
    """--train-parts fusion: a high-resolution path learns on a trained student whose weights and batch-norm
    running statistics stay exactly as they were."""
    samples, keys, cache = setup
    torch.manual_seed(0)
    model = ClassPromptSAM(replace(TINY_STUDENT, encoder=replace(TINY_STUDENT.encoder, fuse_stages=(0,), fuse_dim=4)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(out_dir=tmp_path / "run", epochs=1, batch_size=2, lr=1e-2, train_parts="fusion")
    Trainer(model, samples, keys, cache, settings).fit(progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("image_encoder.fusion.") for k in changed)
    with pytest.raises(ValueError, match="no part named 'fusoin'"):
        Trainer(ClassPromptSAM(TINY_STUDENT), samples, keys, cache, replace(settings, train_parts="fusoin"))


def test_corrupt_last_checkpoint_falls_back_to_previous(setup, tmp_path):
    trainer = make_trainer(setup, tmp_path / "run", max_steps=4)
    trainer.fit(progress=False)
    (tmp_path / "run" / "last.pt").write_bytes(b"truncated")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = load_training_state(tmp_path / "run")
    assert state["step"] == 2
    assert any("last.pt" in str(w.message) for w in caught)


def test_epoch_batches_are_seeded_and_balanced(setup, tmp_path):
    samples = setup[0]
    settings = TrainSettings(out_dir=tmp_path, batch_size=2, device="cpu")
    assert epoch_batches(samples, settings, 0) == epoch_batches(samples, settings, 0)
    assert epoch_batches(samples, settings, 0) != epoch_batches(samples, settings, 1)
    assert all(len(b) == 2 for b in epoch_batches(samples, settings, 3))


def test_the_mask_loss_decodes_with_each_samples_modality_through_a_class_prompt(setup, tmp_path, monkeypatch):
    from zoo.modalities import modality_id

    samples, keys, cache = setup
    settings = TrainSettings(out_dir=tmp_path / "run", epochs=1, batch_size=2, device="cpu", mask_loss_weight=1.0,
                             max_steps=2, flip=False)
    student = ClassPromptSAM(replace(TINY_STUDENT, class_prompt=True))
    trainer = Trainer(student, samples, keys, cache, settings)
    seen = []
    decode = student.decode
    monkeypatch.setattr(student, "decode", lambda embedding, boxes, modality=None: seen.append(modality) or decode(embedding, boxes, modality))
    trainer.fit(progress=False)
    # per step: the student's two samples, then the teacher's, each with that sample's modality (not the head's guess)
    expected = [modality_id(samples[i].modality) for batch in epoch_batches(samples, settings, 0)[:2] for i in batch]
    assert seen == expected[:2] * 2 + expected[2:] * 2 and None not in seen


def test_the_ground_truth_loss_is_dice_and_focal_of_the_students_mask_for_the_drawn_object(setup, tmp_path):
    from distill.losses import embedding_loss, segmentation_loss
    from zoo.data.samples import sample_object, sample_tensor

    samples, keys, cache = setup
    student = ClassPromptSAM(TINY_STUDENT).eval()  # no dropout: the same forward twice
    settings = TrainSettings(out_dir=tmp_path / "run", batch_size=2, device="cpu", flip=False, gt_loss_weight=2.0)
    loss = Trainer(student, samples, keys, cache, settings)._micro_batch_loss([0, 3], torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)  # without flips the generator draws only the objects, in sample order
    objects = [sample_object(samples[i], g) for i in (0, 3)]
    with torch.no_grad():
        embeddings = student.image_encoder(torch.stack([sample_tensor(samples[i]) for i in (0, 3)]))
        logits = torch.cat([student.decode(embeddings[j : j + 1], box[None]) for j, (box, _) in enumerate(objects)])
        targets = torch.stack([cache.get(keys[i]).float() for i in (0, 3)])
        expected = embedding_loss(embeddings, targets) + 2.0 * segmentation_loss(logits, torch.stack([m for _, m in objects]))
    # 1e-3: the trainer's and this recomputation's float sums differ by 1.5e-4 relative on AVX-512 CPUs (oneDNN picks
    # other kernels there); a wrong term or weight is off by far more.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)
    assert segmentation_loss(logits, torch.stack([m for _, m in objects])).item() > 0.1  # the term is not negligible
