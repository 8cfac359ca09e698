"""Bearer API keys: from config and/or an environment variable; constant-time comparison.

When any key is configured, every route except ``/health`` needs ``Authorization: Bearer <key>``
(unknown routes too, so probing reveals nothing). With no keys the app is open: bind it to
loopback (the default).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cluster.config.serve import AuthConfig


class APIKeys:
    def __init__(self, keys: list[str]) -> None:
        # Compare fixed-length digests so that neither timing nor length leaks which key is close.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    @classmethod
    def from_config(cls, cfg: AuthConfig, environ: dict[str, str] | None = None) -> APIKeys:
        env = os.environ if environ is None else environ
        extra = [k.strip() for k in env.get(cfg.env_var, "").split(",") if k.strip()]
        return cls([*cfg.api_keys, *extra])

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> bool:
        """True if auth is off or ``authorization`` is ``Bearer <a configured key>``."""
        if not self._digests:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        ok = False
        for d in self._digests:  # no early exit: time does not depend on which key matched
            ok |= hmac.compare_digest(digest, d)
        return ok
