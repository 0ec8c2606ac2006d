"""Who may talk to the server: the Host header, the Origin of state-changing requests, and the API key.

`Access` is ASGI middleware, outermost in the app, so a refused request is answered before its body is read:
1. Host: the header's name must be in the allow-list (by default the loopback names when the server listens on a
   loopback address: a web page cannot reach it through DNS rebinding); otherwise 400.
2. Origin: a browser's cross-site POST (a form or fetch from another site) is refused 403 unless its origin is a
   `--cors-origin`; same-origin requests (the playground page) and clients that send no Origin pass.
3. API key: with `--api-key`, every route but /healthz, /readyz and the hosted images of `url` answers
   (/v1/images/files/<name>: like OpenAI's image URLs, fetchable without credentials; the 192-bit random name is
   the credential, and it expires) needs `Authorization: Bearer <key>`; otherwise 401. CORS preflights (OPTIONS with Access-Control-Request-Method) carry no credentials and are let through
   to Starlette's CORSMiddleware.
Every refusal has OpenAI's error shape. Starlette's TrustedHostMiddleware is not used: it answers in plain text.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Iterable

from engine.server.image_files import ROUTE as IMAGE_ROUTE
from engine.server.schemas import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"
OPEN_PATHS = ("/healthz", "/readyz")  # never need the API key: orchestrators probe them
OPEN_PREFIXES = (IMAGE_ROUTE,)  # nor do hosted images: their unguessable names are the credential
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def is_loopback(host: str) -> bool:
    """Whether a listen address (or name) is the loopback interface."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(listen_host: str, extra: Iterable[str]) -> frozenset[str] | None:
    """The Host names the server answers (lower case, no port, IPv6 without brackets); None = any. Loopback
    names when listening on loopback, plus `extra`; on another address only `extra` (none given: any, since
    the server cannot know the names it is reached by). "*" in `extra` allows any."""
    names = {_strip_brackets(h.lower()) for h in extra}
    if ANY_HOST in names:
        return None
    if is_loopback(listen_host):
        names.update(LOOPBACK_NAMES)
    return frozenset(names) or None


def host_name(header: str) -> str:
    """The name of a Host header without its port, lower case: "[::1]:8000" -> "::1", "Example:80" -> "example"."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _strip_brackets(name: str) -> str:
    return name[1:-1] if name.startswith("[") and name.endswith("]") else name


class Access:
    """ASGI middleware: Host allow-list, cross-site Origin refusal on state-changing requests, bearer API key."""

    def __init__(self, app, hosts: frozenset[str] | None, cors_origins: Iterable[str], api_key: str | None,
                 on_refused=None):
        self.app, self.hosts, self.api_key = app, hosts, api_key
        self.origins = frozenset(o.rstrip("/").lower() for o in cors_origins)
        self.on_refused = on_refused  # (path, status) -> None: counts refusals in the metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = self.refusal(scope)
        if err is None:
            return await self.app(scope, receive, send)
        if self.on_refused is not None:
            self.on_refused(scope.get("path", ""), err.status)
        data = json.dumps(err.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    def refusal(self, scope) -> ApiError | None:
        """Why this request is refused, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return ApiError(400, f"Host {host!r} is not one this server answers to (allowed: "
                                 f"{', '.join(sorted(self.hosts))}; add names with --allowed-host)",
                            kind="invalid_host")
        origin = headers.get("origin")
        method = scope.get("method", "GET").upper()
        preflight = method == "OPTIONS" and "access-control-request-method" in headers
        if origin is not None and (method in STATE_CHANGING or preflight) and not self._origin_ok(origin, host):
            return ApiError(403, f"cross-site request from origin {origin!r} refused (allowed origins: this server's "
                                 "own, and --cors-origin)", kind="forbidden_origin")
        path = scope.get("path", "")
        keyless = path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
        if self.api_key is not None and not preflight and not keyless:
            if not self._key_ok(headers.get("authorization", "")):
                return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (--api-key)",
                                kind="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    def _origin_ok(self, origin: str, host: str) -> bool:
        """The server's own origin (same host and port; any scheme, for a TLS proxy in front) or an allowed one."""
        origin = origin.rstrip("/").lower()
        return origin.partition("://")[2] == host.strip().lower() or origin in self.origins

    def _key_ok(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
