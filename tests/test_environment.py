"""The dev environment that ``make setup`` builds from constraints.txt."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torchvision_stays_out():
    """PyPI's torchvision here is a CUDA build that cannot load beside the CPU torch and
    breaks ``import lightning``; nothing in trainwell or its tests needs it."""
    assert importlib.util.find_spec("torchvision") is None
    pins = (ROOT / "constraints.txt").read_text(encoding="utf-8").lower()
    assert "\ntorchvision==" not in pins


def test_every_extra_is_pinned():
    """Each optional library the integrations use is in the lock, so CI installs the same."""
    pins = {
        line.split("==")[0].lower()
        for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
        if "==" in line
    }
    for name in ("lightning", "transformers", "accelerate", "tensorboard", "mlflow", "ray"):
        assert name in pins, name
