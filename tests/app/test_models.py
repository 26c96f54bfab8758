import pytest
import torch

from trainwell.app.models import MLP, build_model
from trainwell.regularization.dropout import Dropout


def test_mlp_layers_norms_and_per_layer_dropout():
    model = MLP(8, 3, hidden=(16, 4), norm="layer", dropout=(0.1, 0.3))
    drops = [m for m in model if isinstance(m, Dropout)]
    assert [d.p for d in drops] == [0.1, 0.3]
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in model) == 2
    assert model(torch.randn(5, 8)).shape == (5, 3)


def test_cnn_and_errors():
    assert build_model("cnn", 64, 10)(torch.randn(3, 64)).shape == (3, 10)
    with pytest.raises(ValueError, match="model.kind 'cnn' expects 8x8"):
        build_model("cnn", 13, 3)
    with pytest.raises(ValueError, match="model.dropout needs one rate per hidden layer"):
        MLP(4, 2, hidden=(8, 8), dropout=(0.1,))
    with pytest.raises(ValueError, match="model.activation"):
        MLP(4, 2, activation="swish")
