"""User code by reference: ``target = "module:name"`` (or ``"path/file.py:name"``) plus ``args``.

The spelling follows Lightning CLI (``class_path`` + ``init_args``) and Hydra (``_target_``),
in the shape of Python packaging's entry points: ``"pkg.module:Name"`` imports
``pkg.module`` and takes ``Name`` (dots in the name walk attributes,
``"pkg.mod:Outer.inner"``); ``"path/to/file.py:Name"`` loads the file (a relative path is
relative to the config file that names it, resolved when the config is read).

Every failure -- no such module or file, no such name, not callable, an argument the
callable does not take, a wrong return type -- is an :class:`EntryPointError` that names
the config key, the target and what went wrong, in one line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


class EntryPointError(ValueError):
    """A ``target`` that cannot be imported or called as configured (one line)."""


def is_file_target(target: str) -> bool:
    """Whether ``target`` names a Python file (``"dir/file.py:name"``) rather than a module."""
    module, _, _ = target.rpartition(":")
    return module.endswith(".py")


def absolute_target(target: str, base: Path) -> str:
    """``target`` with a relative file path made absolute against ``base`` (a directory).

    Example:
        >>> absolute_target("models.py:Net", Path("/cfg"))
        '/cfg/models.py:Net'
        >>> absolute_target("torch.nn:Linear", Path("/cfg"))
        'torch.nn:Linear'
    """
    if not is_file_target(target):
        return target
    module, _, name = target.rpartition(":")
    path = Path(module)
    return f"{path if path.is_absolute() else (base / path).resolve()}:{name}"


def _split(key: str, target: object) -> tuple[str, str]:
    if not isinstance(target, str) or target.count(":") < 1:
        raise EntryPointError(
            f"{key}: expected 'module:name' or 'path/file.py:name', got {target!r}"
        )
    module, _, name = target.rpartition(":")
    if not module or not name:
        raise EntryPointError(
            f"{key}: expected 'module:name' or 'path/file.py:name', got {target!r}"
        )
    return module, name


def _load_file(key: str, target: str, path: Path) -> Any:
    if not path.is_file():
        raise EntryPointError(f"{key} = {target!r}: file {str(path)!r} does not exist")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"trainwell_user_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise EntryPointError(f"{key} = {target!r}: cannot load {str(path)!r} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pickling and dataclasses look modules up by name
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise EntryPointError(
            f"{key} = {target!r}: importing {path.name} failed: {type(err).__name__}: {err}"
        ) from None
    return module


def resolve(key: str, target: object) -> Any:
    """The object ``target`` names; ``key`` is the config key for the error message.

    Example:
        >>> resolve("model.target", "torch.nn:Linear").__name__
        'Linear'
    """
    module_name, name = _split(key, target)
    if module_name.endswith(".py"):
        module = _load_file(key, str(target), Path(module_name))
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise EntryPointError(
                f"{key} = {target!r}: no module named {err.name!r} "
                "(is it installed, or on PYTHONPATH?)"
            ) from None
        except Exception as err:
            raise EntryPointError(
                f"{key} = {target!r}: importing {module_name} failed: {type(err).__name__}: {err}"
            ) from None
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise EntryPointError(f"{key} = {target!r}: {module_name} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def resolve_callable(key: str, target: object) -> Callable[..., Any]:
    """Like :func:`resolve`, and the object must be callable."""
    obj = resolve(key, target)
    if not callable(obj):
        raise EntryPointError(f"{key} = {target!r}: {type(obj).__name__} is not callable")
    return obj


def takes(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn``'s signature names the argument ``name`` (``**kwargs`` does not count)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def call(
    key: str,
    target: str,
    fn: Callable[..., Any],
    args: Mapping[str, Any],
    provided: Mapping[str, Any] | None = None,
    positional: tuple[Any, ...] = (),
) -> Any:
    """``fn(*positional, **args, **provided)``; ``provided`` goes only where the signature names it.

    ``provided`` holds what trainwell knows (``n_features``, ``n_classes``, ``seed``, ...);
    a value in ``args`` wins over a provided one. An argument ``fn`` does not take, or any
    ``TypeError`` from binding, is an :class:`EntryPointError` naming ``key`` and ``target``;
    so is a ``TypeError`` / ``ValueError`` raised while ``fn`` builds its object from them.

    Example:
        >>> linear = resolve("model.target", "torch.nn:Linear")
        >>> call("model.target", "torch.nn:Linear", linear, {"out_features": 2},
        ...      {"in_features": 3, "n_classes": 2}).weight.shape
        torch.Size([2, 3])
    """
    kwargs = {k: v for k, v in (provided or {}).items() if takes(fn, k) and k not in args}
    kwargs.update(args)
    try:
        inspect.signature(fn).bind(*positional, **kwargs)
    except TypeError as err:
        raise EntryPointError(f"{key} = {target!r}: {err}") from None
    except ValueError:  # no signature (a builtin): let the call decide
        pass
    try:
        return fn(*positional, **kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, EntryPointError):
            raise
        raise EntryPointError(f"{key} = {target!r}: {type(err).__name__}: {err}") from None


def reference(obj: Any, key: str, allow_main: bool = False) -> str:
    """The ``"module:qualname"`` of a Python callable, so that worker processes can import it.

    A callable from a script's ``__main__`` is referenced by the script's file. One defined
    in a notebook or an interactive session (``__main__`` without a file) or inside a
    function cannot be imported by another process: an :class:`EntryPointError` says so,
    unless ``allow_main`` (the caller runs everything in this process).

    Example:
        >>> reference(Path, "model")
        'pathlib:Path'
    """
    if isinstance(obj, str):
        return obj
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname:
        raise EntryPointError(f"{key}: {obj!r} has no importable module:name; pass a string")
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise EntryPointError(
            f"{key}: {qualname} is defined inside a function or is a lambda; define it at "
            "the top level of a module so that worker processes can import it"
        )
    if module == "__main__":
        path = getattr(sys.modules.get("__main__"), "__file__", None)
        if path:
            return f"{Path(path).resolve()}:{qualname}"
        if allow_main:
            return f"__main__:{qualname}"
        raise EntryPointError(
            f"{key}: {qualname} is defined in __main__ (a notebook or an interactive session); "
            "worker processes cannot import it: move it into a module (a .py file next to "
            "the notebook) and import it from there, or use jobs=1"
        )
    return f"{module}:{qualname}"
