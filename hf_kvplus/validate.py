"""One validator for the integer and ratio arguments of every public entry point.

Every refusal names the argument, the bad value and what is allowed, and happens before anything
changes (the callers check first, then act).
"""

from __future__ import annotations


def check_int(name: str, value, minimum: int = 1, allow_none: bool = False, where: str | None = None) -> int | None:
    """``value`` if it is an ``int`` (not a ``bool``) at least ``minimum`` (or ``None`` when allowed).

    Args:
        name (`str`): the argument's name, as the caller wrote it.
        value: what was passed.
        minimum (`int`, defaults to 1): the smallest allowed value.
        allow_none (`bool`, defaults to `False`): whether ``None`` is allowed (and returned).
        where (`str`, *optional*): the section of a recipe file the value came from; the message then
            names ``where.name`` and says ``null`` for ``None``.

    Raises:
        `ValueError`: ``"{name} must be an integer >= {minimum}, got {value!r}"`` (or the recipe form).

    Example:

    ```python
    >>> check_int("budget", 256)
    256
    >>> check_int("budget", 0)
    Traceback (most recent call last):
    ValueError: budget must be an integer >= 1, got 0
    ```
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        if where is not None:
            allowed = f"integers >= {minimum}" + (" or null" if allow_none else "")
            raise ValueError(f"bad value {value!r} for {where}.{name}: allowed values are {allowed}")
        allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_ratio(name: str, value, low: float = 0.0, high: float = 1.0, where: str | None = None) -> float:
    """``float(value)`` if it is a real number (not a ``bool``) in ``[low, high]``; else a ``ValueError`` naming it.

    Example:

    ```python
    >>> check_ratio("heavy_ratio", 0.5)
    0.5
    ```
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        if where is not None:
            raise ValueError(f"bad value {value!r} for {where}.{name}: allowed values are numbers in [{low:g}, {high:g}]")
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)
