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


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"hidden": (0,)}, ["model.hidden[0]", "whole number >= 1", "got 0"]),
        ({"hidden": (16, -1)}, ["model.hidden[1]", "got -1"]),
        ({"hidden": (2.5,)}, ["model.hidden[0]", "got 2.5"]),
        ({"hidden": (True,)}, ["model.hidden[0]", "got True"]),
        ({"out_features": 0}, ["number of outputs", "got 0"]),
        ({"out_features": None}, ["number of outputs", "got None"]),
        ({"hidden": (1_000_000, 1_000_000)},
         ["model.hidden = [1000000, 1000000] on 8 features", "1e+12 parameters", "4e+03 GB"]),
    ],
)  # fmt: skip
def test_bad_mlp_sizes_are_refused_in_one_line(kwargs, needles):
    with pytest.raises(ValueError) as info:
        MLP(**{"in_features": 8, "out_features": 3, **kwargs})
    text = str(info.value)
    assert len(text.splitlines()) == 1 and len(text) <= 200, text
    assert all(needle in text for needle in needles), text


def test_numpy_integer_widths_work():
    import numpy as np

    assert MLP(8, 3, hidden=np.array([4, 5]))(torch.randn(2, 8)).shape == (2, 3)


def test_out_of_memory_while_building_is_one_line(monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate"
        )

    monkeypatch.setattr(torch.nn, "Linear", no_memory)
    with pytest.raises(
        ValueError, match=r"^model.hidden = \[64\] on 8 features: not enough memory"
    ):
        MLP(8, 3, hidden=(64,))


def test_cnn_channels_must_be_positive():
    with pytest.raises(ValueError, match="model.channels must be a whole number >= 1, got 0"):
        build_model("cnn", 64, 10, channels=0)
