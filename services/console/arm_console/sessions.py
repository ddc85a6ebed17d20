"""Sessions and CSRF tokens.

A sign-in exchanges an operator's API key for a session key of the same operator (the
registry's CreateSessionKey: it expires with the session and is revoked with the operator's key)
and that for a session cookie. The cookie is a Fernet token (the `cryptography` library:
AES-128-CBC encrypted, HMAC-SHA256 signed, time-stamped) holding the session id, the session key
and who it belongs to: the key is never readable from the cookie, a cookie changed by one bit is
refused, and one older than the session lifetime is refused. Any console replica sharing the
secret reads it. Signing out revokes the session key (RevokeCallerKey: a copy of the cookie
taken before stops working on every replica, once the services refuse the key) and forgets the
session id in this process at once.

CSRF tokens are bound to the session id (itsdangerous, signed with a key derived from the same
secret): a form posted without the token of the current session is refused. The sign-in form,
before any session, is bound to a random nonce in its own short-lived cookie."""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import asdict, dataclass

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from itsdangerous import BadSignature, URLSafeTimedSerializer

SESSION_COOKIE = "arm_console_session"
PRESESSION_COOKIE = "arm_console_signin"
PRESESSION_TTL_S = 3600


def _derive(secret: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"arm-console " + purpose).derive(
        secret.encode())


@dataclass(frozen=True)
class Session:
    """Who is signed in. `api_key` stays on the server side of every page: templates never get it."""

    sid: str
    api_key: str
    tenant_id: str
    actor_id: str
    display_name: str
    issued_at: float

    def public(self) -> dict[str, str]:
        """What templates may show."""
        return {"tenant_id": self.tenant_id, "actor_id": self.actor_id, "display_name": self.display_name}


class SessionCodec:
    def __init__(self, secret: str, ttl_s: float) -> None:
        self._fernet = Fernet(base64.urlsafe_b64encode(_derive(secret, b"session")))
        self._csrf = URLSafeTimedSerializer(base64.urlsafe_b64encode(_derive(secret, b"csrf")).decode(),
                                            salt="arm-console-csrf")
        self.ttl_s = ttl_s
        self._revoked: dict[str, float] = {}  # sid → when its cookie would have expired anyway

    def new_session(self, api_key: str, tenant_id: str, actor_id: str, display_name: str) -> tuple[Session, str]:
        session = Session(secrets.token_urlsafe(18), api_key, tenant_id, actor_id, display_name, time.time())
        return session, self._fernet.encrypt(json.dumps(asdict(session)).encode()).decode()

    def read(self, cookie: str | None) -> Session | None:
        """The session of a cookie; None when absent, forged, altered, expired or signed out."""
        if not cookie:
            return None
        try:
            data = json.loads(self._fernet.decrypt(cookie.encode(), ttl=int(self.ttl_s)))
            session = Session(**data)
        except (InvalidToken, ValueError, TypeError):
            return None
        if session.sid in self._revoked:
            return None
        return session

    def revoke(self, session: Session) -> None:
        now = time.time()
        self._revoked = {sid: until for sid, until in self._revoked.items() if until > now}
        self._revoked[session.sid] = session.issued_at + self.ttl_s

    def csrf_token(self, bound_to: str) -> str:
        return self._csrf.dumps(bound_to)

    def csrf_valid(self, token: str | None, bound_to: str, max_age_s: float) -> bool:
        if not token or not bound_to:
            return False
        try:
            value = self._csrf.loads(token, max_age=int(max_age_s))
        except BadSignature:
            return False
        return isinstance(value, str) and secrets.compare_digest(value, bound_to)
