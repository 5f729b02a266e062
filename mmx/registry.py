"""Name -> builder registries whose errors list the valid names."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(Generic[T]):
    """A mapping from names (and aliases) to classes or factories.

    >>> encoders = Registry("encoder")
    >>> @encoders.register("clip")
    ... class CLIPTextEncoder: ...
    >>> encoders.build("clip")  # doctest: +SKIP
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that registers a class or factory under ``name`` (and ``aliases``)."""

        def decorator(obj: Callable[..., T]) -> Callable[..., T]:
            for key in (name, *aliases):
                if key in self._entries or key in self._aliases:
                    raise ValueError(f"{self.kind} name {key!r} is already registered")
            self._entries[name] = obj
            for alias in aliases:
                self._aliases[alias] = name
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        """The class or factory registered as ``name``; an UnknownNameError (a KeyError) lists the valid names."""
        key = self._aliases.get(name, name)
        if key not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._entries[key]

    def build(self, name: str, /, *args: Any, **kwargs: Any) -> T:
        """Instantiate the entry registered as ``name``; an unknown keyword lists the valid ones."""
        entry = self.get(name)
        valid = self.parameters(name)
        if valid is not None:
            unknown = sorted(set(kwargs) - set(valid))
            if unknown:
                raise TypeError(
                    f"{self.kind} {name!r} got unknown argument(s) {', '.join(unknown)}; "
                    f"valid arguments: {', '.join(valid)}"
                )
        return entry(*args, **kwargs)

    def build_from_dict(self, spec: dict[str, Any]) -> T:
        """Build from plain data such as a YAML mapping: ``{"name": "clip", **arguments}``."""
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"a {self.kind} spec must be a mapping with a 'name' key; got {spec!r}")
        arguments = dict(spec)
        return self.build(arguments.pop("name"), **arguments)

    def parameters(self, name: str) -> list[str] | None:
        """Keyword arguments the entry accepts, or None when it takes ``**kwargs``."""
        signature = inspect.signature(self.get(name))
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return None
        return [n for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def names(self) -> list[str]:
        """Every registered name and alias, sorted."""
        return sorted([*self._entries, *self._aliases])

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
