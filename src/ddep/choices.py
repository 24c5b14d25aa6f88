"""Error messages: unknown names and options with the closest valid spelling suggested, and
lists of files cut short."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_choice(what: str, value: object, choices: Iterable[str]) -> None:
    """Raise ``ValueError("unknown <what> 'x' (known: a, b); did you mean 'a'?")`` unless valid."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r} (known: {', '.join(choices)}){did_you_mean(value, choices)}")


def check_options(what: str, options: Iterable[str], valid: Iterable[str]) -> None:
    """Raise ``ValueError("unknown option 'x' for <what>; did you mean 'y'?")`` for the first bad key."""
    valid = list(valid)
    for key in options:
        if key not in valid:
            hint = did_you_mean(key, valid) or f" (valid: {', '.join(valid) or 'none'})"
            raise ValueError(f"unknown option {key!r} for {what}{hint}")


def listed(items: list[str], shown: int = 3) -> str:
    """``a, b, c and 4 more``: the first ``shown`` of ``items``."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
