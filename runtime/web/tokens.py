"""Access tokens of the web console, as in Jupyter: random per start, in files only the owner reads.

Why tokens and not the agent's CurveZMQ keys: a browser cannot hold a CurveZMQ key. The web
process holds its own operator key towards the agent and hands out two bearer tokens: the
operator token may command, the viewer token may only watch. Each start writes new ones
(``operator.token``, ``viewer.token``, mode 0600 from their first byte) so a token copied
from an old log stops working at the next restart. A token arrives once as ``?token=`` and is
then kept in an HttpOnly, SameSite=Strict cookie, so page scripts never see it and other sites
cannot send it.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write

COOKIE = "continua_token"
ROLES = ("operator", "viewer")


@dataclass(frozen=True)
class Tokens:
    operator: str
    viewer: str

    def role_of(self, candidate: str | None) -> str | None:
        """``"operator"``, ``"viewer"`` or None; compared in constant time."""
        if not candidate:
            return None
        for role in ROLES:
            if hmac.compare_digest(candidate.encode(), getattr(self, role).encode()):
                return role
        return None


def issue(state_dir: str | Path) -> Tokens:
    """New tokens for this start, written to ``state_dir/{operator,viewer}.token`` (0600, atomically)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    tokens = Tokens(operator=secrets.token_urlsafe(24), viewer=secrets.token_urlsafe(24))
    for role in ROLES:
        atomic_write(state_dir / f"{role}.token", (getattr(tokens, role) + "\n").encode(), mode=0o600)
    return tokens


def read(state_dir: str | Path, role: str = "operator") -> str:
    """The token a running console wrote (for scripts and tests on the same machine)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    return (Path(state_dir) / f"{role}.token").read_text().strip()


def from_request(headers: dict[str, str], cookies: dict[str, str], query: dict[str, str]) -> str | None:
    """The token a request carries: ``Authorization: Bearer``, then the cookie, then ``?token=``."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return cookies.get(COOKIE) or query.get("token")
