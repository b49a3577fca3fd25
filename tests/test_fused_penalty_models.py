"""fused_penalty equals the seed's per-parameter loop on real torch.nn models."""

import pytest
import torch
from torch import nn

import regext
from regext.reference import penalty_float64, penalty_loop

from conftest import TOLERANCES, grads_of


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def transformer():
    return nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)


class EmbeddingGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.gru = nn.GRU(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 5)


MODELS = {"mlp": mlp, "cnn_bn": cnn, "transformer": transformer, "embedding_gru": EmbeddingGRU}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("l2_squared", [False, True])
def test_value_and_grads_match_loop_on_models(model_name, dtype, l2_squared, device):
    torch.manual_seed(7)
    model = MODELS[model_name]().to(device=device, dtype=dtype)
    params = list(model.parameters())
    l1, l2 = 3e-3, 7e-2
    ours = regext.fused_penalty(model.parameters(), l1, l2, l2_squared=l2_squared)
    loop = penalty_loop(params, l1, l2, l2_squared=l2_squared)
    exact = penalty_float64(params, l1, l2, l2_squared=l2_squared)

    assert ours.dtype == dtype and ours.device == params[0].device and ours.dim() == 0
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(ours, loop, rtol=rtol, atol=atol)
    # Against float64 ground truth regext is at least as close as the loop.
    assert abs(ours.double().item() - exact.item()) <= abs(loop.double().item() - exact.item()) \
        + 1e-12 * abs(exact.item())

    ours_grads = grads_of(ours, params)
    loop_grads = grads_of(loop, params)
    for i, (a, b) in enumerate(zip(ours_grads, loop_grads)):
        assert a.dtype == params[i].dtype and a.shape == params[i].shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"param {i}")


def test_training_step_through_backward_populates_grads(device):
    torch.manual_seed(0)
    model = mlp().to(device)
    x = torch.randn(8, 32, device=device)
    loss = model(x).pow(2).mean() + regext.fused_penalty(model.parameters(), 1e-3, 1e-2)
    loss.backward()
    ref = mlp().to(device)
    ref.load_state_dict(model.state_dict())
    ref_loss = ref(x).pow(2).mean() + penalty_loop(ref.parameters(), 1e-3, 1e-2)
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
