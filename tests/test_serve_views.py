"""What each Serve deployment is given (tagray/serve/app.py READS, `view`): a changed setting
replaces only the replicas that read it, and the Ingress imports no torch. The fast tests build the
application without Ray; the integration test runs each deployment's code in process, on the demo's
model and index, with a config that records every field it reads."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from tagray.data import storage
from tagray.serve.service import ServeConfig


def _deployments(args: dict) -> dict:
    """name → (code version, constructor config) of every deployment of build_app(args)."""
    from tagray.serve.app import build_app

    ingress = build_app(args)._bound_deployment
    found = {"Ingress": (ingress.version, ingress.init_args[-1])}
    tagger, _, feedback, _ = ingress.init_args
    for app in [tagger] + ([feedback] if feedback is not None else []):
        d = app._bound_deployment
        found[d.name] = (d.version, d.init_args[0])
    return found


def test_a_setting_restarts_only_the_deployments_that_read_it(tmp_path):
    from tagray.serve.app import READS
    from tagray.serve.auth import entry_for, new_key

    base = {"model": "m", "feedback": f"sqlite:///{tmp_path}/f.db"}
    before = _deployments(base)
    assert set(before["Tagger"][1]) == set(READS["Tagger"]) and "api_keys" not in before["Tagger"][1]
    keyed = _deployments({**base, "api_keys": [entry_for(new_key(), ["read"])], "rate_limit_per_s": 2.0,
                          "search_groups": 2, "search_timeout_s": 1.0})
    # the Ingress reads every setting; the Tagger and Feedback keep their versions: Serve leaves them running
    assert keyed["Ingress"][0] != before["Ingress"][0] and "api_keys" in keyed["Ingress"][1]
    assert keyed["Tagger"] == before["Tagger"] and keyed["Feedback"] == before["Feedback"]
    batched = _deployments({**base, "batch_size": 4})
    assert batched["Tagger"][0] != before["Tagger"][0] and batched["Tagger"][1]["batch_size"] == 4
    assert batched["Feedback"] == before["Feedback"]


def test_every_deployment_gets_the_replica_lifecycle_settings(tmp_path):
    """health_check_period_s, health_check_timeout_s and graceful_shutdown_wait_loop_s reach every
    deployment's Serve options (the defaults and a changed value); they restart no replica that
    does not read them (Serve applies them to the running ones), and bad values are refused."""
    from tagray.config import ConfigError
    from tagray.index import format as fmt
    from tagray.serve.app import build_app

    index = str(tmp_path / "index")  # only index.json is read to plan the search groups
    fmt.commit(index, {"kind": "predictions", "version": 1,
                       "shard_list": [{"name": "s0", "images": 3}, {"name": "s1", "images": 2}]})
    base = {"model": "m", "feedback": f"sqlite:///{tmp_path}/f.db"}
    names = ("health_check_period_s", "health_check_timeout_s", "graceful_shutdown_wait_loop_s")
    for args in (base, {**base, "health_check_period_s": 0.7, "health_check_timeout_s": 9.0,
                        "graceful_shutdown_wait_loop_s": 0.3}):
        cfg = ServeConfig(**args)
        ingress = build_app({**args, "index": index, "search_groups": 2})._bound_deployment
        tagger, searchers, feedback, _ = ingress.init_args
        assert [s._bound_deployment.name for s in searchers] == ["Searcher-0", "Searcher-1"]
        for d in (ingress, tagger._bound_deployment, feedback._bound_deployment,
                  *(s._bound_deployment for s in searchers)):
            got = {n: getattr(d._deployment_config, n) for n in names}
            assert got == {n: getattr(cfg, n) for n in names}, d.name
    changed = _deployments({**base, "health_check_period_s": 0.7})
    before = _deployments(base)
    assert changed["Tagger"] == before["Tagger"] and changed["Feedback"] == before["Feedback"]
    for bad in ({"health_check_period_s": 0}, {"graceful_shutdown_wait_loop_s": float("nan")},
                {"health_check_timeout_s": -1.0}):
        with pytest.raises(ConfigError, match="health_check_period_s, health_check_timeout_s"):
            ServeConfig(model="m", **bad)


def test_the_ingress_imports_no_torch():
    """The Ingress replica imports tagray.serve.app for its settings and holds no model: without
    torch its imports take 1.3–1.9 s less and peak 467 MB lower (BENCHMARKS.md, *Serving*: redeploys)."""
    code = "import sys, tagray.serve.app; print(sorted(m for m in ('torch', 'torchvision', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


class _Recording:
    """A ServeConfig that records the fields read from it (a property's reads are its fields')."""

    def __init__(self, cfg: ServeConfig, read: set[str]) -> None:
        self._cfg, self._read = cfg, read

    def __getattr__(self, name: str):
        found = getattr(type(self._cfg), name, None)
        if isinstance(found, property):
            return found.fget(self)
        self._read.add(name)
        return getattr(self._cfg, name)


@pytest.mark.integration
def test_each_deployment_reads_only_the_settings_it_is_given(demo_run, tmp_path, monkeypatch):
    """Each deployment is given (and versioned by) only the ServeConfig fields in app.READS, so that
    new API keys do not restart the Tagger: its code — constructor, reconfigure, every method, the
    services it holds — run here in process with a config that records what is read, must read
    nothing outside its entry (a field missing there would be left at its default in the replica)."""
    import asyncio

    from tagray.config import from_dict
    from tagray.serve import app as served
    from tagray.serve.errors import is_error

    out, _ = demo_run
    read: dict[str, set[str]] = {}

    def recording(cls, values, where):
        made = from_dict(cls, values, where)
        return _Recording(made, read.setdefault(current, set())) if cls is ServeConfig else made

    monkeypatch.setattr(served, "from_dict", recording)
    config = {f.name: getattr(ServeConfig(), f.name) for f in dataclasses.fields(ServeConfig)}
    config["feedback"] = f"sqlite:///{tmp_path}/f.db"  # what build_app hands `view`: every field
    model, index = str(out / "model_rlr_calibrated"), str(out / "index_rlr")
    from tagray.index import open_index

    image_id = open_index(index).image_ids().to_pylist()[0]
    data = storage.read_bytes(str(next((out / "corpus").rglob("*.jpg"))))

    current = "Tagger"
    tagger = served.Tagger.func_or_class(served.view(config, "Tagger"))
    tagger.reconfigure({"model": model})
    pixels = tagger.service.decode(data)  # what tag() does before @serve.batch (which needs a replica)
    assert tagger.service.tag([pixels], [3], [0.0])[0][0]["tag"] in tagger.tags()
    assert len(asyncio.run(tagger.embed(data))) and tagger.model_info()["head"] == "rlr"
    current = "Searcher"
    searcher = served.Searcher.func_or_class(served.view(config, "Searcher"))
    searcher.reconfigure({"model": model, "index": index, "group": 0, "groups": 1})
    tags = tagger.tags()
    assert searcher.search(f"{tags[0]},{tags[1]}", 5, None, {})["hits"]
    vector = searcher.vector_of(image_id)["vector"]
    assert searcher.similar(vector, 5, None, {}, image_id)["hits"] and searcher.describe()
    assert isinstance(searcher.image(image_id), bytes)
    assert searcher.search("no-such-tag-at-all", 5, None, {})["status"] == 422  # the 4xx paths read too
    current = "Feedback"
    feedback = served.Feedback.func_or_class(served.view(config, "Feedback"))
    feedback.reconfigure({"model": model, "index": index})
    verdict = {"image_id": image_id, "tag": tags[0], "verdict": "present"}
    assert not is_error(feedback.submit("r1", [verdict], "tester")) and feedback.stats()
    for deployment, fields in read.items():
        names = {f.name for f in dataclasses.fields(ServeConfig)} & fields  # methods are not settings
        assert names <= set(served.READS[deployment]), (deployment, sorted(names - set(served.READS[deployment])))
    assert {"batch_size", "max_pixels"} <= read["Tagger"] and {"scan_codes", "max_query_terms"} <= read["Searcher"]


