"""Named choices (penalties, sparsifiers, plan modes, schedules, data sets, export formats, runtimes,
models): each kind is one :class:`Registry`, filled by decorating the implementations, and the recipe
accepts whatever it holds when the recipe is validated."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names of one kind of choice, in registration order, each with an object and a description."""

    def __init__(self, kind: str):
        self.kind = kind  # as error messages name it: "penalty", "sparsity method", ...
        self._entries: dict[str, tuple[T, str]] = {}

    def register(self, name: str, *, description: str = "") -> Callable[[T], T]:
        """Decorator adding ``name``; without a description, the first line of the object's docstring."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
            self._entries[name] = (obj, description or (doc[0] if doc else ""))
            return obj

        return add

    def unregister(self, name: str) -> None:
        self.get(name)
        del self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def get(self, name: str) -> T:
        """The object registered as ``name``; otherwise one ValueError listing the allowed names."""
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self._entries)}")
        return self._entries[name][0]

    def describe(self) -> dict[str, str]:
        """Each name's description."""
        return {name: description for name, (_, description) in self._entries.items()}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries
