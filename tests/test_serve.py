"""The Ray Serve app over real HTTP on loopback (SPEC §5), on the demo's model and index:
answers against the in-process services, every bad input a 4xx naming the problem while the
app keeps serving, S3 URIs from configured buckets only, batching, model rollout, and a
replica that dies being replaced."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from tagray.data import storage
from tagray.data.schema import read_manifest
from tagray.serve.service import SearchService, ServeConfig, TaggingService


def _wait_for(check, what: str, timeout: float = 120.0):
    """Polls `check` until it returns a truthy value (bounded), returning it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def app(demo_run, s3_bucket_module):
    from ray import serve

    from tagray.commands.serve import start
    from tests.conftest import free_port

    out, _ = demo_run
    endpoint, bucket = s3_bucket_module
    args = {"model": str(out / "model_rlr_calibrated"), "index": str(out / "index_rlr"), "buckets": [bucket],
            "endpoint_url": endpoint, "max_image_bytes": 200_000, "batch_size": 8, "batch_wait_s": 0.02}
    url = start(args, "127.0.0.1", free_port())
    manifest = read_manifest(str(out / "manifest_split.parquet"))
    yield {"url": url, "out": out, "args": args, "endpoint": endpoint, "bucket": bucket,
           "uris": manifest.column("uri").to_pylist()[:20]}
    serve.shutdown()


@pytest.fixture(scope="module")
def s3_bucket_module(s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="serve-images")
    return s3_endpoint, "serve-images"


def _tag(app, data: bytes, k: int = 5, **params) -> requests.Response:
    return requests.post(f"{app['url']}v1/tag", params={"k": k, **params},
                         files={"file": ("photo.jpg", data, "image/jpeg")}, timeout=60)


@pytest.mark.integration
def test_tag_and_search_answer_what_the_services_compute(app):
    cfg = ServeConfig(**{k: v for k, v in app["args"].items() if k not in ("buckets",)})
    tagging = TaggingService(app["args"]["model"], cfg)
    data = storage.read_bytes(app["uris"][0])
    r = _tag(app, data, k=5)
    assert r.status_code == 200, r.text
    tags = r.json()["tags"]
    expected = tagging.tag([tagging.decode(data)], [5], [0.0])[0]
    assert [t["tag"] for t in tags] == [t["tag"] for t in expected]
    np.testing.assert_allclose([t["p_true"] for t in tags], [t["p_true"] for t in expected], rtol=1e-5)
    assert all(0 <= t["p_user"] <= 1 and 0 <= t["p_true"] <= 1 for t in tags)
    assert [t["p_true"] for t in tags] == sorted((t["p_true"] for t in tags), reverse=True)
    # threshold keeps only tags at or above it
    high = _tag(app, data, k=5, threshold=tags[1]["p_true"]).json()["tags"]
    assert len(high) >= 1 and all(t["p_true"] >= tags[1]["p_true"] for t in high)

    search = SearchService(app["args"]["model"], app["args"]["index"], cfg)
    q = ",".join(t["tag"] for t in tags[:2])
    r = requests.get(f"{app['url']}v1/search", params={"q": q, "k": 10}, timeout=60)
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert [i["image_id"] for i in images] == [i["image_id"] for i in search.search(q.split(","), 10)]
    scores = [i["score"] for i in images]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1  # a product of probabilities
    # the product of the two tags' P(z) from the index, for the best image
    index = search.index
    row = index.image_ids.index(images[0]["image_id"])
    cols = [search.head.vocab.index[t["tag"]] for t in tags[:2]]
    assert scores[0] == pytest.approx(float(np.exp(index.log_p[cols, row].astype(np.float32).sum())), rel=1e-4)

    assert requests.get(f"{app['url']}v1/tags", timeout=30).json()["tags"][: len(tagging.tags)] == tagging.tags
    model = requests.get(f"{app['url']}v1/model", timeout=30).json()
    assert model["model"] == app["args"]["model"] and model["head"] == "rlr" and model["calibrated"]
    assert requests.get(f"{app['url']}docs", timeout=30).status_code == 200
    assert "/v1/tag" in requests.get(f"{app['url']}openapi.json", timeout=30).json()["paths"]
    page = requests.get(app["url"], timeout=30)
    assert page.status_code == 200 and 'id="search"' in page.text
    thumb = requests.get(f"{app['url']}v1/images/{images[0]['image_id']}", timeout=30)
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"


@pytest.mark.integration
def test_s3_uris_only_from_configured_buckets(app):
    import boto3

    data = storage.read_bytes(app["uris"][1])
    boto3.client("s3", endpoint_url=app["endpoint"], region_name="us-east-1").put_object(
        Bucket=app["bucket"], Key="photos/one.jpg", Body=data)
    by_uri = requests.post(f"{app['url']}v1/tag", json={"uri": f"s3://{app['bucket']}/photos/one.jpg"}, timeout=60)
    assert by_uri.status_code == 200, by_uri.text
    assert by_uri.json()["tags"] == _tag(app, data).json()["tags"]
    for uri, status, words in [
        ("s3://other-bucket/photos/one.jpg", 400, "not among the configured buckets"),
        ("https://example.com/photo.jpg", 400, "never http(s) URLs"),
        ("/etc/passwd", 400, "never http(s) URLs or local paths"),
        (f"s3://{app['bucket']}/photos/missing.jpg", 400, "no such object"),
    ]:
        r = requests.post(f"{app['url']}v1/tag", json={"uri": uri}, timeout=60)
        assert r.status_code == status and words in r.json()["error"], (uri, r.text)


@pytest.mark.integration
def test_bad_input_is_a_4xx_naming_the_problem_and_the_app_keeps_serving(app):
    good = storage.read_bytes(app["uris"][2])
    known = requests.get(f"{app['url']}v1/tags", timeout=30).json()["tags"][0]
    cases = [
        (_tag(app, b"hello, not an image"), 400, "not an image"),
        (_tag(app, good[: len(good) // 3]), 400, "corrupt image"),
        (_tag(app, b"\xff" * 300_000), 413, "over the limit"),
        (_tag(app, good, k=1000), 422, "k must be in [1, 100]"),
        (requests.post(f"{app['url']}v1/tag", data=b"raw", headers={"content-type": "image/jpeg"}, timeout=30),
         400, "unsupported content type"),
        (requests.post(f"{app['url']}v1/tag", files={"other": ("x", b"1")}, timeout=30), 400, "without a `file` field"),
        (requests.post(f"{app['url']}v1/tag", data=b"{nope", headers={"content-type": "application/json"}, timeout=30),
         400, "not valid JSON"),
        (requests.get(f"{app['url']}v1/search", params={"q": f"{known},flurbish"}, timeout=30), 422, "unknown tag 'flurbish'"),
        (requests.get(f"{app['url']}v1/search", params={"q": "a,b,c,d,e,f"}, timeout=30), 422, "at most 5"),
        (requests.get(f"{app['url']}v1/search", params={"q": ""}, timeout=30), 422, "empty query"),
    ]
    for r, status, words in cases:
        assert r.status_code == status and words in r.json()["error"], (status, words, r.status_code, r.text)
    assert requests.get(f"{app['url']}healthz", timeout=30).status_code == 200
    assert _tag(app, good).status_code == 200


@pytest.mark.integration
def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(app):
    images = [storage.read_bytes(u) for u in app["uris"][:16]]
    single = [_tag(app, d, k=3).json()["tags"] for d in images]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda d: _tag(app, d, k=3), images))
    assert all(r.status_code == 200 for r in together)
    for alone, r in zip(single, together, strict=True):
        assert [t["tag"] for t in r.json()["tags"]] == [t["tag"] for t in alone]
        np.testing.assert_allclose([t["p_true"] for t in r.json()["tags"]], [t["p_true"] for t in alone], rtol=1e-4)


@pytest.mark.integration
def test_rollout_of_a_new_model_and_a_dead_replica_is_replaced(app):
    import ray
    from ray import serve
    from ray.util.state import list_actors

    from tagray.features.store import read_features
    from tagray.heads.models import load_model
    from tagray.serve.app import build_app
    from tagray.serve.index import build_prediction_index, save_prediction_index

    data = storage.read_bytes(app["uris"][3])
    new_model = str(app["out"] / "model_rlr")  # the uncalibrated model: another directory, with its own index
    new_index = str(app["out"] / "index_rlr_uncalibrated")
    features, _ = read_features(str(app["out"] / "features"))
    save_prediction_index(build_prediction_index(load_model(new_model), features, None, new_model), new_index)
    serve.run(build_app({**app["args"], "model": new_model, "index": new_index}), name="tagray", route_prefix="/")
    assert requests.get(f"{app['url']}v1/model", timeout=30).json()["model"] == new_model
    assert _tag(app, data).status_code == 200
    # The embedding head: open-vocabulary search through its faiss index, same answers as the demo's.
    embed = {**app["args"], "model": str(app["out"] / "model_embed"), "index": str(app["out"] / "index_embed")}
    serve.run(build_app(embed), name="tagray", route_prefix="/")
    assert requests.get(f"{app['url']}v1/model", timeout=30).json()["head"] == "embed"
    searches = json.loads((app["out"] / "summary.json").read_text())["stages"]["embed"]["searches"]
    for query, hits in searches.items():
        r = requests.get(f"{app['url']}v1/search", params={"q": query, "k": 5}, timeout=30)
        assert r.status_code == 200, r.text
        assert [i["image_id"] for i in r.json()["images"]] == [h["image_id"] for h in hits]
    assert _tag(app, data).status_code == 200
    serve.run(build_app(app["args"]), name="tagray", route_prefix="/")  # and back
    assert requests.get(f"{app['url']}v1/model", timeout=30).json()["model"] == app["args"]["model"]

    tagger = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "Tagger" in (a.class_name or "")]
    assert tagger, "no Tagger replica found"
    ray.kill(ray.get_actor(tagger[0].name, namespace=tagger[0].ray_namespace), no_restart=True)
    _wait_for(lambda: _tag(app, data).status_code == 200, "a replacement Tagger replica")
    assert requests.get(f"{app['url']}healthz", timeout=30).status_code == 200


@pytest.mark.integration
def test_page_searches_and_tags_in_headless_chromium(app, tmp_path):
    """The page at /, driven in Debian's headless Chromium (Selenium + chromedriver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(app["url"])
        wait = WebDriverWait(driver, 60)
        known = requests.get(f"{app['url']}v1/tags", timeout=30).json()["tags"][0]
        box = driver.find_element(By.ID, "q")
        box.send_keys(known)
        driver.find_element(By.CSS_SELECTOR, "#search button").click()
        results = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "figure.result"))
        assert 1 <= len(results) <= 12
        # the thumbnails load (naturalWidth > 0 once the JPEG arrived through /v1/images/…)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('figure.result img')].every(i => i.complete && i.naturalWidth > 0)"))
        photo = app["uris"][5]
        assert Path(photo).is_absolute()
        driver.find_element(By.ID, "file").send_keys(photo)
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.tag"))
        assert 1 <= len(rows) <= 8
        expected = _tag(app, storage.read_bytes(photo), k=8).json()["tags"]
        assert rows[0].find_elements(By.TAG_NAME, "td")[0].text == expected[0]["tag"]
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"page screenshot → {shot}")
    finally:
        driver.quit()


@pytest.mark.integration
def test_serve_refuses_a_missing_model_a_foreign_index_and_bad_settings(demo_run, capsys):
    """Checked before anything is deployed: one clear error, exit status 2."""
    from tagray import cli
    from tagray.commands.serve import check_deployable
    from tagray.config import ConfigError, from_dict
    from tagray.data.schema import SchemaError

    out, _ = demo_run
    with pytest.raises(FileNotFoundError, match="not a tagray model"):
        check_deployable({"model": str(out / "no_such_model")})
    with pytest.raises(SchemaError, match="built with another model"):  # the calibrated model's β changed the head
        check_deployable({"model": str(out / "model_rlr"), "index": str(out / "index_rlr")})
    with pytest.raises(SchemaError, match="needs an embed model"):
        check_deployable({"model": str(out / "model_rlr_calibrated"), "index": str(out / "index_embed")})
    check_deployable({"model": str(out / "model_rlr_calibrated"), "index": str(out / "index_rlr")})  # the right pair
    with pytest.raises(ConfigError, match="bucket names"):
        from_dict(ServeConfig, {"buckets": ["s3://b"]}, "args")
    with pytest.raises(ConfigError, match="≥ 1"):
        from_dict(ServeConfig, {"batch_size": 0}, "args")
    assert cli.main(["serve", "--model", str(out / "no_such_model")]) == 2
    assert "not a tagray model" in capsys.readouterr().err
