"""Key storage: secrets addressed by path, written by people and read only by workers.

The Redis backend keeps one hash (``Keys.keystore``): path → JSON record with the AES-256-GCM ciphertext,
its nonce, the id of the master key that sealed it, and metadata (created, size). The associated data
binds the key prefix, the path and the metadata, so a record copied to another path or another
deployment's prefix, or whose size or date was edited, no longer decrypts. The hash's field ``""``
(never a valid path) holds the id of the store's master key: a value sealed under any other key is
refused, so one store never splits across two master keys. Records of format 1 (path only in the
associated data) are still read, and rewritten as format 2 by ``rotate``. The directory backend
(``STEPWORKER_KEYSTORE_DIR``, e.g. mounted Docker or Kubernetes secrets) is read-only: path = file path.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import TypeAdapter, ValidationError

from steps.base import KeyPath
from steps.errors import Permanent
from worker.keys import Keys

if TYPE_CHECKING:
    import redis

    from worker.settings import Settings

MAX_VALUE_BYTES = 64 * 1024
_AAD_V1 = b"stepworker-keystore/v1\x00"
_AAD_V2 = b"stepworker-keystore/v2\x00"
_STORE_KID = ""  # the hash field naming the store's master key id (no path is empty)
_log = logging.getLogger("stepworker.keystore")
_KEY_PATH = TypeAdapter(KeyPath)


class KeystoreError(Permanent):
    """Key storage cannot do what was asked; the message names the path, never a value."""


class KeyNotFound(KeystoreError):
    """Nothing is stored at the path."""


class KeyUnreadable(KeystoreError):
    """A value exists but cannot be read or decrypted."""


class MasterKeyError(KeyUnreadable):
    """The master key is missing, malformed, or not the one the values were sealed with."""


class KeystoreReadOnly(KeystoreError):
    """The directory backend is managed outside stepworker."""


class InvalidKeyPath(KeystoreError, ValueError):
    """The path is not a valid key storage path."""


class KeyReader(Protocol):
    """What a worker needs from key storage."""

    def read(self, path: str) -> str:
        """The value at ``path``; raises KeyNotFound or KeyUnreadable."""
        ...


@dataclass(frozen=True)
class KeyInfo:
    """A stored value's metadata (never the value)."""

    path: str
    size: int
    created: datetime
    verified: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form for ``keys list --json``; ``verified`` is None when no master key was at hand."""
        return {"path": self.path, "size": self.size, "created": self.created.isoformat(),
                "verified": self.verified}


class KeyStore(KeyReader, Protocol):
    """Key storage as administered by ``stepworker keys``."""

    def put(self, path: str, value: str) -> KeyInfo:
        """Store ``value`` at ``path`` (replacing any value there)."""
        ...

    def delete(self, path: str) -> bool:
        """Remove the value at ``path``; False when there was none."""
        ...

    def list(self, prefix: str = "") -> list[KeyInfo]:
        """Metadata of every value whose path starts with ``prefix``, sorted by path."""
        ...

    def rotate(self, new_master_key: str) -> int:
        """Re-encrypt every value under ``new_master_key``; returns how many."""
        ...


def check_path(path: str) -> str:
    """``path`` if it is a valid key storage path, else InvalidKeyPath."""
    try:
        return _KEY_PATH.validate_python(path)
    except ValidationError:
        raise InvalidKeyPath(
            f"invalid key storage path {path!r}: use segments of letters, digits, '_', '.', '-' joined by '/'"
            " (no '.' or '..' segments, at most 512 characters)",
            code="InvalidKeyPath",
        ) from None


def new_master_key() -> str:
    """A new master key: 32 random bytes, URL-safe base64."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def parse_master_key(text: str, where: str = "the master key") -> bytes:
    """The 32 key bytes of a URL-safe base64 master key; MasterKeyError names ``where`` when malformed."""
    try:
        raw = base64.urlsafe_b64decode(text.strip().encode())
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise MasterKeyError(
            f"{where} is not 32 bytes of URL-safe base64; make one with `stepworker keys new-master`",
            code="MasterKeyMalformed",
        )
    return raw


def key_id(master: bytes) -> str:
    """A short public id of a master key, stored with each value to tell a wrong key from a damaged value."""
    return hmac.new(master, b"stepworker keystore key id", hashlib.sha256).hexdigest()[:16]


def master_key_from(settings: Settings) -> bytes | None:
    """The master key from STEPWORKER_KEYSTORE_KEY or STEPWORKER_KEYSTORE_KEY_FILE (None when neither)."""
    if settings.keystore_key is not None and settings.keystore_key_file is not None:
        raise MasterKeyError(
            "set only one of STEPWORKER_KEYSTORE_KEY and STEPWORKER_KEYSTORE_KEY_FILE",
            code="MasterKeyAmbiguous",
        )
    if settings.keystore_key is not None:
        return parse_master_key(settings.keystore_key.get_secret_value(), "STEPWORKER_KEYSTORE_KEY")
    if settings.keystore_key_file is None:
        return None
    where = f"the master key file {str(settings.keystore_key_file)!r}"
    _check_key_file_mode(settings.keystore_key_file, where, strict=settings.keystore_key_file_strict)
    try:
        text = settings.keystore_key_file.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise MasterKeyError(f"cannot read {where}: {type(err).__name__}", code="MasterKeyUnreadable") from None
    return parse_master_key(text, where)


def _check_key_file_mode(path: Path, where: str, *, strict: bool) -> None:
    """Warn about (or, strict, refuse) a master key file that its group or others may read."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # reading it reports the problem
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return
    message = (f"{where} can be read by its group or others (mode {stat.filemode(mode)}); "
               f"make it private: chmod 600 {path}")
    if strict:
        raise MasterKeyError(message + " (STEPWORKER_KEYSTORE_KEY_FILE_STRICT refuses it)",
                             code="MasterKeyFileExposed")
    _log.warning("keystore.key_file_exposed %s", message)


def write_master_key_file(path: Path, key: str) -> None:
    """Write ``key`` to a new file readable by its owner only (0600); refuses to replace a file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(key + "\n")


def _now() -> datetime:
    return datetime.now(UTC)


class _Sealer:
    """AES-256-GCM under one master key; the key prefix, path and metadata are the associated data."""

    def __init__(self, master: bytes, prefix: str) -> None:
        self._aead = AESGCM(master)
        self._prefix = prefix
        self.kid = key_id(master)

    def _aad(self, path: str, record: Mapping[str, Any]) -> bytes:
        if record.get("v") == 1:
            return _AAD_V1 + path.encode()
        fields = (self._prefix, path, str(record.get("created")), str(record.get("size")), str(record.get("kid")))
        return _AAD_V2 + b"\x00".join(field.encode() for field in fields)

    def seal(self, path: str, value: str, created: datetime) -> str:
        data = value.encode()
        nonce = os.urandom(12)
        record: dict[str, Any] = {"v": 2, "alg": "AES-256-GCM", "kid": self.kid, "created": created.isoformat(),
                                  "size": len(data)}
        record["nonce"] = _b64(nonce)
        record["ct"] = _b64(self._aead.encrypt(nonce, data, self._aad(path, record)))
        return json.dumps(record, separators=(",", ":"))

    def check_kid(self, path: str, kid: object) -> None:
        if kid != self.kid:
            raise MasterKeyError(
                f"key storage path {path!r} was sealed with master key id {kid},"
                f" but this process has master key id {self.kid}: give every dispatcher and worker the same"
                " STEPWORKER_KEYSTORE_KEY (or finish `stepworker keys rotate-master`)",
                code="MasterKeyMismatch",
                resource_id=path,
            )

    def open(self, path: str, record: Mapping[str, Any]) -> str:
        self.check_kid(path, record.get("kid"))
        try:
            plain = self._aead.decrypt(_unb64(record["nonce"]), _unb64(record["ct"]), self._aad(path, record))
            if record.get("v") != 1 and len(plain) != record.get("size"):
                raise ValueError("size")
            return plain.decode()
        except (InvalidTag, KeyError, TypeError, ValueError):
            raise KeyUnreadable(
                f"key storage path {path!r} cannot be decrypted: the record or its metadata was altered, or it"
                f" was copied from another path or prefix; store the value again with `stepworker keys put {path}`",
                code="KeyUndecryptable",
                resource_id=path,
            ) from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def _check_value(path: str, value: str) -> str:
    size = len(value.encode())
    if size == 0:
        raise KeystoreError(f"refusing to store an empty value at {path!r}", code="EmptyValue")
    if size > MAX_VALUE_BYTES:
        raise KeystoreError(
            f"the value for {path!r} is {size} bytes; key storage holds at most {MAX_VALUE_BYTES}",
            code="TooLarge",
        )
    return value


class RedisKeyStore:
    """Encrypted values in one Redis hash; reading, writing and deleting need the master key, listing does not."""

    def __init__(
        self, redis_client: redis.Redis, keys: Keys, master: bytes | Callable[[], bytes | None] | None
    ) -> None:
        """``master`` may be a callable, read on first need: a step that reads no secret never fails on it."""
        self._redis = redis_client
        self._key = keys.keystore
        self._prefix = keys.prefix
        self._master = master
        self._sealer: _Sealer | None = None

    @property
    def master_key_id(self) -> str | None:
        """The id of this store's master key (None without one)."""
        sealer = self._loaded()
        return None if sealer is None else sealer.kid

    def read(self, path: str) -> str:
        """The decrypted value at ``path``."""
        check_path(path)
        raw = _text(self._redis.hget(self._key, path))
        if raw is None:
            raise _not_found(path)
        return self._require_sealer(path).open(path, _record(path, raw))

    def put(self, path: str, value: str) -> KeyInfo:
        """Encrypt and store ``value`` at ``path``; refused under a master key other than the store's."""
        check_path(path)
        _check_value(path, value)
        sealer = self._require_sealer(path)
        created = _now()

        def attempt(pipe: Any) -> None:
            kid = _store_kid(pipe, self._key)
            if kid not in (None, sealer.kid):
                raise MasterKeyError(
                    f"key storage holds values sealed with master key id {kid}, but this process has master key"
                    f" id {sealer.kid}: refusing to store {path!r} under a second master key (use the store's"
                    " STEPWORKER_KEYSTORE_KEY, or `stepworker keys rotate-master` to change it)",
                    code="MasterKeyMismatch", resource_id=path)
            pipe.multi()
            pipe.hset(self._key, mapping={_STORE_KID: sealer.kid, path: sealer.seal(path, value, created)})

        self._redis.transaction(attempt, self._key)
        return KeyInfo(path, len(value.encode()), created, True)

    def delete(self, path: str) -> bool:
        """Remove the value at ``path``; needs the store's master key."""
        check_path(path)
        sealer = self._require_sealer(path)
        removed: list[bool] = []

        def attempt(pipe: Any) -> None:
            raw = _text(pipe.hget(self._key, path))
            if raw is not None:
                sealer.check_kid(path, _store_kid(pipe, self._key) or _record(path, raw).get("kid"))
            pipe.multi()
            pipe.hdel(self._key, path)
            removed[:] = [raw is not None]

        self._redis.transaction(attempt, self._key)
        return removed[0]

    def list(self, prefix: str = "") -> list[KeyInfo]:
        """Metadata of the stored values under ``prefix``, each verified when the master key is at hand."""
        raw = _texts(self._redis.hgetall(self._key))
        raw.pop(_STORE_KID, None)
        try:
            sealer = self._loaded()
        except MasterKeyError:
            sealer = None
        return [_info(path, _record(path, raw[path]), sealer) for path in sorted(raw) if path.startswith(prefix)]

    def rotate(self, new_master_key: str) -> int:
        """Decrypt every value, then write all of them sealed under the new key in one MULTI/EXEC."""
        old = self._require_sealer("")
        new = _Sealer(parse_master_key(new_master_key, "the new master key"), self._prefix)
        if new.kid == old.kid:
            raise MasterKeyError("the new master key is the current one", code="MasterKeySame")
        count: list[int] = []

        def attempt(pipe: Any) -> None:
            raw = _texts(pipe.hgetall(self._key))
            raw.pop(_STORE_KID, None)
            records = {path: _record(path, text) for path, text in raw.items()}
            plain = {path: old.open(path, record) for path, record in records.items()}
            sealed = {path: new.seal(path, plain[path], _created(records[path])) for path in plain}
            pipe.multi()
            pipe.hset(self._key, mapping={_STORE_KID: new.kid, **sealed})
            count[:] = [len(sealed)]

        self._redis.transaction(attempt, self._key)
        self._sealer = new
        return count[0]

    def _loaded(self) -> _Sealer | None:
        if self._sealer is None and self._master is not None:
            master = self._master() if callable(self._master) else self._master
            self._sealer = None if master is None else _Sealer(master, self._prefix)
        return self._sealer

    def _require_sealer(self, path: str) -> _Sealer:
        sealer = self._loaded()
        if sealer is None:
            where = f" to use key storage path {path!r}" if path else ""
            raise MasterKeyError(
                f"no master key{where}: set STEPWORKER_KEYSTORE_KEY or STEPWORKER_KEYSTORE_KEY_FILE",
                code="MasterKeyMissing",
                resource_id=path,
            )
        return sealer


def _not_found(path: str) -> KeyNotFound:
    return KeyNotFound(
        f"nothing is stored at key storage path {path!r}; store it with `stepworker keys put {path}`",
        code="KeyNotFound",
        resource_id=path,
    )


def _store_kid(pipe: Any, key: str) -> str | None:
    """The store's master key id: its marker, else (a store written before the marker) any record's."""
    marked = _text(pipe.hget(key, _STORE_KID))
    if marked:
        return marked
    sample = pipe.hrandfield(key, 1, withvalues=True)
    if not sample:
        return None
    found = _record(str(_text(sample[0])), str(_text(sample[1]))).get("kid")
    return str(found) if found else None


def _text(value: Any) -> str | None:
    """A Redis reply as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


def _texts(mapping: Any) -> dict[str, str]:
    return {str(_text(k)): str(_text(v)) for k, v in mapping.items()}


def _record(path: str, raw: str) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise KeyUnreadable(f"the record at key storage path {path!r} is damaged", code="KeyDamaged")
    return record


def _created(record: Mapping[str, Any]) -> datetime:
    try:
        return datetime.fromisoformat(str(record["created"]))
    except (KeyError, ValueError):
        return datetime.fromtimestamp(0, UTC)


def _info(path: str, record: Mapping[str, Any], sealer: _Sealer | None = None) -> KeyInfo:
    verified = None
    if sealer is not None:
        try:
            sealer.open(path, record)
            verified = True
        except KeyUnreadable:
            verified = False
    return KeyInfo(path, int(record.get("size", 0)), _created(record), verified)


class DirectoryKeyStore:
    """Read-only key storage in a directory: the value at ``a/b`` is the file ``<dir>/a/b``."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def read(self, path: str) -> str:
        """The file's text, without a trailing newline."""
        file = self._file(path)
        try:
            return file.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as err:
            raise KeyUnreadable(
                f"cannot read key storage path {path!r} from {str(self._root)!r}: {type(err).__name__}",
                code="KeyUnreadable",
                resource_id=path,
            ) from None

    def list(self, prefix: str = "") -> list[KeyInfo]:
        """Every readable file under the directory (hidden entries skipped), by path."""
        found = []
        for file in sorted(self._root.rglob("*")):
            rel = file.relative_to(self._root).as_posix()
            if any(part.startswith(".") for part in rel.split("/")) or not rel.startswith(prefix):
                continue
            if self._inside(file):
                stat = file.stat()
                found.append(KeyInfo(rel, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)))
        return found

    def put(self, path: str, value: str) -> KeyInfo:
        """Refused: the directory is managed outside stepworker."""
        raise self._read_only()

    def delete(self, path: str) -> bool:
        """Refused: the directory is managed outside stepworker."""
        raise self._read_only()

    def rotate(self, new_master_key: str) -> int:
        """Refused: the directory backend has no master key."""
        raise self._read_only()

    def _inside(self, file: Path) -> bool:
        # Symlinks are followed (Kubernetes secret volumes are symlinks) but must stay inside the directory.
        return file.resolve().is_relative_to(self._root.resolve()) and file.is_file()

    def _file(self, path: str) -> Path:
        file = self._root / check_path(path)
        if not self._inside(file):
            raise KeyNotFound(
                f"nothing is stored at key storage path {path!r} (no such file under {str(self._root)!r})",
                code="KeyNotFound",
                resource_id=path,
            )
        return file

    def _read_only(self) -> KeystoreReadOnly:
        return KeystoreReadOnly(
            f"key storage is the directory {str(self._root)!r} (STEPWORKER_KEYSTORE_DIR), which is read-only"
            " here: manage its files directly",
            code="KeystoreReadOnly",
        )


def open_keystore(settings: Settings, redis_client: redis.Redis) -> KeyStore:
    """The key storage the settings select: the directory backend when set, else Redis with the master key.

    Cheap and lazy: the master key is read (and checked) when a value is first read or written.
    """
    if settings.keystore_dir is not None:
        return DirectoryKeyStore(settings.keystore_dir)
    return RedisKeyStore(redis_client, Keys(settings.key_prefix), functools.partial(master_key_from, settings))
