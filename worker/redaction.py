"""Redaction of secrets from log events, before they reach stdout or Redis.

Three nets, applied to every value of the final event dict: fields whose *name* says they hold a
secret (``password``, ``session_token``, ``authorization``…; not ``credential_source`` or
``secret_key_path``, which name where a secret lives); every secret this process has read (key
storage values, assumed-role keys and tokens); and text *shaped* like AWS credentials: secret access
keys, temporary ``ASIA…`` key ids, session tokens, ``X-Amz-Security-Token`` and request signatures.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

MASK = "[redacted]"
_SECRET_NAMES = re.compile(
    r"^(?:.*[_-])?(?:secret|secret[_-]?access[_-]?key|secret[_-]?key|password|passwd|pwd|session[_-]?token"
    r"|security[_-]?token|x[_-]amz[_-]security[_-]token|access[_-]?token|refresh[_-]?token|auth[_-]?token"
    r"|bearer[_-]?token|api[_-]?key|authorization|private[_-]?key|credentials|master[_-]?key|keystore[_-]?key"
    r"|token)$",
    re.IGNORECASE,
)
_SHAPES = (
    # A header or query parameter carrying a session token or a signature: mask the value.
    re.compile(r"(?i)(?<=x-amz-security-token)(?P<sep>['\"]?\s*[=:]\s*['\"]?)[^&\s'\",;]+"),
    re.compile(r"(?i)(?<=x-amz-signature)(?P<sep>['\"]?\s*[=:]\s*['\"]?)[0-9a-f]{64}"),
    re.compile(r"(?<=Signature=)(?P<sep>)[0-9a-f]{64}"),
    # A temporary (STS) access key id.
    re.compile(r"(?<![A-Z0-9])(?P<sep>)ASIA[A-Z0-9]{16}(?![A-Z0-9])"),
    # A session token, by the prefixes STS issues (also percent-encoded, as in a query string).
    re.compile(r"(?P<sep>)(?:IQoJb3JpZ2lu|FwoGZXIvYXdz|FQoGZXIvYXdz|AQoDYXdz|AgoJb3JpZ2lu)(?:[A-Za-z0-9/+=]|%2[BbFf]|%3[Dd]){16,}"),
    # A secret access key: 40 characters of the base64 alphabet standing alone, not a hex digest.
    re.compile(r"(?<![A-Za-z0-9/+=])(?P<sep>)(?![0-9a-f]{40}(?![A-Za-z0-9/+=]))(?![0-9A-F]{40}(?![A-Za-z0-9/+=]))"
               r"[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),
)
_known: set[str] = set()


def register(value: str | None) -> None:
    """Remember a secret this process has read, so it is masked wherever it appears."""
    if value and len(value) >= 6:
        _known.add(value)


def redact_text(text: str) -> str:
    """Mask known secrets and anything shaped like an AWS credential, token or signature."""
    for secret in _known:
        if secret in text:
            text = text.replace(secret, MASK)
    for shape in _SHAPES:
        text = shape.sub(lambda m: m.group("sep") + MASK, text)
    return text


def secret_name(key: str) -> bool:
    """Whether a field called ``key`` holds a secret by its name."""
    return bool(_SECRET_NAMES.match(key))


def redact_value(key: str, value: Any) -> Any:
    """Mask a value by its key's name or its content; recurse into containers."""
    if key == "exc_info":  # the exception itself, rendered (and then redacted) by a later processor
        return value
    if secret_name(key) and value not in (None, "", MASK):
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
