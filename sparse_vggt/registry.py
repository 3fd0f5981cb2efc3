"""A named registry whose built-in entries live in modules imported on first use.

The attention kernels and the retrieval descriptors are both looked up by a config value and both may need heavy
imports (FlexAttention, a model); keeping the built-ins as module names means choosing one imports only that one.
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyRegistry:
    """Name -> object. Built-ins are ``name -> module`` (in ``package``) whose attribute ``attr`` is the object;
    `register` adds or replaces an entry at run time (code outside the library)."""

    def __init__(self, package: str, builtin: dict[str, str], attr: str) -> None:
        self.package, self.builtin, self.attr = package, builtin, attr
        self.loaded: dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> Any:
        self.loaded[name] = obj
        return obj

    def names(self) -> tuple[str, ...]:
        """Built-ins first (in their order), then registered ones."""
        return tuple(dict.fromkeys([*self.builtin, *self.loaded]))

    def get(self, name: str) -> Any:
        """The entry, importing its module the first time; KeyError if nothing has that name."""
        if name not in self.loaded:
            if name not in self.builtin:
                raise KeyError(name)
            module = importlib.import_module(f".{self.builtin[name]}", self.package)
            self.loaded[name] = getattr(module, self.attr)
        return self.loaded[name]
