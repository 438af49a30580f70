"""Opening sockets and the few HTTP calls the client makes (urllib, in a thread)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import inspect
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

from .errors import AuthError, Code, ConnectError, HaleError, ProtocolError, SessionClosed

try:  # websockets >= 13: the asyncio implementation.
    from websockets.asyncio.client import connect as _ws_connect

    _NEW_API = True
except ImportError:  # pragma: no cover - websockets 12: the legacy implementation.
    from websockets.client import connect as _ws_connect  # type: ignore[no-redef, attr-defined, unused-ignore]

    _NEW_API = False

from websockets.exceptions import ConnectionClosed, InvalidHandshake

SESSION_PATH = "/v1/session"
#: Largest message accepted from hale: a welcome or rollback carries a whole state (4 MiB
#: by default, more if the server allows it).
MAX_MESSAGE = 64 * 1024 * 1024

_CONNECT_PARAMS = set(inspect.signature(_ws_connect).parameters)

__all__ = [
    "ConnectionClosed",
    "Credentials",
    "open_socket",
    "http_json",
    "http_json_blocking",
    "http_follow",
    "http_follow_blocking",
    "follow_blocking",
    "HttpStream",
    "MAX_MESSAGE",
    "addresses",
    "with_authority",
]

_T = TypeVar("_T")

#: How long an HTTP call keeps following ``not_leader`` answers and unreachable nodes of a
#: cluster: about two elections at the default timeouts, a few at the slow ones.
FOLLOW_FOR = 5.0


def _one_address(text: str) -> str:
    url = text.strip().rstrip("/")
    if url.startswith("https://"):
        return "wss://" + url[len("https://") :]
    if url.startswith("http://"):
        return "ws://" + url[len("http://") :]
    if "://" not in url:
        return "ws://" + url
    return url


def addresses(url: Union[str, Sequence[str]]) -> List[str]:
    """The WebSocket addresses in ``url``: one address, several separated by commas (as in
    ``HALE_URL``), or a list of them (each of which may hold commas too). ``http://`` and
    ``https://`` become ``ws://`` and ``wss://``, a bare ``host:port`` is ``ws://host:port``;
    empty entries and repeats are dropped, the order is kept."""
    given = [url] if isinstance(url, str) else list(url)
    found: List[str] = []
    for entry in given:
        for part in str(entry).split(","):
            if not part.strip():
                continue
            address = _one_address(part)
            if address not in found:
                found.append(address)
    return found


def with_authority(base: str, authority: str) -> str:
    """``base`` with its ``host:port`` replaced by ``authority`` (``ws://a:1`` and ``b:2``
    give ``ws://b:2``): where a node that does not lead says the leader is."""
    scheme, sep, _ = base.partition("://")
    return f"{scheme}://{authority}" if sep else f"ws://{authority}"


def http_base(url: str) -> str:
    """The HTTP base address of the hale whose WebSocket address is ``url``."""
    if url.startswith("wss://"):
        url = "https://" + url[len("wss://") :]
    elif url.startswith("ws://"):
        url = "http://" + url[len("ws://") :]
    return url.rstrip("/")


def _ssl_context(url: str, ca_file: Optional[str]) -> Optional[ssl.SSLContext]:
    if not (url.startswith("wss://") or url.startswith("https://")):
        return None
    if ca_file is None:
        raise ConnectError(
            f"{url}: a TLS hale is verified against a CA file: pass ca_file= or set HALE_CA_FILE"
        )
    return ssl.create_default_context(cafile=ca_file)


def _jwt_claim(token: str, name: str) -> Optional[int]:
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        value = json.loads(base64.urlsafe_b64decode(payload)).get(name)
        return int(value) if isinstance(value, int) else None
    except (IndexError, ValueError, AttributeError):
        return None


def jwt_expiry(token: str) -> Optional[int]:
    """The ``exp`` of a JWT, read without checking it (hale checks)."""
    return _jwt_claim(token, "exp")


def _http_blocking(
    method: str,
    url: str,
    body: Optional[Mapping[str, Any]],
    token: Optional[str],
    ca_file: Optional[str],
    timeout: float,
) -> Tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = _ssl_context(url, ca_file)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except (urllib.error.URLError, OSError) as error:
        raise ConnectError(f"{url}: {error}") from error
    try:
        decoded = json.loads(raw) if raw else None
    except ValueError:
        decoded = raw.decode(errors="replace")
    return status, decoded


async def http_json(
    method: str,
    url: str,
    body: Optional[Mapping[str, Any]] = None,
    *,
    token: Optional[str] = None,
    ca_file: Optional[str] = None,
    timeout: float = 10.0,
) -> Any:
    """``method url`` with a JSON body; the decoded answer, or the error it reports."""
    loop = asyncio.get_running_loop()
    status, decoded = await loop.run_in_executor(
        None, _http_blocking, method, url, body, token, ca_file, timeout
    )
    return _answer(status, decoded, url)


def _answer(status: int, decoded: Any, url: str) -> Any:
    """A 2xx answer's decoded body; otherwise the error hale's error body reports (a
    :class:`ProtocolError` for an answer without one)."""
    if 200 <= status < 300:
        return decoded
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), dict):
        raise HaleError.from_body(decoded["error"])
    raise ProtocolError(f"HTTP {status} from {url}: {decoded!r}")


def http_json_blocking(
    method: str,
    url: str,
    body: Optional[Mapping[str, Any]] = None,
    *,
    token: Optional[str] = None,
    ca_file: Optional[str] = None,
    timeout: float = 10.0,
) -> Any:
    """:func:`http_json` in the calling thread: ``method url`` with a JSON body; the
    decoded answer, or the error it reports (:class:`ConnectError` if hale cannot be
    reached)."""
    status, decoded = _http_blocking(method, url, body, token, ca_file, timeout)
    return _answer(status, decoded, url)


async def http_follow(
    method: str,
    bases: Sequence[str],
    path: str,
    body: Optional[Mapping[str, Any]] = None,
    *,
    token: Optional[str] = None,
    ca_file: Optional[str] = None,
    timeout: float = 10.0,
    follow_for: float = FOLLOW_FOR,
) -> Any:
    """``method path`` at the first of ``bases`` (WebSocket or HTTP addresses of the nodes
    of a cluster), following the leader for up to ``follow_for`` seconds: a ``not_leader``
    answer sends the request to the leader it names or, during an election, after 50 ms
    to the next address; an unreachable node is passed over for the next (given several).
    Whether a write was applied is not in doubt when a follower refuses it; a leader
    that lost its leadership with the write in flight answers ``not_leader`` too, and the
    write goes again to the new leader."""
    if not bases:
        raise ConnectError("no address given")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + follow_for
    base = bases[0]
    tried = 0
    while True:
        tried += 1
        following = loop.time() < deadline
        try:
            return await http_json(method, f"{http_base(base)}{path}", body, token=token, ca_file=ca_file, timeout=timeout)
        except ConnectError:
            if not (following and len(bases) > 1):
                raise
            base = _next_after(bases, base, tried)
            await asyncio.sleep(0.05 if tried >= len(bases) else 0)
        except HaleError as error:
            if not (following and error.code == Code.NOT_LEADER):
                raise
            if error.leader:
                base = with_authority(base, error.leader)
            else:
                # An election: give it a moment, then ask the next node.
                await asyncio.sleep(0.05)
                base = _next_after(bases, base, tried)


def _next_after(bases: Sequence[str], base: str, tried: int) -> str:
    at = bases.index(base) if base in bases else tried
    return bases[(at + 1) % len(bases)]


def follow_blocking(
    bases: Sequence[str],
    attempt: Callable[[str], _T],
    *,
    follow_for: float = FOLLOW_FOR,
) -> Tuple[str, _T]:
    """``attempt(base)`` at the first of ``bases``, following the leader as
    :func:`http_follow` does, in the calling thread (it sleeps between tries): ``attempt``
    raises :class:`ConnectError` for a node it cannot reach and :class:`NotLeader` for one
    that does not lead. Returns the address that answered (the leader, on a cluster) and
    what ``attempt`` returned there; raises the last error once ``follow_for`` seconds
    have passed, or at once for any other error."""
    if not bases:
        raise ConnectError("no address given")
    deadline = time.monotonic() + follow_for
    base = bases[0]
    tried = 0
    while True:
        tried += 1
        following = time.monotonic() < deadline
        try:
            return base, attempt(base)
        except ConnectError:
            if not (following and len(bases) > 1):
                raise
            base = _next_after(bases, base, tried)
            if tried >= len(bases):
                time.sleep(0.05)
        except HaleError as error:
            if not (following and error.code == Code.NOT_LEADER):
                raise
            if error.leader:
                base = with_authority(base, error.leader)
            else:
                # An election: give it a moment, then ask the next node.
                time.sleep(0.05)
                base = _next_after(bases, base, tried)


def http_follow_blocking(
    method: str,
    bases: Sequence[str],
    path: str,
    body: Optional[Mapping[str, Any]] = None,
    *,
    token: Optional[str] = None,
    ca_file: Optional[str] = None,
    timeout: float = 10.0,
    follow_for: float = FOLLOW_FOR,
    on_answer: Optional[Callable[[str], None]] = None,
) -> Any:
    """:func:`http_follow` in the calling thread: ``method path`` at the first of ``bases``
    (WebSocket or HTTP addresses of the nodes of a cluster), following the leader for up
    to ``follow_for`` seconds (a ``not_leader`` answer sends the request to the leader it
    names or, during an election, after 50 ms to the next address; an unreachable node
    is passed over for the next, given several). ``on_answer`` is called with the address
    that answered, so the caller can start there next time. Returns the decoded answer;
    raises the error hale reports, or :class:`ConnectError`."""

    def attempt(base: str) -> Any:
        return http_json_blocking(method, f"{http_base(base)}{path}", body, token=token, ca_file=ca_file, timeout=timeout)

    answered, answer = follow_blocking(bases, attempt, follow_for=follow_for)
    if on_answer is not None:
        on_answer(answered)
    return answer


class HttpStream:
    """An HTTP answer read line by line as hale writes it (server-sent events, NDJSON), on
    a connection of its own that another thread may :meth:`close` to stop a read that
    waits. Opening it raises :class:`ConnectError` if hale cannot be reached and the
    error hale reports if it answers with an error status."""

    def __init__(
        self,
        method: str,
        url: str,
        body: Optional[Mapping[str, Any]] = None,
        *,
        token: Optional[str] = None,
        ca_file: Optional[str] = None,
        timeout: float = 10.0,
        idle_timeout: Optional[float] = None,
    ) -> None:
        self.url = url
        parts = urllib.parse.urlsplit(url)
        context = _ssl_context(url, ca_file)
        host = parts.hostname or "127.0.0.1"
        connection: http.client.HTTPConnection
        if context is not None:
            connection = http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=context)
        else:
            connection = http.client.HTTPConnection(host, parts.port, timeout=timeout)
        self._connection = connection
        self._lock = threading.Lock()
        self._closed = False
        self._sock: Optional[socket.socket] = None
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        try:
            connection.connect()
            # Kept to shut it down from another thread: the response holds the socket's
            # file, so closing the connection alone would not wake a read that waits.
            self._sock = connection.sock
            connection.request(method, target, body=data, headers=headers)
            self._response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise ConnectError(f"{url}: {error}") from error
        status = self._response.status
        if not 200 <= status < 300:
            try:
                raw = self._response.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            self.close()
            try:
                decoded = json.loads(raw) if raw else None
            except ValueError:
                decoded = raw.decode(errors="replace")
            _answer(status, decoded, url)
        if self._sock is not None:
            self._sock.settimeout(idle_timeout)

    def readline(self) -> bytes:
        """The next line (with its newline); ``b""`` once the answer has ended. Raises
        :class:`SessionClosed` if the connection broke, went quiet for longer than
        ``idle_timeout``, or was closed."""
        try:
            return self._response.readline()
        except (OSError, ValueError, http.client.HTTPException) as error:
            raise SessionClosed(f"{self.url}: the answer broke off: {error}") from error

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Closes the connection; a read waiting in another thread returns at once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError, http.client.HTTPException):
            self._connection.close()
        response = getattr(self, "_response", None)
        if response is not None:
            with contextlib.suppress(OSError, http.client.HTTPException):
                response.close()


class Credentials:
    """An agent's access token and, if held, its refresh token; refreshed (rotated) at
    ``POST /v1/auth/refresh`` when the access token is due to expire."""

    def __init__(
        self, access: Optional[str], refresh: Optional[str], refresh_ahead: float = 60.0
    ) -> None:
        self.access = access
        self.refresh_token = refresh
        self.refresh_ahead = refresh_ahead
        self.refreshes = 0
        #: Every node of the cluster (WebSocket addresses): a refresh follows the leader.
        self.nodes: List[str] = []
        self._lock = asyncio.Lock()

    def renew_in(self) -> Optional[float]:
        """Seconds until the access token should be renewed (0 if due): ``refresh_ahead``
        before it expires, or a third of its lifetime if that is shorter. None without a
        refresh token or a token hale issued."""
        if self.access is None or self.refresh_token is None:
            return None
        exp = jwt_expiry(self.access)
        if exp is None:
            return None
        issued = _jwt_claim(self.access, "iat") or _jwt_claim(self.access, "nbf") or 0
        ahead = min(self.refresh_ahead, max(exp - issued, 0) / 3)
        return max(exp - ahead - time.time(), 0.0)

    def due(self) -> bool:
        return self.renew_in() == 0.0

    async def refresh(self, url: str, agent: str, ca_file: Optional[str], force: bool = False) -> bool:
        """Trades the refresh token for a new pair if due (or ``force``). True if it did."""
        async with self._lock:
            if self.refresh_token is None or not (force or self.due()):
                return False
            # A refresh is a write: on a cluster it follows the leader from ``url``.
            bases = [url] + [node for node in self.nodes if node != url]
            answer = await http_follow(
                "POST",
                bases,
                "/v1/auth/refresh",
                {"agent": agent, "refresh_token": self.refresh_token},
                ca_file=ca_file,
            )
            if not isinstance(answer, dict) or "access_token" not in answer:
                raise ProtocolError(f"unexpected answer to a token refresh: {answer!r}")
            self.access = str(answer["access_token"])
            self.refresh_token = str(answer.get("refresh_token", self.refresh_token))
            self.refreshes += 1
            return True


def _refusal(error: BaseException) -> Optional[HaleError]:
    """The error hale gave for a refused WebSocket upgrade (401, 403), if it was that.
    websockets 12 does not keep the body: then the code is only a guess from the status
    and ``known`` is set false on the error."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None) or getattr(error, "status_code", None)
    if status not in (401, 403):
        return None
    body = getattr(response, "body", None)
    try:
        decoded = json.loads(body) if body else None
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), dict):
        return HaleError.from_body(decoded["error"])
    # websockets 12 does not keep the body: say what the status means.
    code = Code.UNAUTHENTICATED if status == 401 else Code.FORBIDDEN
    guessed = AuthError(code, f"hale refused the session with HTTP {status}", False)
    guessed.known = False
    return guessed


async def open_socket(url: str, agent: str, credentials: Credentials, ca_file: Optional[str]) -> Any:
    """Opens a session's WebSocket at ``url`` (refreshing the access token first if it is
    due, and once more if hale says it expired). Raises :class:`ConnectError` if hale
    cannot be reached and :class:`AuthError` if it refuses the tokens."""
    endpoint = f"{url.rstrip('/')}{SESSION_PATH}"
    context = _ssl_context(url, ca_file)
    await credentials.refresh(url, agent, ca_file)
    for attempt in range(2):
        headers: Dict[str, str] = {}
        if credentials.access:
            headers["Authorization"] = f"Bearer {credentials.access}"
        kwargs: Dict[str, Any] = {
            "max_size": MAX_MESSAGE,
            "compression": None,
            "open_timeout": 10,
            "close_timeout": 2,
        }
        kwargs["additional_headers" if _NEW_API else "extra_headers"] = headers
        if "proxy" in _CONNECT_PARAMS:
            kwargs["proxy"] = None
        if context is not None:
            kwargs["ssl"] = context
        try:
            return await _ws_connect(endpoint, **kwargs)
        except InvalidHandshake as error:
            refused = _refusal(error)
            if refused is None:
                raise ConnectError(f"{endpoint}: {error}") from error
            expired = refused.code == Code.TOKEN_EXPIRED or (refused.code == Code.UNAUTHENTICATED and not refused.known)
            if expired and attempt == 0 and credentials.refresh_token:
                await credentials.refresh(url, agent, ca_file, force=True)
                continue
            raise refused from error
        except (OSError, asyncio.TimeoutError) as error:
            raise ConnectError(f"{endpoint}: {error}") from error
    raise ConnectError(f"{endpoint}: the refreshed token was refused too")  # pragma: no cover
