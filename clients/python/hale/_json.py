"""What may be sent to hale: JSON, checked at the call before anything is sent."""

from __future__ import annotations

import math
from typing import Any, List, Tuple

from .errors import NotJson

#: Deeper than this is refused here (hale refuses 64 levels of patch anyway; this bounds
#: the walk on self-referencing structures too).
DEPTH_MAX = 512

_HINTS = {
    "datetime": "send datetime.isoformat() (or a timestamp) and parse it back",
    "date": "send date.isoformat() and parse it back",
    "time": "send time.isoformat() and parse it back",
    "timedelta": "send total_seconds()",
    "set": "send sorted(the_set) or list(the_set)",
    "frozenset": "send sorted(the_set) or list(the_set)",
    "bytes": "send base64.b64encode(data).decode() or data.decode()",
    "bytearray": "send base64.b64encode(data).decode()",
    "Decimal": "send str(value) (exact) or float(value)",
    "UUID": "send str(value)",
    "Path": "send str(path)",
    "PosixPath": "send str(path)",
}


def not_json(where: str, why: str) -> NotJson:
    return NotJson(f"{where} is not JSON: {why}; nothing was sent, and the session goes on")


def check(value: Any, where: str) -> None:
    """Raises :class:`NotJson` (code ``not_json``) if ``value`` is not a JSON value
    (dicts with ``str`` keys, lists and tuples, ``str``, ``int``, finite ``float``,
    ``bool``, ``None``): naming where in it the first offending value is and what to send
    instead. NaN and the infinities are refused (JSON has no such numbers)."""
    stack: List[Tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if item is None or isinstance(item, (str, bool, int)):
            continue
        if isinstance(item, float):
            if math.isnan(item) or math.isinf(item):
                raise not_json(path, f"{item!r} is not a JSON number (send None, or a string)")
            continue
        if depth >= DEPTH_MAX:
            raise not_json(path, f"it nests more than {DEPTH_MAX} levels deep (is it self-referencing?)")
        if isinstance(item, dict):
            for key, member in item.items():
                if not isinstance(key, str):
                    raise not_json(
                        f"{path}[{key!r}]",
                        f"its key is a {type(key).__name__}; JSON object keys are strings (use str(key))",
                    )
                stack.append((member, f"{path}.{key}", depth + 1))
            continue
        if isinstance(item, (list, tuple)):
            for index, member in enumerate(item):
                stack.append((member, f"{path}[{index}]", depth + 1))
            continue
        kind = type(item).__name__
        hint = _HINTS.get(kind, "convert it to a dict, list, str, int, float, bool or None")
        raise not_json(path, f"a {kind} ({hint})")
