"""trainwell inside the tools people already use: Lightning and Hugging Face ``Trainer``
callbacks (:mod:`trainwell.integrations.lightning`, :mod:`trainwell.integrations.hf`) and
TensorBoard / MLflow loggers for ``fit()`` and the CLI.

Each third-party library is an optional extra, imported only when its module is used:
``import trainwell`` never imports one, and a missing one raises :class:`MissingExtra`,
whose message names the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional library is not installed; the message says ``pip install 'trainwell[X]'``."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming the ``extra`` that brings it.

    Args:
        module: the module to import, e.g. ``"mlflow"``.
        extra: trainwell's extra that installs it, e.g. ``"mlflow"``.
        feature: what needs it, for the message, e.g. ``"[logging] mlflow"``.

    Example:
        >>> require("json", "none", "this example").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(
            f"{feature} needs {module.split('.')[0]}, which is not installed: "
            f"pip install 'trainwell[{extra}]'"
        ) from err
