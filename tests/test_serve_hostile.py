"""The Serve app under hostile input (issue 17): images whose naive decode is huge, bodies that
lie about their size or send none, nesting that breaks recursive parsers, a store that is down,
a replica killed under load. Every answer is JSON in the one error shape, never a plain 5xx,
and the replicas' memory stays bounded (RSS measured before and after, a generous margin)."""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import signal
from urllib.parse import urlsplit

import pytest
import requests

from tagray.data import storage
from tests.hostile import HOSTILE_IMAGES, WORST_IMAGE, multipart_prefix, send_chunked
from tests.serving import actor_pid, error_of, memory_mb, tag_request, wait_for

pytestmark = pytest.mark.integration


def test_hostile_images_are_answered_and_the_tagger_stays_small(app):
    pid = actor_pid("Tagger")
    before = memory_mb(pid)
    answers = {}
    for name, make in HOSTILE_IMAGES.items():
        r = tag_request(app, make())
        answers[name] = r.status_code
        if r.status_code != 200:
            assert r.status_code == 400 and error_of(r)["code"] == "bad_request", (name, r.text)
    worst = HOSTILE_IMAGES[WORST_IMAGE]()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three at once took 7.25 GB before
        assert [r.status_code for r in pool.map(lambda _: tag_request(app, worst), range(3))] == [200] * 3
    after = memory_mb(pid)
    print(f"Tagger memory: RSS {before['VmRSS']:.0f} → {after['VmRSS']:.0f} MB, "
          f"peak {before['VmHWM']:.0f} → {after['VmHWM']:.0f} MB; answers {answers}")
    assert answers == {"1x8000.png": 200, "8000x1.png": 200, "1x30000.png": 200, "30000x2.jpg": 200,
                       "deep16_6000.png": 200, "bomb.png": 400, "truncated.jpg": 400, "mutated.jpg": 400}
    assert after["VmHWM"] - before["VmHWM"] < 300, after  # before the fix: +2 GB for the 1×8000 PNG alone
    assert tag_request(app, storage.read_bytes(app["uris"][0])).status_code == 200


def test_bodies_are_capped_while_they_stream_without_content_length(app):
    url = app["url"]
    pids = {kind: actor_pid(kind) for kind in ("Ingress", "ProxyActor")}
    before = {kind: memory_mb(pid) for kind, pid in pids.items()}
    boundary = "hostileboundary"
    total = 200 * 2**20
    status, body, sent = send_chunked(url, "/v1/tag", f"multipart/form-data; boundary={boundary}", b"\xff" * 2**16,
                                      total, first=multipart_prefix(boundary))
    assert status == 413 and b"too_large" in body, body
    assert sent < total  # answered while the body was still coming
    status, body, sent_json = send_chunked(url, "/v1/tag", "application/json", b" " * 2**16, total,
                                           first=b'{"uri": "s3://serve-images/')
    assert status == 413 and b"too_large" in body and sent_json < total, body
    after = {kind: memory_mb(pid) for kind, pid in pids.items()}
    print(f"multipart: answered after {sent / 2**20:.1f} MiB of {total / 2**20:.0f}; JSON after "
          f"{sent_json / 2**20:.1f} MiB; memory {before} → {after}")
    for kind in pids:  # before: Ingress +480 MB and proxy +390 MB for a 500 MiB upload
        assert after[kind]["VmRSS"] - before[kind]["VmRSS"] < 100, (kind, before[kind], after[kind])

    # a declared Content-Length over the cap: 413 before a byte of the body is read
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("POST", "/v1/tag")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and b"1000000000 bytes" in r.read()
    conn.close()
    assert tag_request(app, storage.read_bytes(app["uris"][0])).status_code == 200


@pytest.mark.parametrize("body", [b"[" * 50_000, b'{"uri": ' * 8_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000])
def test_deeply_nested_json_is_a_4xx(app, body):
    r = requests.post(f"{app['url']}v1/tag", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code in (400, 422), r.text
    assert error_of(r)["code"] in ("invalid_json", "invalid_request")


def test_content_type_is_case_insensitive(app):
    import boto3

    boto3.client("s3", endpoint_url=app["endpoint"], region_name="us-east-1").put_object(
        Bucket=app["bucket"], Key="photos/case.jpg", Body=storage.read_bytes(app["uris"][1]))
    r = requests.post(f"{app['url']}v1/tag", data=b'{"uri": "s3://serve-images/photos/case.jpg"}',
                      headers={"content-type": "Application/JSON; charset=UTF-8"}, timeout=60)
    assert r.status_code == 200, r.text


def test_an_unreachable_store_is_a_503_naming_it():
    """Not the client's fault and not a crash: 503 with Retry-After (before: a 500 after 2 s)."""
    from tagray.serve.errors import RequestError
    from tagray.serve.service import ServeConfig, fetch_uri
    from tests.conftest import free_port

    cfg = ServeConfig(model="m", buckets=("b",), endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RequestError) as e:
        fetch_uri("s3://b/photo.jpg", cfg)
    assert e.value.status == 503 and e.value.code == "store_unavailable" and "unreachable" in e.value.message
    assert e.value.headers["Retry-After"]


def test_a_tagger_killed_under_load_answers_200_or_503_never_a_plain_500(app):
    images = [storage.read_bytes(u) for u in app["uris"][:8]]
    pid = actor_pid("Tagger")
    killed = []

    def one(i: int) -> requests.Response:
        if i == 24:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return tag_request(app, images[i % len(images)], k=3)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(160)))
    assert killed
    statuses = [r.status_code for r in answers]
    for r in answers:
        assert r.status_code in (200, 503), (r.status_code, r.text)
        if r.status_code == 503:
            assert error_of(r)["code"] == "replica_unavailable" and r.headers.get("Retry-After")
    print(f"killed the Tagger under 16-way load: {statuses.count(200)} answered 200, {statuses.count(503)} 503")
    assert statuses.count(200) >= 100  # the retry on the replacement answers most of them
    wait_for(lambda: tag_request(app, images[0]).status_code == 200, "a replacement Tagger replica")
