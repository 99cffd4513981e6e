import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import tiny_model
from zoo.models.flops import count_params, decoder_flops_per_box, encoder_flops, model_size


def _real_flops(fn, model, *args) -> int:
    model.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def test_counts_on_meta_equal_counts_on_real_tensors_and_leave_the_model_alone():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = model_size(model)
    assert sizes["params"] == count_params(model) > 0
    assert all(p.device.type == "cpu" and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    size = model.config.encoder.embedding_size
    assert encoder_flops(model) == _real_flops(model.embed, model, torch.rand(1, 3, 256, 256)) > 0
    assert decoder_flops_per_box(model) == _real_flops(model.decode, model, torch.rand(1, 256, size, size),
                                                       torch.tensor([[40.0, 50.0, 180.0, 200.0]]), 0) > 0
