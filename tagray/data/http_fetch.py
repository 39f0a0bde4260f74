"""Image bytes over http(s), for featurize (YFCC100M's download URLs are `http://`).

One GET through `requests` (a connection pool per thread; proxies from the environment)
with, per attempt:

- a connect timeout and a read timeout (the longest wait for the next bytes), both
  `http_timeout_s`, and a deadline `http_total_timeout_s` for the whole response;
- redirects followed by hand: only to http(s), at most `http_max_redirects`, each target
  checked against the allow-list again;
- `max_bytes` enforced while streaming: a Content-Length above it is refused before the
  body is read, and a body without one is read in chunks and cut off at max_bytes + 1
  bytes, so an endless or lying body costs at most that much memory and traffic;
- an optional host allow-list (`allow_hosts`: `host` matches itself, `.example.com`
  also its subdomains).

Connection errors, timeouts, 5xx and 429 are retried `http_retries` times with
exponential backoff (`http_backoff_s`·2^k, jittered, at least a Retry-After of up to
30 s); other 4xx are not (RFC 9110 §15.5: the request itself is at fault). Every failure
is a FetchError whose `reason` is one line for `errors.parquet` (`http 404`,
`timeout after 10 s (read)`, `oversized file: over max_bytes 50000000`,
`redirect to ftp://… refused: …`, `host x not in allow_hosts`), its URLs redacted.

requests is imported on first use, so the decode tasks that never see an http URL do
not pay for it.
"""

from __future__ import annotations

import ipaddress
import math
import random
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from tagray.config import ConfigError
from tagray.data.storage import redact

CHUNK_BYTES = 64 * 1024  # one read of the body
MAX_RETRY_AFTER_S = 30.0  # a server's Retry-After is honoured up to this
_REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "tagray-featurize (+https://github.com/tagray/tagray)"


@dataclass(frozen=True)
class HttpSettings:
    """How featurize fetches http(s) images; the fields (and defaults) are FeaturizeConfig's
    of the same names."""

    http_timeout_s: float = 10.0  # connect timeout, and the longest wait for the next bytes
    http_total_timeout_s: float = 60.0  # longest one attempt may take, redirects and body included
    http_retries: int = 2  # further attempts after a connection error, a timeout, a 5xx or a 429
    http_backoff_s: float = 0.5  # wait before retry k: http_backoff_s·2^k, jittered ×0.5–1
    http_max_redirects: int = 5  # redirects followed per attempt (only to http/https)
    allow_hosts: tuple[str, ...] = ()  # hosts images may come from (empty: any); ".example.com": and subdomains

    def __post_init__(self) -> None:
        check_settings(self.http_timeout_s, self.http_total_timeout_s, self.http_retries,
                       self.http_backoff_s, self.http_max_redirects, self.allow_hosts)


def check_settings(timeout_s: float, total_timeout_s: float, retries: int, backoff_s: float,
                   max_redirects: int, allow_hosts: tuple[str, ...]) -> None:
    """ConfigError naming the field when a setting is out of range."""
    for name, value, zero_ok, hi in (("http_timeout_s", timeout_s, False, 3600.0),
                                     ("http_total_timeout_s", total_timeout_s, False, 86400.0),
                                     ("http_backoff_s", backoff_s, True, 300.0)):
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not number or not (value >= 0 if zero_ok else value > 0) or value > hi:
            bound = "≥ 0" if zero_ok else "> 0"
            raise ConfigError(f"{name} must be a finite number of seconds {bound} and ≤ {hi:g}, got {value!r}")
    for name, value, hi in (("http_retries", retries, 10), ("http_max_redirects", max_redirects, 30)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
            raise ConfigError(f"{name} must be an integer in [0, {hi}], got {value!r}")
    if isinstance(allow_hosts, str) or not isinstance(allow_hosts, (tuple, list)):
        raise ConfigError(f"allow_hosts must be a list of host names, got {allow_hosts!r}")
    for host in allow_hosts:
        bare = host.lstrip(".") if isinstance(host, str) else ""
        if not bare or any(c in bare for c in "/@?# \t") or (":" in bare and not _is_ip(bare)):
            raise ConfigError(f"allow_hosts: {host!r} is not a host name (give e.g. farm1.staticflickr.com "
                              "or .staticflickr.com, without scheme, port or path)")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class FetchError(Exception):
    """A URL that could not be fetched; `reason` is one line for errors.parquet and
    `bytes_read` how much of a body was read before giving up."""

    def __init__(self, reason: str, bytes_read: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bytes_read = bytes_read


class _Transient(FetchError):
    """A failure worth another attempt; `retry_after` the server's Retry-After in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Fetched:
    """A fetched body, the URL it came from at last, and what it took."""

    data: bytes
    url: str
    attempts: int
    redirects: int


def fetch(url: str, max_bytes: int, settings: HttpSettings | None = None) -> bytes:
    """The body at `url`, at most `max_bytes` long; FetchError otherwise."""
    return get(url, max_bytes, settings).data


def get(url: str, max_bytes: int, settings: HttpSettings | None = None) -> Fetched:
    """`fetch`, telling how many attempts and redirects it took."""
    s = settings or HttpSettings()
    attempts = s.http_retries + 1
    for attempt in range(attempts):
        try:
            return _attempt(url, max_bytes, s, attempt + 1)
        except _Transient as e:
            if attempt + 1 == attempts:
                raise FetchError(e.reason + (f" ({attempts} attempts)" if attempts > 1 else "")) from None
            time.sleep(backoff_delay(attempt, s.http_backoff_s, e.retry_after))  # the backoff itself
    raise AssertionError("unreachable")


def backoff_delay(retry: int, backoff_s: float, retry_after: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry `retry` (0-based): backoff_s·2^retry times a jitter in
    [0.5, 1] (so that many tasks do not retry in step), and at least the server's
    Retry-After, itself capped at MAX_RETRY_AFTER_S."""
    delay = backoff_s * 2**retry * (rng or random).uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
    return delay


def _check_target(url: str, s: HttpSettings, via_redirect: bool) -> None:
    """Only http(s) URLs with a host, inside the allow-list when there is one."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        if via_redirect:
            raise FetchError(f"redirect to {redact(url)} refused: only http and https redirects are followed")
        raise FetchError(f"not an http(s) URL: {redact(url)}")
    try:
        host = (parts.hostname or "").rstrip(".")
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise FetchError(f"bad URL: {redact(url)}") from None
    if not host:
        raise FetchError(f"bad URL (no host): {redact(url)}")
    if s.allow_hosts and not _allowed(host, s.allow_hosts):
        raise FetchError(("redirect refused: " if via_redirect else "") + f"host {host} not in allow_hosts")


def _allowed(host: str, allow_hosts: tuple[str, ...]) -> bool:
    for entry in allow_hosts:
        entry = entry.lower().rstrip(".")
        if host == entry.lstrip(".") or (entry.startswith(".") and host.endswith(entry)):
            return True
    return False


_local = threading.local()


def _session():
    """This thread's requests Session (its own connection pools)."""
    if getattr(_local, "session", None) is None:
        import requests

        session = requests.Session()
        session.headers["User-Agent"] = USER_AGENT
        _local.session = session
    return _local.session


def _attempt(url: str, max_bytes: int, s: HttpSettings, attempt: int) -> Fetched:
    import requests

    deadline = time.monotonic() + s.http_total_timeout_s
    current = url
    for hop in range(s.http_max_redirects + 1):
        _check_target(current, s, via_redirect=hop > 0)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Transient(f"timeout after {s.http_total_timeout_s:g} s (whole response)")
        timeout = min(s.http_timeout_s, remaining)
        try:
            resp = _session().get(current, stream=True, allow_redirects=False, timeout=(timeout, timeout))
        except requests.exceptions.ConnectTimeout:
            raise _Transient(f"timeout after {timeout:g} s (connect)") from None
        except requests.exceptions.ReadTimeout:
            raise _Transient(f"timeout after {timeout:g} s (read)") from None
        except requests.exceptions.SSLError as e:
            raise FetchError(f"tls error: {_cause(e)}") from None
        except requests.exceptions.ConnectionError as e:
            raise _Transient(f"connection failed: {_cause(e)}") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                requests.exceptions.MissingSchema, requests.exceptions.InvalidHeader, ValueError):
            raise FetchError(f"bad URL: {redact(current)}") from None
        except requests.exceptions.RequestException as e:
            raise FetchError(f"request failed: {type(e).__name__}") from None
        try:
            status = resp.status_code
            if status in _REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise FetchError(f"http {status} without a Location header")
                current = urljoin(current, location)
                continue
            if status == 429 or status >= 500:
                raise _Transient(f"http {status}", _retry_after(resp.headers.get("Retry-After")))
            if not 200 <= status < 300:
                raise FetchError(f"http {status}")
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise FetchError(f"oversized file: over max_bytes {max_bytes} (Content-Length {length})")
            return Fetched(_read_body(resp, max_bytes, deadline, s), current, attempt, hop)
        finally:
            resp.close()  # a body read to its end has released its connection to the pool already
    raise FetchError(f"too many redirects (more than http_max_redirects {s.http_max_redirects})")


def _read_body(resp, max_bytes: int, deadline: float, s: HttpSettings) -> bytes:
    """At most max_bytes + 1 bytes of the (decoded) body, read in chunks."""
    from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError

    limit = max_bytes + 1
    body = bytearray()
    try:
        while len(body) < limit:
            if time.monotonic() > deadline:
                raise _Transient(f"timeout after {s.http_total_timeout_s:g} s (whole response)")
            chunk = resp.raw.read(min(CHUNK_BYTES, limit - len(body)), decode_content=True)
            if not chunk:
                break
            body += chunk
    except ReadTimeoutError:
        raise _Transient(f"timeout after {s.http_timeout_s:g} s (read)") from None
    except SSLError as e:
        raise FetchError(f"tls error: {_cause(e)}") from None
    except DecodeError:
        raise FetchError(f"body not decodable as its Content-Encoding {resp.headers.get('Content-Encoding')!r}") from None
    except (ProtocolError, OSError) as e:
        raise _Transient(f"connection broken after {len(body)} bytes: {_cause(e)}") from None
    if len(body) > max_bytes:
        raise FetchError(f"oversized file: over max_bytes {max_bytes}", bytes_read=len(body))
    return bytes(body)


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (its delay-seconds form; an HTTP date is ignored)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _cause(error: BaseException) -> str:
    """The innermost OS-level reason of a requests/urllib3 error ("Connection refused",
    "Name or service not known"), without the URLs and object reprs their messages carry."""
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        stack.extend(x for x in (getattr(e, "reason", None), e.__cause__, e.__context__, *e.args)
                     if isinstance(x, BaseException))
    return type(error).__name__
