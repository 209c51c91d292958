"""TLS to Redis (``rediss://``): the same certificate checks for the store (redis-py) and the broker (kombu).

kombu on its own connects to a ``rediss://`` URL without checking the certificate or the host name;
redis-py checks both. Here both check both, against the system's CA bundle or
``STEPWORKER_REDIS_TLS_CA_FILE``, unless ``STEPWORKER_REDIS_TLS_VERIFY=false`` says otherwise (with a warning).
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from worker.settings import Settings

_log = logging.getLogger("stepworker.tls")
_warned: set[str] = set()


def uses_tls(url: str) -> bool:
    """Whether a Redis URL asks for TLS."""
    return url.strip().lower().startswith("rediss://")


def ssl_options(settings: Settings, url: str) -> dict[str, Any]:
    """redis-py ``SSLConnection`` keywords for ``url`` (nothing for a plain ``redis://`` URL)."""
    if not uses_tls(url):
        return {}
    if not settings.redis_tls_verify:
        if "verify" not in _warned:
            _warned.add("verify")
            _log.warning("Redis TLS certificate verification is off (STEPWORKER_REDIS_TLS_VERIFY=false): anyone "
                         "on the network path can impersonate Redis and read its password and every message")
        return {"ssl_cert_reqs": ssl.CERT_NONE, "ssl_check_hostname": False}
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    if settings.redis_tls_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    return options
