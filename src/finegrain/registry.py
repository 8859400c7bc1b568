"""One strict registry per kind of component (normalizers, classifiers, losses, samplers, optimizers, ...).

Registering a name twice is an error; an unknown name is an error that lists the valid ones. `create` is the one
factory every `create_*` wraps: keyword arguments set to None are dropped, so an unset CLI option never overrides an
entry's own default (timm's `_factory.py`), and a keyword the entry does not take is an error that lists the ones
it does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from finegrain.errors import FinegrainError

T = TypeVar("T")

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class ParameterError(ValueError, TypeError):
    """A keyword an entry does not take, or a required one left unset.

    Python calls that a TypeError (unexpected keyword argument) and scikit-learn a ValueError; it is both, so callers
    of either convention catch it (as numpy's AxisError is both a ValueError and an IndexError).
    """


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise FinegrainError(
                f"unknown {self.kind} {name!r}; valid {self.kind}{'es' if self.kind.endswith('s') else 's'}: "
                f"{', '.join(sorted(self._entries))}"
            ) from None

    def params(self, name: str) -> tuple[str, ...] | None:
        """The keywords entry `name` takes (its constructor's named parameters); None when it takes any (**kwargs)."""
        parameters = inspect.signature(self.get(name)).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        return tuple(p.name for p in parameters if p.kind in _NAMED)

    def create(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Build entry `name` from `args` and the keyword arguments that are not None.

        Raises FinegrainError for an unknown name (listing the valid ones) and ParameterError for a keyword the
        entry does not take or a required argument left unset.
        """
        entry = self.get(name)
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        valid = self.params(name)
        unknown = [] if valid is None else sorted(set(kwargs) - set(valid))
        if unknown:
            raise ParameterError(
                f"{self.kind} {name!r} has no parameter {', '.join(unknown)}; valid: {', '.join(valid or ()) or 'none'}"
            )
        try:
            inspect.signature(entry).bind(*args, **kwargs)
        except TypeError as e:
            raise ParameterError(f"{self.kind} {name!r}: {e}") from None
        return entry(*args, **kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)
