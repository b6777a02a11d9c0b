"""The online Authentication Server (issue 7): challenge with key change, keysets on request.

Sans-IO core: ``messages`` (wire), ``keystate`` (two-phase key change, clone
detection), ``cookies`` (admission), ``protocol`` (server and client
sessions); store: ``store`` (SQLite, the desk's file) and ``postgres``;
adapters: ``server``, ``client``; fleets: ``meters``. See
``docs/authentication-server.md``.
"""

from __future__ import annotations

from provisioning.authserver.errors import (
    AuthRefused,
    AuthServerError,
    LocalAuthError,
    MessageError,
    Refusal,
    RemoteAuthError,
    StoreUnavailable,
)
from provisioning.authserver.protocol import AuthService, ClientSession, ServerSession

__all__ = [
    "AuthRefused",
    "AuthServerError",
    "AuthService",
    "ClientSession",
    "LocalAuthError",
    "MessageError",
    "Refusal",
    "RemoteAuthError",
    "ServerSession",
    "StoreUnavailable",
]
