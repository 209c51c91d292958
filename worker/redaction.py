"""Redaction of secrets from log events, before they reach stdout or Redis."""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

_SECRET_KEYS = re.compile(r"(secret|password|passwd|session_token|authorization|private_key|credential)", re.I)
# An AWS secret access key: 40 characters of base64 alphabet, standing alone.
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")
_known: set[str] = set()
MASK = "[redacted]"


def register(value: str) -> None:
    """Remember a secret this process has read, so it is masked wherever it appears."""
    if len(value) >= 6:
        _known.add(value)


def redact_text(text: str) -> str:
    """Mask known secrets and anything shaped like an AWS secret access key."""
    for secret in _known:
        if secret in text:
            text = text.replace(secret, MASK)
    return _AWS_SECRET.sub(MASK, text)


def redact_value(key: str, value: Any) -> Any:
    """Mask a value by its key's name or its content; recurse into containers."""
    if _SECRET_KEYS.search(key) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(key, v) for v in value]
    return value


def processor(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: redact every field of the event."""
    for key, value in list(event_dict.items()):
        event_dict[key] = redact_value(key, value)
    return event_dict
