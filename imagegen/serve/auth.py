"""API keys: created by ``imagegen keys create``, stored hashed, checked on every request but health.

A key reads ``igk_<id>_<secret>``: ``id`` (12 hex characters) finds the row, ``secret`` (43
characters, 256 random bits) is never stored, only its SHA-256 (a fast hash is the right tool for
a high-entropy secret: there is nothing to brute-force). Comparison is constant-time.

Every key belongs to one tenant (``--tenant``, default ``default``): it sees, renders and
changes only that tenant's characters, jobs and audit rows.

Scopes: ``render`` (renders and jobs); ``characters:write`` (register, edit and delete its own
tenant's characters, but not approve them: whoever uploads a face must not be the one who clears
it for rendering); ``characters:approve`` (approve its own tenant's characters); ``admin``
(everything, across tenants, metrics included). Reading characters needs any valid key. Keys
created before ``characters:approve`` existed keep exactly the scopes they had.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from imagegen.errors import ImagegenError
from imagegen.ids import DEFAULT_TENANT, validate_tenant_id
from imagegen.serve.store import ApiKey, ServeStore

SCOPES = ("render", "characters:write", "characters:approve", "admin")
PREFIX = "igk"
KEY_RE = re.compile(r"^igk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


class InvalidScopeError(ImagegenError):
    code = "invalid_scope"
    field = "scopes"


class UnknownKeyError(ImagegenError):
    code = "unknown_key"
    field = "key_id"


def hash_secret(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_scopes(scopes: Iterable[str]) -> list[str]:
    chosen = sorted(set(scopes))
    if not chosen:
        raise InvalidScopeError(f"a key needs at least one scope: {', '.join(SCOPES)}")
    unknown = [s for s in chosen if s not in SCOPES]
    if unknown:
        raise InvalidScopeError(f"unknown scope(s) {', '.join(unknown)}; known scopes: {', '.join(SCOPES)}")
    return chosen


def create_key(store: ServeStore, name: str, scopes: Sequence[str], tenant: str = DEFAULT_TENANT) -> tuple[ApiKey, str]:
    """A new key of ``tenant``: its stored record and the plaintext (shown once, never stored)."""
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise ImagegenError("a key needs a name of 1 to 200 characters (who or what uses it)", field="name")
    chosen = check_scopes(scopes)
    tenant = validate_tenant_id(tenant)
    key_id = secrets.token_hex(6)
    plaintext = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    record = store.add_key(key_id, name, hash_secret(plaintext), chosen, tenant)
    return record, plaintext


def revoke_key(store: ServeStore, key_id: str) -> ApiKey:
    record = store.revoke_key(key_id)
    if record is None:
        raise UnknownKeyError(f"no API key with id {key_id!r}; `imagegen keys list` shows them")
    return record


def allows(scopes: Iterable[str], needed: str | None) -> bool:
    """Whether a key with ``scopes`` may use a route that needs ``needed`` (None: any valid key)."""
    held = set(scopes)
    return needed is None or "admin" in held or needed in held


class KeyVerifier:
    """Checks presented keys against the store, with a short cache (revocation applies within ``ttl_s``).

    A key in use never waits for the database after its first request: once its cached answer is half its
    lifetime old, the next request that finds it claims a refresh (:meth:`claim_refresh`) and the ingress
    re-reads the key in the background (:meth:`refresh`) while that request goes on with the cached answer. An
    answer is kept from the moment its read *began*, so a refresh that started before a revocation never stretches
    the key's life past ``ttl_s`` after it. Without the refresh one request per key every ``ttl_s`` paid a
    database read (a thread hop and a query: 1-2 ms) before it could start.
    """

    def __init__(
        self,
        store: ServeStore,
        ttl_s: float = 2.0,
        touch_every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.ttl_s = ttl_s
        self.touch_every_s = touch_every_s
        self.clock = clock
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._touched: dict[str, float] = {}
        #: digests whose refresh was claimed and has not finished
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()

    def cached(self, presented: str) -> tuple[bool, ApiKey | None]:
        """(True, key or None) when the answer for ``presented`` is cached and fresh, else (False, None): the
        ingress answers a cached key on its event loop, without a hop to the database thread."""
        if KEY_RE.match(presented) is None:
            return True, None
        with self._lock:
            hit = self._cache.get(hash_secret(presented))
        if hit is not None and self.clock() - hit[0] < self.ttl_s:
            return True, hit[1]
        return False, None

    def claim_refresh(self, presented: str) -> bool:
        """Whether the caller should :meth:`refresh` ``presented`` now: a valid key whose cached answer is at least
        half ``ttl_s`` old and that no one is refreshing yet (the claim is the caller's until the refresh ends)."""
        digest = hash_secret(presented)
        with self._lock:
            hit = self._cache.get(digest)
            due = hit is not None and hit[1] is not None and self.clock() - hit[0] >= self.ttl_s / 2
            if not due or digest in self._refreshing:
                return False
            self._refreshing.add(digest)
        return True

    def refresh(self, presented: str) -> ApiKey | None:
        """Read ``presented`` from the store again (blocking; the claim of :meth:`claim_refresh` ends here)."""
        try:
            return self.verify(presented, use_cache=False)
        finally:
            with self._lock:
                self._refreshing.discard(hash_secret(presented))

    def verify(self, presented: str | None, use_cache: bool = True) -> ApiKey | None:
        """The active key ``presented`` names, or None (unknown, wrong secret, revoked, malformed)."""
        if not presented:
            return None
        match = KEY_RE.match(presented)
        if match is None:
            return None
        digest = hash_secret(presented)
        now = self.clock()
        with self._lock:
            hit = self._cache.get(digest)
        if use_cache and hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        record = self.store.get_key(match.group(1))
        valid = (
            record is not None and record.active and hmac.compare_digest(record.secret_sha256.encode(), digest.encode())
        )
        result = record if valid else None
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, result)  # as old as the read's start
        if result is not None and now - self._touched.get(result.id, -1e9) > self.touch_every_s:
            self._touched[result.id] = now
            self.store.touch_key(result.id)
        return result
