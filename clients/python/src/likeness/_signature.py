"""Gives a wrapper the docs and parameters of what it wraps, so that help(), IDEs and
inspect show the real ones: for client methods bound from likeness._ops, and for
methods that take *args and pass them on."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, get_type_hints

if TYPE_CHECKING:
    from typing_extensions import Concatenate, ParamSpec

    P = ParamSpec("P")

R = TypeVar("R")


def copy_signature(
    wrapper: Any, src: Callable[..., Any], returns: Any, owner: Optional[str] = None
) -> Any:
    """`wrapper` with src's docs and parameters, returning `returns`. With `owner` (a
    class name) it becomes that class's method of src's name, `self` first."""
    hints = get_type_hints(src)
    hints["return"] = returns
    sig = inspect.signature(src)
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
    ]
    if owner is not None:
        params.insert(0, inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD))
        wrapper.__name__ = src.__name__
        wrapper.__qualname__ = f"{owner}.{src.__name__}"
    wrapper.__doc__ = src.__doc__
    wrapper.__annotations__ = hints
    wrapper.__signature__ = sig.replace(parameters=params, return_annotation=returns)
    wrapper.__wrapped__ = src
    return wrapper


def like(
    src: "Callable[Concatenate[Any, P], Any]", returns: Optional[Any] = None
) -> "Callable[[Callable[..., R]], Callable[Concatenate[Any, P], R]]":
    """A decorator: the method shows src's docs and parameters (and `returns`)."""

    def wrap(method: Callable[..., R]) -> "Callable[Concatenate[Any, P], R]":
        return copy_signature(method, src, returns)

    return wrap
