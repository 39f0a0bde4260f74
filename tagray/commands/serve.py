"""`tagray serve`: the Ray Serve app (tagging, search, the page at /) for a model directory
and its index, on the Ray cluster in RAY_ADDRESS or a local one. Same app as
`serve run serve_configs/tagray.yaml`."""

import argparse
import os
import threading

from tagray.commands.common import add_endpoint, add_overrides, command
from tagray.config import ConfigError, load_yaml, parse_overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray serve", description=__doc__)
    p.add_argument("--model", default=None, help="model directory (lr/rlr, calibrated or not, or embed)")
    p.add_argument("--index", default=None,
                   help="index directory from `tagray index` (enables /v1/search and /v1/similar; without it "
                        "they answer 503); its shards are split over search_groups=G (an override) Searcher deployments")
    p.add_argument("--feedback", default=None,
                   help="store users' verdicts from POST /v1/feedback in sqlite:///PATH (WAL; relative to the cwd)")
    p.add_argument("--config", default=None, help="a Serve config (serve_configs/tagray.yaml): its app's args")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--bucket", action="append", default=[], help="a bucket /v1/tag may read s3:// URIs from (repeat)")
    p.add_argument("--ray-address", default=None)
    add_endpoint(p)
    add_overrides(p, "ServeConfig")
    return p


def args_from_serve_config(path: str) -> dict:
    """The `args` of the first application in a Serve config file."""
    data = load_yaml(path)
    apps = data.get("applications") or []
    if not apps or "args" not in apps[0]:
        raise ConfigError(f"{path}: expected applications[0].args (a Serve config, see serve_configs/tagray.yaml)")
    return dict(apps[0]["args"])


def check_deployable(args: dict) -> None:
    """The model loads and the index belongs to it — checked here, so a wrong path is one clear
    error instead of a deployment that fails inside Serve."""
    from tagray.config import from_dict
    from tagray.heads.models import load_image_tagger
    from tagray.index import open_index
    from tagray.index.model import check_index_matches
    from tagray.serve.app import keyring_of
    from tagray.serve.service import ServeConfig

    cfg = from_dict(ServeConfig, dict(args), "serve args")
    try:
        keyring_of(cfg)  # the environment's key entries, refused here rather than in a replica
    except ValueError as e:
        raise ConfigError(str(e)) from None
    head = load_image_tagger(cfg.model, cfg.endpoint_url)
    if cfg.index:
        info = open_index(cfg.index, cfg.endpoint_url)
        check_index_matches(info.meta, head, cfg.index)
        if not info.shards:
            raise ConfigError(f"{cfg.index}: the index has no shards (version {info.version}); nothing to search")
    if cfg.feedback:  # the database opens (and is created) here, not first in a replica
        from tagray.data.feedback import FeedbackStore

        FeedbackStore.open(cfg.feedback, cfg.base_dir or os.getcwd()).close()


def start(args: dict, host: str, port: int, checked: bool = False):
    """Checks the model and index (unless `checked`), starts Serve's HTTP proxy and deploys the
    app; returns its URL."""
    from ray import serve

    from tagray.serve.app import build_app

    if not checked:
        check_deployable(args)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name="tagray", route_prefix="/")
    return f"http://{host}:{port}/"


@command("serve")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = args_from_serve_config(args.config) if args.config else {}
    settings.update(parse_overrides(args.overrides))
    for key, value in (("model", args.model), ("index", args.index), ("endpoint_url", args.endpoint_url),
                       ("feedback", args.feedback)):
        if value is not None:
            settings[key] = value
    if args.bucket:
        settings["buckets"] = args.bucket
    if not settings.get("model"):
        raise ConfigError("give --model MODEL (or a --config whose args name one)")
    check_deployable(settings)  # a wrong path or setting is one line, before Ray starts
    from tagray.runtime import init_ray

    init_ray(args.ray_address)
    url = start(settings, args.host, args.port, checked=True)
    print(f"serving {settings['model']} at {url}  (API docs: {url}docs; Ctrl-C stops)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0
