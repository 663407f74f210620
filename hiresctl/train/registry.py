"""The registry of tasks and methods: each is a class registered once, by one decorator.

Everything that lists tasks or methods reads it: the recipe's choices and per-method defaults,
``hiresctl methods``, ``--memory-budget``, evaluation, the report and the tests' parametrisation.
A method lands by writing its class and decorating it (docs/methods.md, "Adding a method")::

    @register_method("cls", "my-method", defaults={"lr": 3e-4})
    class MyMethod(ClassificationMethod): ...

A method subclasses its task's ``method_base`` (``ClassificationMethod``, ``DetectionMethod``,
``SegmentationMethod``); registration refuses one that does not.

The built-in tasks and methods register when ``hiresctl.train`` is imported, and so do
plugins: the entry points of group ``hiresctl.methods`` of installed packages, and the modules
or ``.py`` files listed in ``HIRESCTL_PLUGINS`` (separated by ``os.pathsep``). This module
imports nothing of the project but its errors, so every layer may read it.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

from storage.errors import UsageError

T = TypeVar("T", bound=type)

PLUGIN_GROUP = "hiresctl.methods"
PLUGIN_VARIABLE = "HIRESCTL_PLUGINS"

_TASKS: dict[str, type[Any]] = {}
_METHODS: dict[str, dict[str, type[Any]]] = {}
_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {}
_ALIASES: dict[tuple[str, str], str] = {}  # (task, former name) → name


def _replacing(kind: str, key: str, old: type[Any] | None, new: type[Any]) -> None:
    if old is not None and old is not new:
        warnings.warn(
            f"{kind} {key} registered again: {old.__module__}.{old.__qualname__} is replaced by "
            f"{new.__module__}.{new.__qualname__}",
            stacklevel=3,
        )


def _check_base(task_cls: type[Any], task: str, name: str, cls: type[Any]) -> None:
    """Refuse a method that does not subclass its task's ``method_base``."""
    base = getattr(task_cls, "method_base", None)
    if base is not None and not issubclass(cls, base):
        raise UsageError(
            f"{task} method {name!r} ({cls.__module__}.{cls.__qualname__}) must subclass "
            f"{base.__module__}.{base.__qualname__}, the base of every {task} method"
        )


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: the :class:`~hiresctl.train.task.Task` named ``name`` (cls, det, seg)."""

    def add(cls: T) -> T:
        _replacing("task", name, _TASKS.get(name), cls)
        cls.name = name  # type: ignore[attr-defined]
        for method_name, method in _METHODS.get(name, {}).items():  # registered before the task
            _check_base(cls, name, method_name, method)
        _TASKS[name] = cls
        _METHODS.setdefault(name, {})
        return cls

    return add


def register_method(
    task: str, name: str, defaults: dict[str, Any] | None = None
) -> Callable[[T], T]:
    """Class decorator: the method ``name`` of ``task``, with its recipe ``defaults`` (they
    override the task's and are overridden by the user's recipe). Defaults belong to one
    registration and are not inherited: a detection PatchGD is not a classification PatchGD."""

    def add(cls: T) -> T:
        if task in _TASKS:
            _check_base(_TASKS[task], task, name, cls)
        table = _METHODS.setdefault(task, {})
        _replacing("method", f"{task}/{name}", table.get(name), cls)
        cls.task = task  # type: ignore[attr-defined]
        cls.name = name  # type: ignore[attr-defined]
        table[name] = cls
        _DEFAULTS[task, name] = dict(defaults or {})
        return cls

    return add


def register_alias(task: str, former: str, name: str) -> None:
    """Accept ``former``, a method's earlier name, for ``task``'s method ``name``: recipes and
    checkpoints that name it keep loading (with a note that the name changed)."""
    _ALIASES[task, former] = name


def canonical_method(task: str, name: str) -> tuple[str, str | None]:
    """(the method's name, a one-line note when ``name`` is a former name of it, else None)."""
    if (task, name) in _ALIASES:
        current = _ALIASES[task, name]
        return current, (
            f"{task} method {name!r} is now called {current!r} (the same method, one name across "
            f"tasks); {name!r} is still accepted"
        )
    return name, None


def unknown(what: str, valid: list[str], name: str) -> UsageError:
    """The error for a name that is not among ``valid``, with the nearest one as a hint."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UsageError(f"{what}{hint}; valid: {', '.join(valid)}")


def task_names() -> tuple[str, ...]:
    return tuple(_TASKS)


def method_names(task: str | None = None) -> tuple[str, ...]:
    """The methods of ``task`` in registration order; without a task, every method name once."""
    if task is not None:
        return tuple(_METHODS.get(task, {}))
    return tuple(dict.fromkeys(name for table in _METHODS.values() for name in table))


def task_class(name: str) -> type[Any]:
    if name not in _TASKS:
        raise unknown(f"unknown task {name!r}", list(_TASKS), name)
    return _TASKS[name]


def method_class(task: str, name: str) -> type[Any]:
    """The class registered as ``task``/``name``; an unknown name lists the valid ones."""
    table = _METHODS.get(task)
    if table is None:
        raise unknown(f"unknown task {task!r}", list(_TASKS), task)
    name = canonical_method(task, name)[0]
    if name not in table:
        raise unknown(f"method {name!r} is not a {task} method", list(table), name)
    return table[name]


def method_defaults(task: str, name: str) -> dict[str, Any]:
    method_class(task, name)
    return dict(_DEFAULTS[task, canonical_method(task, name)[0]])


def load_plugins() -> list[str]:
    """Import every plugin (entry points, then ``HIRESCTL_PLUGINS``) so that it registers its
    methods; a plugin that fails to import is one warning naming it, and the others load."""
    loaded = []
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            point.load()
            loaded.append(point.value)
        except Exception as exc:  # a broken plugin must not take the product down
            warnings.warn(
                f"plugin {point.name} ({point.value}) failed to load: {exc}", stacklevel=2
            )
    for item in filter(None, os.environ.get(PLUGIN_VARIABLE, "").split(os.pathsep)):
        try:
            if item.endswith(".py"):
                path = Path(item)
                spec = importlib.util.spec_from_file_location(f"hiresctl_plugin_{path.stem}", path)
                if spec is None or spec.loader is None or not path.is_file():
                    raise FileNotFoundError(f"{path}: no such file")
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module  # its classes pickle, e.g. into workers
                spec.loader.exec_module(module)
            else:
                importlib.import_module(item)
            loaded.append(item)
        except Exception as exc:
            warnings.warn(f"{PLUGIN_VARIABLE}: {item} failed to load: {exc}", stacklevel=2)
    return loaded


__all__ = [
    "PLUGIN_GROUP",
    "PLUGIN_VARIABLE",
    "load_plugins",
    "method_class",
    "method_defaults",
    "method_names",
    "register_method",
    "register_task",
    "task_class",
    "task_names",
    "unknown",
]
