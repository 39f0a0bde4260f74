"""Feature-extraction throughput: the Ray Data pipeline against a plain PyTorch loop.

Same backbone, images and batch size, in the same run. Also measures where the time
goes, single-threaded: decode CPU-seconds per image (fetch + decode + resize + crop,
the pipeline's own code) and inference CPU-seconds per image. On a machine with C cores
the physical bound is every core busy all the time:
    bound images/s = C / (decode CPU-s + inference CPU-s per image).

    .venv/bin/python benchmarks/featurize.py --backbones resnet18,resnet50 --images 1200 --jpeg-size 480
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tagray.data.schema import read_manifest
from tagray.data.synth import SynthConfig, synthesize
from tagray.features.backbone import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from tagray.features.decode import decode, fetch
from tagray.features.pipeline import FeaturizeConfig, featurize


def decode_cpu_seconds(uris: list[str], cfg: FeaturizeConfig) -> float:
    t0 = time.process_time()
    for uri in uris:
        decode(fetch(uri, cfg.max_bytes), cfg.image_size, cfg.resize_size, cfg.max_pixels)
    return (time.process_time() - t0) / len(uris)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last)


def inference_cpu_seconds(model, pixels: np.ndarray, batch_size: int) -> float:
    torch.set_num_threads(1)
    with torch.inference_mode():
        model(to_tensor(pixels[:batch_size]))  # warm-up
        t0 = time.process_time()
        for i in range(0, len(pixels), batch_size):
            model(to_tensor(pixels[i : i + batch_size]))
    return (time.process_time() - t0) / len(pixels)


def plain_loop(model, uris: list[str], cfg: FeaturizeConfig, threads: int) -> float:
    """One process: decode a batch, run it, repeat (torch uses all cores for inference)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(uris), cfg.batch_size):
            px = np.stack([decode(fetch(u, cfg.max_bytes), cfg.image_size, cfg.resize_size, cfg.max_pixels)
                           for u in uris[i : i + cfg.batch_size]])
            model(to_tensor(px))
    return len(uris) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbones", default="resnet18,resnet50")
    p.add_argument("--images", type=int, default=1200, help="images per pipeline / loop run (ResNet-50 uses half)")
    p.add_argument("--jpeg-size", type=int, default=480, help="side of the generated JPEGs (Flickr 'medium' is 500)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="runs/bench_featurize")
    args = p.parse_args()
    from tagray.runtime import init_ray

    cores = os.cpu_count() or 1
    init_ray(num_cpus=cores)
    work = Path(tempfile.mkdtemp(prefix="tagray-bench-feat-"))
    corpus = synthesize(SynthConfig(images=args.images, image_size=args.jpeg_size, seed=5), str(work / "corpus"))
    manifest = read_manifest(corpus["manifest"])
    uris = manifest.column("uri").to_pylist()
    results = []
    for name in args.backbones.split(","):
        n = args.images if name == "resnet18" else args.images // 2
        sub = str(work / f"m-{n}.parquet")
        from tagray.data.schema import write_manifest

        write_manifest(manifest.slice(0, n), sub)
        cfg = FeaturizeConfig(backbone=name, weights="random", batch_size=args.batch_size, image_size=224, resize_size=256)
        model, _ = build_backbone(name, None)
        model = model.to(memory_format=torch.channels_last)
        dec = decode_cpu_seconds(uris[:200], cfg)
        px = np.stack([decode(fetch(u, cfg.max_bytes), cfg.image_size, cfg.resize_size, cfg.max_pixels)
                       for u in uris[: 4 * args.batch_size]])
        inf = inference_cpu_seconds(model, px, args.batch_size)
        bound = cores / (dec + inf)
        loop = plain_loop(model, uris[:n], cfg, threads=cores)
        row = {
            "backbone": name, "images": n, "batch_size": args.batch_size, "jpeg_size": args.jpeg_size,
            "decode_cpu_s_per_image": round(dec, 5), "inference_cpu_s_per_image": round(inf, 4),
            "bound_images_per_s": round(bound, 1), "plain_loop_images_per_s": round(loop, 1),
        }
        for label, variant in {
            "pipeline_default": cfg,  # one actor per core, 1 torch thread each
            "pipeline_1actor_2threads": FeaturizeConfig(**{**cfg.__dict__, "actors": 1, "torch_threads": cores,
                                                            "actor_cpus": 1.0}),
        }.items():
            s = featurize(sub, str(work / f"f-{name}-{label}"), variant)
            row[f"{label}_images_per_s"] = round(s["images_per_second"], 1)
            row[f"{label}_steady_images_per_s"] = round(s.get("steady_images_per_second", 0.0), 1)
            row[f"{label}_startup_s"] = round(s["startup_seconds"], 1)
            row[f"{label}_of_bound"] = round(s["images_per_second"] / bound, 3)
            row[f"{label}_steady_of_bound"] = round(s.get("steady_images_per_second", 0.0) / bound, 3)
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    out = {"machine": f"{platform.machine()}, {cores} CPUs, torch {torch.__version__}", "results": results}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "featurize.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
