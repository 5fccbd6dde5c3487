"""Name -> object registries, in the style of timm's ``@register_model``.

Every concept a grid can name (model configs, conditioning blocks, datasets,
measurements) lives in one ``Registry``; adding one is a decorator in one file.
Unknown names raise ``UnknownName`` carrying a did-you-mean, which the CLI turns
into one line of text.
"""
from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownName(KeyError):
    """A name that no registry entry has; ``str()`` is a complete sentence."""

    def __init__(self, kind: str, name: object, choices: list[str]):
        self.kind, self.name, self.choices = kind, name, choices
        super().__init__(name)

    @property
    def suggestion(self) -> str | None:
        close = difflib.get_close_matches(str(self.name), self.choices, n=1, cutoff=0.5)
        return close[0] if close else None

    def __str__(self) -> str:
        hint = f" (did you mean '{self.suggestion}'?)" if self.suggestion else ""
        return f"unknown {self.kind} {self.name!r}{hint}; choose from: {', '.join(self.choices)}"


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False):
        """``reg.register("x", obj)`` or ``@reg.register("x")``."""

        def add(o: T) -> T:
            if name in self._entries and not overwrite:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownName(self.kind, name, sorted(self._entries)) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self):
        return self._entries.items()
