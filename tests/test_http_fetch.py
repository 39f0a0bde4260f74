"""http(s) images for featurize (tagray.data.http_fetch) against a real HTTP server on
loopback: images, a 404, a 500-then-200, a 429, a slow response, bodies over max_bytes
with and without Content-Length, redirects (relative, to ftp://, in a loop, to another
host) and the host allow-list; then one featurize run over http:// uris."""

from __future__ import annotations

import contextlib
import io
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tagray.config import ConfigError, from_dict
from tagray.data import schema
from tagray.data.http_fetch import (
    CHUNK_BYTES,
    MAX_RETRY_AFTER_S,
    FetchError,
    HttpSettings,
    backoff_delay,
    get,
)
from tagray.features import store
from tagray.features.decode import ImageError, fetch, fetch_and_decode
from tagray.features.pipeline import FeaturizeConfig, featurize

FAST = HttpSettings(http_timeout_s=0.5, http_total_timeout_s=5.0, http_retries=0, http_backoff_s=0.01)
ENDLESS_CAP = 64 * 1024 * 1024  # the endless bodies stop by themselves after this many bytes


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class _State:
    """What the server saw: requests per path, and bytes sent by the endless bodies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.sent: dict[str, int] = {}
        self.done: dict[str, threading.Event] = {}
        self.release = threading.Event()  # ends the slow handlers' waits early at teardown
        self.images = {f"img{i}.jpg": _jpeg(i) for i in range(6)}

    def hit(self, path: str) -> int:
        with self.lock:
            self.hits[path] += 1
            return self.hits[path]


class _Handler(BaseHTTPRequestHandler):
    state: _State  # set on the subclass made per server

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _endless(self, chunked: bool) -> None:
        """A body without Content-Length that never ends (up to ENDLESS_CAP): counts what
        it sent before the client closed the connection."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)  # little kernel buffering
        if chunked:
            self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent, piece = 0, b"\xff" * 8192
        try:
            while sent < ENDLESS_CAP:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
        except OSError:  # the client closed the connection (reset or broken pipe)
            pass
        finally:
            self.close_connection = True
            self.state.sent[self.path] = sent
            self.state.done.setdefault(self.path, threading.Event()).set()

    def do_GET(self) -> None:  # one branch per scenario
        s, path = self.state, self.path
        n = s.hit(path)
        name = path.rsplit("/", 1)[-1]
        if path.startswith("/img/") and name in s.images:
            self._send(200, s.images[name], {"Content-Type": "image/jpeg"})
        elif path.startswith("/flaky/"):  # 500, then the image
            self._send(500, b"busy") if n == 1 else self._send(200, s.images["img1.jpg"])
        elif path.startswith("/busy/"):  # 429 with Retry-After: 0, then the image
            self._send(429, b"slow down", {"Retry-After": "0"}) if n == 1 else self._send(200, s.images["img2.jpg"])
        elif path.startswith("/always500/"):
            self._send(503, b"down")
        elif path.startswith("/slow/"):  # headers only after 3 s (or when released)
            s.release.wait(timeout=3.0)
            with contextlib.suppress(OSError):  # the client may have given up
                self._send(200, s.images["img0.jpg"])
        elif path.startswith("/endless/"):
            self._endless(chunked=False)
        elif path.startswith("/chunked/"):
            self._endless(chunked=True)
        elif path.startswith("/biglength/"):  # claims a huge body, sends none of it
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif path.startswith("/to-ftp/"):
            self._send(302, headers={"Location": "ftp://reader:hunter2pw@example.com/x.jpg?token=s3cr3ttoken"})
        elif path.startswith("/to-img/"):
            self._send(301, headers={"Location": "/img/img3.jpg"})
        elif path.startswith("/loop/"):
            self._send(302, headers={"Location": path})
        elif path.startswith("/to-localhost/"):
            port = self.server.server_address[1]
            self._send(307, headers={"Location": f"http://localhost:{port}/img/img4.jpg"})
        else:
            self._send(404, b"no such image")


@pytest.fixture(scope="module")
def server():
    """(base URL, state) of an HTTP server on 127.0.0.1, a free port, in a thread."""
    state = _State()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    state.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def _reason(url: str, max_bytes: int = 10**6, settings: HttpSettings = FAST) -> FetchError:
    with pytest.raises(FetchError) as e:
        get(url, max_bytes, settings)
    return e.value


def test_image_fetched_with_one_request(server):
    base, state = server
    got = get(f"{base}/img/img0.jpg", 10**6, FAST)
    assert got.data == state.images["img0.jpg"] and got.attempts == 1 and got.redirects == 0
    assert state.hits["/img/img0.jpg"] == 1


def test_404_is_not_retried(server):
    base, state = server
    e = _reason(f"{base}/nothing/here.jpg", settings=HttpSettings(http_retries=3, http_backoff_s=0.01))
    assert e.reason == "http 404"
    assert state.hits["/nothing/here.jpg"] == 1


def test_500_then_200_is_retried_and_counted(server):
    base, state = server
    got = get(f"{base}/flaky/a.jpg", 10**6, HttpSettings(http_retries=2, http_backoff_s=0.01))
    assert got.data == state.images["img1.jpg"] and got.attempts == 2
    assert state.hits["/flaky/a.jpg"] == 2
    # without retries the 500 is the answer
    assert _reason(f"{base}/flaky/b.jpg").reason == "http 500"


def test_429_retried_after_retry_after(server):
    base, state = server
    got = get(f"{base}/busy/a.jpg", 10**6, HttpSettings(http_retries=1, http_backoff_s=0.01))
    assert got.attempts == 2 and got.data == state.images["img2.jpg"]


def test_5xx_retries_are_bounded(server):
    base, state = server
    e = _reason(f"{base}/always500/a.jpg", settings=HttpSettings(http_retries=2, http_backoff_s=0.01))
    assert e.reason == "http 503 (3 attempts)"
    assert state.hits["/always500/a.jpg"] == 3


def test_backoff_grows_exponentially_with_jitter_and_retry_after(server):
    rng = random.Random(0)
    for retry in range(6):
        delays = [backoff_delay(retry, 0.5, None, rng) for _ in range(200)]
        assert 0.25 * 2**retry <= min(delays) and max(delays) <= 0.5 * 2**retry, retry
        assert max(delays) - min(delays) > 0.1 * 2**retry  # jittered, not in step
    assert backoff_delay(0, 0.5, retry_after=4.0, rng=rng) == 4.0  # Retry-After honoured
    assert backoff_delay(0, 0.5, retry_after=3600.0, rng=rng) == MAX_RETRY_AFTER_S  # …up to a cap
    base, _ = server
    t0 = time.monotonic()
    _reason(f"{base}/always500/b.jpg", settings=HttpSettings(http_retries=2, http_backoff_s=0.2))
    assert 0.3 <= time.monotonic() - t0 < 5.0  # the retries did wait (0.2 + 0.4)·[0.5, 1] s


def test_slow_response_times_out(server):
    base, state = server
    t0 = time.monotonic()
    assert _reason(f"{base}/slow/a.jpg").reason == "timeout after 0.5 s (read)"
    assert time.monotonic() - t0 < 2.5  # not the server's 3 s
    e = _reason(f"{base}/slow/b.jpg", settings=HttpSettings(http_timeout_s=0.5, http_retries=1, http_backoff_s=0.01))
    assert e.reason == "timeout after 0.5 s (read) (2 attempts)" and state.hits["/slow/b.jpg"] == 2


def test_connection_refused_is_retried_then_named():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = _reason(f"http://127.0.0.1:{port}/x.jpg", settings=HttpSettings(http_retries=1, http_backoff_s=0.01))
    assert e.reason == "connection failed: Connection refused (2 attempts)"


@pytest.mark.parametrize("kind", ["endless", "chunked"])
def test_body_without_length_cut_off_at_max_bytes(server, kind):
    base, state = server
    max_bytes = 200_000
    path = f"/{kind}/a.jpg"
    e = _reason(base + path, max_bytes=max_bytes)
    assert e.reason == f"oversized file: over max_bytes {max_bytes}"
    assert e.bytes_read == max_bytes + 1  # the client read max_bytes + 1 bytes, then stopped
    assert state.done.setdefault(path, threading.Event()).wait(timeout=10), "the server kept sending"
    # What the server got out before the connection closed: the bytes read, one chunk, and
    # what the loopback socket buffers held (measured: 13 KB over, at 200 KB); far from 64 MiB.
    # (the lower bound is loose: a write the server was in when the client closed is not counted)
    assert max_bytes - CHUNK_BYTES < state.sent[path] <= max_bytes + CHUNK_BYTES + 1024 * 1024, state.sent[path]


def test_content_length_over_max_bytes_refused_before_reading(server):
    base, _ = server
    e = _reason(f"{base}/biglength/a.jpg", max_bytes=1000)
    assert e.reason == "oversized file: over max_bytes 1000 (Content-Length 1000000000)" and e.bytes_read == 0
    # a body of exactly max_bytes is fine
    size = len(server[1].images["img5.jpg"])
    assert get(f"{base}/img/img5.jpg", size, FAST).data == server[1].images["img5.jpg"]
    assert _reason(f"{base}/img/img5.jpg", max_bytes=size - 1).reason.startswith(f"oversized file: over max_bytes {size - 1}")


def test_redirects_followed_only_to_http_and_bounded(server):
    base, state = server
    got = get(f"{base}/to-img/a.jpg", 10**6, FAST)
    assert got.data == state.images["img3.jpg"] and got.redirects == 1 and got.url == f"{base}/img/img3.jpg"
    e = _reason(f"{base}/to-ftp/a.jpg")
    assert e.reason.startswith("redirect to ftp://reader:***@example.com/x.jpg?token=*** refused"), e.reason
    assert "hunter2pw" not in e.reason and "s3cr3ttoken" not in e.reason
    e = _reason(f"{base}/loop/a.jpg", settings=HttpSettings(http_max_redirects=3, http_retries=0))
    assert e.reason == "too many redirects (more than http_max_redirects 3)"
    assert state.hits["/loop/a.jpg"] == 4  # the first request and 3 redirects


def test_allow_hosts(server):
    base, state = server
    port = base.rsplit(":", 1)[1]
    only_ip = HttpSettings(http_timeout_s=0.5, http_retries=0, allow_hosts=("127.0.0.1",))
    assert get(f"{base}/img/img0.jpg", 10**6, only_ip).data == state.images["img0.jpg"]
    before = sum(state.hits.values())
    assert _reason(f"http://localhost:{port}/img/img0.jpg", settings=only_ip).reason == "host localhost not in allow_hosts"
    assert sum(state.hits.values()) == before  # refused before any request
    e = _reason(f"{base}/to-localhost/a.jpg", settings=only_ip)
    assert e.reason == "redirect refused: host localhost not in allow_hosts"
    suffix = HttpSettings(http_timeout_s=0.5, http_retries=0, allow_hosts=(".localhost",))
    assert get(f"http://localhost:{port}/img/img4.jpg", 10**6, suffix).data == state.images["img4.jpg"]
    assert _reason("http://notlocalhost.invalid/x.jpg", settings=suffix).reason == \
        "host notlocalhost.invalid not in allow_hosts"


def test_settings_validated_naming_the_field():
    for kwargs, field in [({"http_timeout_s": float("nan")}, "http_timeout_s"), ({"http_timeout_s": 0}, "http_timeout_s"),
                          ({"http_total_timeout_s": float("inf")}, "http_total_timeout_s"),
                          ({"http_backoff_s": -1.0}, "http_backoff_s"), ({"http_retries": -1}, "http_retries"),
                          ({"http_retries": 1.5}, "http_retries"), ({"http_max_redirects": 99}, "http_max_redirects"),
                          ({"allow_hosts": ("http://flickr.com",)}, "allow_hosts"),
                          ({"allow_hosts": ("flickr.com:80",)}, "allow_hosts"), ({"allow_hosts": "flickr.com"}, "allow_hosts"),
                          ({"max_bytes": 0}, "max_bytes")]:
        with pytest.raises(ConfigError, match=field):
            FeaturizeConfig(**kwargs)
    cfg = from_dict(FeaturizeConfig, {"allow_hosts": [".staticflickr.com", "::1"], "http_retries": 4})
    assert cfg.allow_hosts == (".staticflickr.com", "::1") and cfg.http_retries == 4
    # FeaturizeConfig's http defaults are HttpSettings' (one client, two declarations)
    defaults = HttpSettings()
    assert {k: getattr(FeaturizeConfig(), k) for k in defaults.__dataclass_fields__} == defaults.__dict__


def test_decode_fetch_dispatches_http_and_names_missing_uri(server, tmp_path):
    base, state = server
    assert fetch(f"{base}/img/img0.jpg", 10**6, None, FAST) == state.images["img0.jpg"]
    with pytest.raises(ImageError) as e:
        fetch(f"{base}/gone.jpg", 10**6, None, FAST)
    assert (e.value.stage, e.value.reason) == ("fetch", "http 404")
    for missing in (None, "", "  "):
        with pytest.raises(ImageError) as e:
            fetch(missing, 10**6)
        assert (e.value.stage, e.value.reason) == ("fetch", "missing uri")
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 5000)
    with pytest.raises(ImageError, match="oversized file: over max_bytes 4999"):
        fetch(str(big), 4999)
    assert fetch(str(big), 5000) == b"x" * 5000
    batch = pa.table({"image_id": ["a", "b", "c"], "uri": [f"{base}/img/img1.jpg", None, f"{base}/to-ftp/c.jpg"]})
    out = fetch_and_decode(batch, 32, 36, 10**6, 10**8, None, {"http_timeout_s": 0.5, "http_retries": 0})
    assert list(out["stage"]) == ["", "fetch", "fetch"] and out["pixels"][0].std() > 0
    assert out["reason"][1] == "missing uri" and out["reason"][2].startswith("redirect to ftp://")


@pytest.mark.integration
def test_featurize_over_http(ray_local, server, tmp_path):
    base, state = server
    port = base.rsplit(":", 1)[1]
    good = {f"g{i}": f"{base}/img/img{i}.jpg" for i in range(4)} | {"g-flaky": f"{base}/flaky/feat.jpg"}
    bad = {
        "b404": (f"{base}/missing.jpg", "http 404"),
        "bnull": (None, "missing uri"),
        "bftp": (f"{base}/to-ftp/feat.jpg", "redirect to ftp://reader:***@example.com/x.jpg?token=*** refused"),
        "bbig": (f"{base}/endless/feat.jpg", "oversized file: over max_bytes 100000"),
        "bhost": (f"http://localhost:{port}/img/img0.jpg", "host localhost not in allow_hosts"),
        "bslow": (f"{base}/slow/feat.jpg", "timeout after 0.5 s (read)"),
    }
    uris = list(good.values()) + [u for u, _ in bad.values()]
    ids = list(good) + list(bad)
    manifest = pa.table({"image_id": ids, "user_id": ["u"] * len(ids), "uri": pa.array(uris, pa.string()),
                         "tags": [["x"]] * len(ids)})
    m_uri = str(tmp_path / "manifest.parquet")
    schema.write_manifest(manifest, m_uri)
    cfg = FeaturizeConfig(backbone="resnet18", weights="random", image_size=32, resize_size=36, batch_size=8,
                          decode_batch_size=4, actors=1, block_rows=4, max_bytes=100_000, max_error_fraction=1.0,
                          http_timeout_s=0.5, http_retries=1, http_backoff_s=0.01, allow_hosts=("127.0.0.1",))
    out = str(tmp_path / "features")
    summary = featurize(m_uri, out, cfg)
    assert summary["featurized"] == len(good) and summary["errors"] == len(bad)
    table, _ = store.read_features(out)
    assert sorted(table.column("image_id").to_pylist()) == sorted(good)
    errors = {e["image_id"]: e for e in store.read_errors(out).to_pylist()}
    assert set(errors) == set(bad)
    for image_id, (_, reason) in bad.items():
        assert errors[image_id]["stage"] == "fetch", errors[image_id]
        expected = reason.replace("0.5 s (read)", "0.5 s (read) (2 attempts)")  # timeouts are retried
        assert errors[image_id]["reason"].startswith(expected), errors[image_id]
    assert state.hits["/flaky/feat.jpg"] == 2  # the 500 was retried inside the Ray task
