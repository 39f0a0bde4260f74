"""The Ray Serve app over real HTTP on loopback (SPEC §5), on the demo's model and index:
answers against the in-process services, every bad input a 4xx naming the problem while the
app keeps serving, S3 URIs from configured buckets only, batching, model rollout, and a
replica that dies being replaced."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import numpy as np
import pytest
import requests

from tagray.data import storage
from tagray.serve.service import SearchService, ServeConfig, TaggingService
from tests.serving import deploy, error_of, tag_request, wait_for


@pytest.mark.integration
def test_tag_and_search_answer_what_the_services_compute(app):
    cfg = ServeConfig(**{k: v for k, v in app["args"].items() if k not in ("buckets",)})
    tagging = TaggingService(app["args"]["model"], cfg)
    data = storage.read_bytes(app["uris"][0])
    r = tag_request(app, data, k=5)
    assert r.status_code == 200, r.text
    tags = r.json()["tags"]
    expected = tagging.tag([tagging.decode(data)], [5], [0.0])[0]
    assert [t["tag"] for t in tags] == [t["tag"] for t in expected]
    np.testing.assert_allclose([t["p_true"] for t in tags], [t["p_true"] for t in expected], rtol=1e-5)
    assert all(0 <= t["p_user"] <= 1 and 0 <= t["p_true"] <= 1 for t in tags)
    assert [t["p_true"] for t in tags] == sorted((t["p_true"] for t in tags), reverse=True)
    # threshold keeps only tags at or above it
    high = tag_request(app, data, k=5, threshold=tags[1]["p_true"]).json()["tags"]
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
    shard, row = next((sh, sh.local(images[0]["image_id"])) for sh in search.group.shards
                      if sh.local(images[0]["image_id"]) is not None)
    cols = [search.head.vocab.index[t["tag"]] for t in tags[:2]]
    assert scores[0] == pytest.approx(float(np.exp(shard.log_p[cols, row].astype(np.float32).sum())), rel=1e-4)

    assert requests.get(f"{app['url']}v1/tags", timeout=30).json()["tags"][: len(tagging.tags)] == tagging.tags
    model = requests.get(f"{app['url']}v1/model", timeout=30).json()
    assert model["model"] == "model_rlr_calibrated" and model["head"] == "rlr" and model["calibrated"]
    assert model["tagging"] and model["search"]
    health = requests.get(f"{app['url']}healthz", timeout=30).text
    assert str(app["out"]) not in health and str(app["out"]) not in json.dumps(model)  # no server paths
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
    assert by_uri.json()["tags"] == tag_request(app, data).json()["tags"]
    for uri, status, words in [
        ("s3://other-bucket/photos/one.jpg", 400, "not among the configured buckets"),
        ("https://example.com/photo.jpg", 400, "never http(s) URLs"),
        ("/etc/passwd", 400, "never http(s) URLs or local paths"),
        (f"s3://{app['bucket']}/photos/missing.jpg", 400, "no such object"),
    ]:
        r = requests.post(f"{app['url']}v1/tag", json={"uri": uri}, timeout=60)
        assert r.status_code == status and words in error_of(r)["message"], (uri, r.text)


@pytest.mark.integration
def test_bad_input_is_a_4xx_naming_the_problem_and_the_app_keeps_serving(app):
    good = storage.read_bytes(app["uris"][2])
    known = requests.get(f"{app['url']}v1/tags", timeout=30).json()["tags"][0]
    cases = [
        (tag_request(app, b"hello, not an image"), 400, "not an image"),
        (tag_request(app, good[: len(good) // 3]), 400, "corrupt image"),
        (tag_request(app, b"\xff" * 300_000), 413, "the limit is an image of at most 200000 bytes"),
        (tag_request(app, good, k=1000), 422, "k must be in [1, 100]"),
        (requests.post(f"{app['url']}v1/tag", data=b"raw", headers={"content-type": "image/jpeg"}, timeout=30),
         415, "unsupported content type"),
        (requests.post(f"{app['url']}v1/tag", json={"uri": None}, timeout=30), 422, "uri: Input should be a valid string"),
        (requests.post(f"{app['url']}v1/tag", json={"uri": "s3://x/y", "extra": 1}, timeout=30), 422, "extra"),
        (tag_request(app, good, threshold="nan"), 422, "threshold"),
        (tag_request(app, good, k="many"), 422, "k: Input should be a valid integer"),
        (requests.get(f"{app['url']}v1/search", params={"q": "x" * 5000}, timeout=30), 422, "q: String should have at most"),
        (requests.get(f"{app['url']}v1/search", params={"q": "zz" * 200}, timeout=30), 422, "…'"),
        (requests.get(f"{app['url']}v1/nowhere", timeout=30), 404, "Not Found"),
        (requests.delete(f"{app['url']}v1/tag", timeout=30), 405, "Method Not Allowed"),
        (requests.post(f"{app['url']}v1/tag", files={"other": ("x", b"1")}, timeout=30), 400, "without a `file` field"),
        (requests.post(f"{app['url']}v1/tag", data=b"{nope", headers={"content-type": "application/json"}, timeout=30),
         400, "not valid JSON"),
        (requests.get(f"{app['url']}v1/search", params={"q": f"{known},flurbish"}, timeout=30), 422, "unknown tag 'flurbish'"),
        (requests.get(f"{app['url']}v1/search", params={"q": "a,b,c,d,e,f"}, timeout=30), 422, "at most 5"),
        (requests.get(f"{app['url']}v1/search", params={"q": ""}, timeout=30), 422, "empty query"),
    ]
    for r, status, words in cases:
        assert r.status_code == status and words in error_of(r)["message"], (status, words, r.status_code, r.text)
    assert requests.get(f"{app['url']}healthz", timeout=30).status_code == 200
    assert tag_request(app, good).status_code == 200


@pytest.mark.integration
def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(app):
    """16 requests at once reach the model in fewer than 16 calls (the Tagger replica counts
    the size of every @serve.batch call), and each still gets its own image's answer."""
    from ray import serve

    tagger = serve.get_deployment_handle("Tagger", app_name="tagray")
    images = [storage.read_bytes(u) for u in app["uris"][:16]]
    single = [tag_request(app, d, k=3).json()["tags"] for d in images]
    before = tagger.batching.remote().result(timeout_s=60)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda d: tag_request(app, d, k=3), images))
    after = tagger.batching.remote().result(timeout_s=60)
    assert all(r.status_code == 200 for r in together)
    calls = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * n for size, n in calls.items()) == 16, calls  # every request went through one model call
    assert max(size for size, n in calls.items() if n) >= 2, calls  # at least one call held two or more
    for alone, r in zip(single, together, strict=True):
        assert [t["tag"] for t in r.json()["tags"]] == [t["tag"] for t in alone]
        np.testing.assert_allclose([t["p_true"] for t in r.json()["tags"]], [t["p_true"] for t in alone], rtol=1e-4)


@pytest.mark.integration
def test_rollout_of_a_new_model_and_a_dead_replica_is_replaced(app):
    import ray
    from ray.util.state import list_actors

    from tagray.features.store import read_features
    from tagray.heads.models import load_model
    from tagray.serve.index import build_prediction_index, save_prediction_index

    data = storage.read_bytes(app["uris"][3])
    new_model = str(app["out"] / "model_rlr")  # the uncalibrated model: another directory, with its own index
    new_index = str(app["out"] / "index_rlr_uncalibrated")
    features, _ = read_features(str(app["out"] / "features"))
    save_prediction_index(build_prediction_index(load_model(new_model), features, None, new_model), new_index)
    from tests.serving import actor_pid

    deploy(app, app["args"])
    before = actor_pid("Tagger")
    deploy(app, {**app["args"], "model": new_model, "index": new_index})
    assert requests.get(f"{app['url']}v1/model", timeout=30).json()["model"] == "model_rlr"
    # only user_config changed: the deployments keep their code version (serve/app.py _versioned),
    # so Serve reconfigured the running Tagger in place instead of replacing it
    assert actor_pid("Tagger") == before
    assert tag_request(app, data).status_code == 200
    # The embedding head: open-vocabulary search through its faiss index, same answers as the demo's.
    embed = {**app["args"], "model": str(app["out"] / "model_embed"), "index": str(app["out"] / "index_embed")}
    deploy(app, embed)
    assert requests.get(f"{app['url']}v1/model", timeout=30).json()["head"] == "embed"
    searches = json.loads((app["out"] / "summary.json").read_text())["stages"]["embed"]["searches"]
    for query, hits in searches.items():
        r = requests.get(f"{app['url']}v1/search", params={"q": query, "k": 5}, timeout=30)
        assert r.status_code == 200, r.text
        assert [i["image_id"] for i in r.json()["images"]] == [h["image_id"] for h in hits]
    assert tag_request(app, data).status_code == 200
    deploy(app, app["args"])  # and back
    assert requests.get(f"{app['url']}v1/model", timeout=30).json()["model"] == "model_rlr_calibrated"

    tagger = [a for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")]) if "Tagger" in (a.class_name or "")]
    assert tagger, "no Tagger replica found"
    ray.kill(ray.get_actor(tagger[0].name, namespace=tagger[0].ray_namespace), no_restart=True)
    wait_for(lambda: tag_request(app, data).status_code == 200, "a replacement Tagger replica")
    assert requests.get(f"{app['url']}healthz", timeout=30).status_code == 200


@pytest.mark.integration
def test_page_searches_and_tags_in_headless_chromium(app, tmp_path):
    """The page at /, driven in Debian's headless Chromium (Selenium + chromedriver)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chromium()
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
        expected = tag_request(app, storage.read_bytes(photo), k=8).json()["tags"]
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


def _model_copy(src: Path, dst: Path, rename: dict[str, str] | None = None, backbone: dict | None = None) -> str:
    """A copy of a model directory with some tags renamed (vocabulary and model.json) or another
    backbone identity: the same weights, so the demo's index still belongs to it."""
    import shutil

    from tagray.data.normalize import Vocabulary

    shutil.copytree(src, dst)
    meta = json.loads((dst / "model.json").read_text())
    if rename:
        vocab = Vocabulary.load(str(dst))
        renamed = Vocabulary(tuple(rename.get(t, t) for t in vocab.tags), vocab.counts, vocab.normalizer)
        renamed.save(str(dst))
        meta["vocabulary_version"] = renamed.version
        if isinstance(meta.get("tags"), list):
            meta["tags"] = [rename.get(t, t) for t in meta["tags"]]
    if backbone is not None:
        meta["backbone"] = backbone
    (dst / "model.json").write_text(json.dumps(meta))
    return str(dst)


@pytest.mark.integration
def test_tagging_only_and_a_model_of_external_features(app, tmp_path):
    """Without an index the app tags and /v1/search is a 503 naming the missing index; a model of
    features from elsewhere searches but refuses /v1/tag with a 409 (no backbone to run)."""


    data = storage.read_bytes(app["uris"][0])
    deploy(app, {**app["args"], "index": None})
    assert tag_request(app, data).status_code == 200
    r = requests.get(f"{app['url']}v1/search", params={"q": "x"}, timeout=30)
    assert r.status_code == 503 and error_of(r)["code"] == "no_index" and "--index" in error_of(r)["message"]
    assert requests.get(f"{app['url']}v1/model", timeout=30).json()["search"] is False

    dim = json.loads((Path(app["args"]["model"]) / "model.json").read_text())["backbone"]["dim"]
    external = _model_copy(Path(app["args"]["model"]), tmp_path / "external", backbone={
        "kind": "external", "name": "clip-from-elsewhere", "dim": dim, "source": "features.npy",
        "source_digest": "sha256:" + "0" * 64})
    deploy(app, {**app["args"], "model": external})
    r = tag_request(app, data)
    assert r.status_code == 409 and error_of(r)["code"] == "no_backbone" and "clip-from-elsewhere" in r.text
    known = requests.get(f"{app['url']}v1/tags", timeout=30).json()["tags"][0]
    r = requests.get(f"{app['url']}v1/search", params={"q": known, "k": 3}, timeout=30)
    assert r.status_code == 200 and len(r.json()["images"]) == 3, r.text
    assert requests.get(f"{app['url']}v1/model", timeout=30).json()["tagging"] is False


@pytest.mark.integration
def test_page_shows_html_in_tags_as_text_and_runs_no_script(app, tmp_path):
    """Tags are unfiltered user input: a tag holding HTML is shown as text by the page, in
    headless Chromium, and no script of it runs (textContent everywhere, and a CSP)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait


    photo = app["uris"][5]
    top = [t["tag"] for t in tag_request(app, storage.read_bytes(photo), k=8).json()["tags"]]
    payloads = ['<img src=x onerror="window.__pwned=1">', "<script>window.__pwned=2</script>"]
    hostile = _model_copy(Path(app["args"]["model"]), tmp_path / "hostile", rename=dict(zip(top[:2], payloads, strict=True)))
    page = requests.get(app["url"], timeout=30)
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    driver = _chromium()
    try:
        deploy(app, {**app["args"], "model": hostile})
        assert tag_request(app, storage.read_bytes(photo), k=2).json()["tags"][0]["tag"] == payloads[0]
        driver.get(app["url"])
        wait = WebDriverWait(driver, 60)
        driver.find_element(By.ID, "file").send_keys(photo)
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.tag"))
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows[:2]] == payloads
        driver.find_element(By.ID, "q").send_keys(payloads[1] + ",<b>bold</b>")
        driver.find_element(By.CSS_SELECTOR, "#search button").click()
        wait.until(lambda d: d.find_element(By.ID, "search-status").text not in ("", "searching…"))
        assert driver.execute_script("return window.__pwned === undefined")
        assert driver.execute_script("return document.querySelectorAll('#tags img, #tags script, #search-status b')"
                                     ".length") == 0
    finally:
        driver.quit()


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


@pytest.mark.integration
def test_api_keys_401_403_429_over_http_and_the_page_asks_for_a_key(app):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tagray.serve.auth import entry_for, new_key

    reader, writer = new_key(), new_key()
    keys = [entry_for(reader, ["read"]), entry_for(writer, ["write"])]
    data = storage.read_bytes(app["uris"][0])
    known = requests.get(f"{app['url']}v1/tags", timeout=30).json()["tags"][0]

    def get(path: str, key: str | None = None, **params) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.get(f"{app['url']}{path}", params=params, headers=headers, timeout=30)

    from tests.serving import actor_pid

    tagger = actor_pid("Tagger")
    driver = _chromium()
    try:
        deploy(app, {**app["args"], "api_keys": keys})
        assert actor_pid("Tagger") == tagger  # keys are the Ingress's: the Tagger keeps running (app.READS)
        assert get("healthz").status_code == 200 and get("").status_code == 200  # probes and the page stay open
        for path in ("v1/tags", "v1/model", "v1/search"):
            r = get(path, q=known)
            assert r.status_code == 401 and error_of(r)["code"] == "unauthorized", (path, r.text)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert tag_request(app, data).status_code == 401
        assert get("v1/search", "tgr_not-a-key", q=known).status_code == 401
        r = get("v1/search", writer, q=known)
        assert r.status_code == 403 and error_of(r)["code"] == "forbidden"
        assert get("v1/search", reader, q=known, k=3).status_code == 200
        r = requests.post(f"{app['url']}v1/tag", headers={"Authorization": f"Bearer {reader}"},
                          files={"file": ("p.jpg", data, "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text

        driver.get(app["url"])  # the page asks for the key, then works with it
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
        driver.find_element(By.ID, "key").send_keys(reader)
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait.until(lambda d: "tags" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "q").send_keys(known)
        driver.find_element(By.CSS_SELECTOR, "#search button").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "figure.result"))
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('figure.result img')].every(i => i.complete && i.naturalWidth > 0)"))

        deploy(app, {**app["args"], "api_keys": keys, "rate_limit_per_s": 0.5, "rate_limit_burst": 3})
        statuses = [get("v1/tags", reader).status_code for _ in range(5)]
        assert statuses[:3] == [200, 200, 200] and statuses[-1] == 429, statuses
        r = get("v1/tags", reader)
        assert r.status_code == 429 and error_of(r)["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
        assert get("v1/tags", writer).status_code == 403  # the other key's bucket is untouched
    finally:
        driver.quit()


@pytest.mark.integration
def test_feedback_is_validated_stored_before_the_answer_and_survives_a_killed_replica(app, tmp_path):
    """POST /v1/feedback over HTTP into a real SQLite store: bad verdicts are 422s naming them,
    writing needs the write scope, and when the Feedback replica is SIGKILLed mid-stream every
    request answered 200 is in the store, and re-sending every request stores nothing twice."""
    import os
    import signal
    import threading

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tagray.data.feedback import FeedbackStore
    from tagray.index import open_index
    from tagray.serve.auth import entry_for, new_key
    from tests.serving import actor_pid

    reader, writer = new_key(), new_key()
    url = f"sqlite:///{tmp_path}/feedback.db"
    args = {**app["args"], "feedback": url, "api_keys": [entry_for(reader, ["read"]), entry_for(writer, ["read", "write"])]}
    tags = requests.get(f"{app['url']}v1/tags", timeout=30).json()["tags"]
    images = [Path(u).stem for u in app["uris"]]
    index_ids = set(open_index(app["args"]["index"]).image_ids().to_pylist())
    images = [i for i in images if i in index_ids][:12]
    assert len(images) >= 10

    def post(body, key=writer, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.post(f"{app['url']}v1/feedback", json=body, headers=headers, timeout=60, **kw)

    driver = _chromium()
    try:
        deploy(app, args)
        one = {"image_id": images[0], "tag": tags[0], "verdict": "present"}
        cases = [
            (post({"verdicts": [one]}, key=None), 401, "unauthorized"),
            (post({"verdicts": [one]}, key=reader), 403, "forbidden"),
            (post({"verdicts": [{**one, "tag": "flurbish"}]}), 422, "unknown_term"),
            (post({"verdicts": [{**one, "image_id": "no-such-image"}]}), 422, "unknown_image"),
            (post({"verdicts": [{**one, "verdict": "maybe"}]}), 422, "invalid_request"),
            (post({"verdicts": []}), 422, "invalid_request"),
            (post({"verdicts": [{**one, "upload_sha256": "ab" * 32}]}), 422, "invalid_request"),  # both ids
            (requests.post(f"{app['url']}v1/feedback", data=b"x", timeout=30,
                           headers={"Authorization": f"Bearer {writer}", "content-type": "text/plain"}), 415,
             "unsupported_media_type"),
        ]
        for r, status, code in cases:
            assert r.status_code == status and error_of(r)["code"] == code, (status, code, r.status_code, r.text)
        store = FeedbackStore.open(url)
        assert store.count() == 0  # a request with one bad verdict stores nothing

        ok = post({"request_id": "first", "verdicts": [one, {**one, "verdict": "absent"}]})
        assert ok.status_code == 200 and ok.json() == {"request_id": "first", "stored": 2, "duplicates": 0}, ok.text
        assert post({"request_id": "first", "verdicts": [one, {**one, "verdict": "absent"}]}).json()["stored"] == 0
        stats = requests.get(f"{app['url']}v1/feedback/stats", headers={"Authorization": f"Bearer {reader}"},
                             timeout=30).json()
        assert stats["verdicts"] == 2 and stats["tags"][tags[0]]["present"] == 1

        # a stream of requests, the Feedback replica SIGKILLed in the middle of it
        bodies = [{"request_id": f"stream-{i}", "verdicts": [
            {"image_id": images[(i + j) % len(images)], "tag": tags[j], "verdict": "present" if j % 2 else "absent"}
            for j in range(5)]} for i in range(40)]
        acked, answers, lock = [], [], threading.Lock()
        pid = actor_pid("Feedback")

        def send(chunk):
            for b in chunk:
                if b["request_id"] == "stream-12":
                    os.kill(pid, signal.SIGKILL)
                r = post(b)
                with lock:
                    answers.append(r.status_code)
                    if r.status_code == 200:
                        acked.append(b["request_id"])
                    else:
                        assert r.status_code == 503 and error_of(r)["code"] == "replica_unavailable", r.text

        threads = [threading.Thread(target=send, args=(bodies[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads) and len(answers) == 40
        stored = FeedbackStore.open(url).table()
        assert set(acked) <= set(stored.column("request_id").to_pylist())  # nothing acknowledged is lost
        print(f"feedback stream: {len(acked)} of 40 requests acknowledged across the replica's death")
        wait_for(lambda: post({"request_id": "after", "verdicts": [one]}).status_code == 200, "a new Feedback replica")
        for b in bodies:  # re-sent, every one: nothing is stored twice
            r = post(b)
            assert r.status_code == 200, r.text
            if b["request_id"] in acked:
                assert r.json()["stored"] == 0
        assert FeedbackStore.open(url).count() == 2 + 40 * 5 + 1

        # the page: confirm a suggested tag of an upload, and it lands in the store
        driver.get(app["url"])
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
        driver.find_element(By.ID, "key").send_keys(writer)
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait.until(lambda d: "tags" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "file").send_keys(app["uris"][5])
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.tag"))
        first_tag = rows[0].find_elements(By.TAG_NAME, "td")[0].text
        rows[0].find_element(By.CSS_SELECTOR, "button.verdict-present").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.tag .saved"))
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.tag"))
        rows[1].find_element(By.CSS_SELECTOR, "button.verdict-absent").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.tag .saved")) == 2)
        import hashlib

        digest = "sha256:" + hashlib.sha256(Path(app["uris"][5]).read_bytes()).hexdigest()
        from_page = [r for r in FeedbackStore.open(url).table().to_pylist() if r["image_id"] == digest]
        assert [(r["tag"], r["present"]) for r in from_page][0] == (first_tag, True) and len(from_page) == 2
        assert not from_page[1]["present"]
    finally:
        driver.quit()

    # the loop closed: recalibrate from these verdicts, and the running app rolls the new model out
    from tagray import cli
    from tagray.features.store import read_features
    from tagray.heads.models import load_model
    from tagray.serve.index import build_prediction_index, save_prediction_index

    judged = [{"image_id": image, "tag": tags[0], "verdict": "present" if k % 2 else "absent"}
              for k, image in enumerate(images[:10])]
    assert post({"request_id": "for-calibration", "verdicts": judged}).status_code == 200
    recalibrated, index = str(tmp_path / "model_feedback"), str(tmp_path / "index_feedback")
    assert cli.main(["calibrate", "--model", app["args"]["model"], "--features", str(app["out"] / "features"),
                     "--feedback", url, "--out", recalibrated]) == 0
    report = json.loads((Path(recalibrated) / "calibration.json").read_text())
    print(f"calibration from feedback: {json.dumps(report)[:300]}")
    assert report["source"] == "feedback" and report["tags_refitted"] >= 1
    refit = report["tags"][tags[0]] if isinstance(report["tags"], dict) else \
        next(t for t in report["tags"] if t.get("tag") == tags[0])
    assert refit["refitted"], refit
    features, _ = read_features(str(app["out"] / "features"))
    save_prediction_index(build_prediction_index(load_model(recalibrated), features, None, recalibrated), index)
    deploy(app, {**args, "model": recalibrated, "index": index})
    model = requests.get(f"{app['url']}v1/model", headers={"Authorization": f"Bearer {reader}"}, timeout=30).json()
    assert model["model"] == "model_feedback" and model["feedback"]
    assert post({"verdicts": [one]}).status_code == 200  # the new model takes verdicts too



@pytest.mark.integration
def test_this_weeks_photos_featurized_beside_the_app_appended_and_served_without_a_redeploy(app, tmp_path):
    """"Add this week's photos" end to end (issue 15): the manifest grows by 12 rendered photos;
    `tagray featurize` of it, beside the running app (which holds all but about half a CPU of
    the session's 2), featurises only those 12; `tagray index --append` adds them as a new
    shard; the running app serves them within index_refresh_s, without a redeploy."""
    import shutil

    import pyarrow as pa

    from tagray.data import schema
    from tagray.data.synth import SynthConfig, synthesize
    from tagray.heads.models import load_model
    from tests.commands import cli
    from tests.serving import actor_pid

    out = app["out"]
    features, index_dir = tmp_path / "features", tmp_path / "index"
    shutil.copytree(out / "features", features)  # copies: the session's demo outputs stay as they are
    shutil.copytree(out / "index_rlr", index_dir)
    old = schema.read_manifest(str(out / "manifest_split.parquet"))
    week = schema.read_manifest(synthesize(SynthConfig(images=12, seed=77, render_batch=12, render_cpus=0.25),
                                           str(tmp_path / "week"))["manifest"])
    new_ids = [f"week-{i:03d}" for i in range(12)]
    week = week.set_column(0, "image_id", pa.array(new_ids))
    cols = ["image_id", "user_id", "uri", "tags"]
    grown = str(tmp_path / "manifest.parquet")
    schema.write_manifest(pa.concat_tables([old.select(cols), week.select(cols)]), grown)
    deploy(app, {**app["args"], "index": str(index_dir)})
    before = requests.get(f"{app['url']}v1/model", timeout=30).json()["index"]
    ingress = actor_pid("Ingress")

    demo = json.loads((out / "features" / "summary.json").read_text())["config"]  # the demo's backbone
    cli("featurize", "--manifest", grown, "--out", str(features), "--backbone", demo["backbone"],
        "--weights", demo["weights"], "actor_cpus=0.25", "decode_cpus=0.1", "write_cpus=0.1", "resources_wait_s=120")
    summary = json.loads((features / "summary.json").read_text())
    assert (summary["already_done"], summary["featurized"], summary["errors"]) == (old.num_rows, 12, 0)
    cli("index", "--model", app["args"]["model"], "--features", str(features), "--manifest", grown, "--append",
        "--out", str(index_dir), "--worker-cpus", "0.2")

    def appended():
        info = requests.get(f"{app['url']}v1/model", timeout=30).json()["index"]
        return info["version"] > before["version"] and info
    after = wait_for(appended, "the appended index version on /v1/model", timeout=120)
    assert after["shards"] == before["shards"] + 1 and actor_pid("Ingress") == ingress  # no redeploy
    tag = load_model(app["args"]["model"]).vocab.tags[0]

    def searchers_loaded():  # the Ingress knows the new shard first; the Searcher loads it within its refresh
        return not requests.get(f"{app['url']}v1/search", params={"q": tag, "k": 1}, timeout=30).json()["partial"]
    wait_for(searchers_loaded, "the Searcher serving the appended shard", timeout=120)
    found: list[str] = []
    for offset in range(0, old.num_rows + 12, 100):  # every image ranks for a one-tag query: page through all
        r = requests.get(f"{app['url']}v1/search", params={"q": tag, "k": 100, "offset": offset}, timeout=30)
        assert r.status_code == 200 and not r.json()["partial"], r.text
        found += [i["image_id"] for i in r.json()["images"]]
    assert len(found) == old.num_rows + 12 and set(new_ids) <= set(found)
    r = requests.post(f"{app['url']}v1/similar", json={"image_id": new_ids[0], "k": 5}, timeout=30)
    assert r.status_code == 200 and len(r.json()["images"]) == 5, r.text
