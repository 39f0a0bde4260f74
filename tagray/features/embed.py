"""The backbone actor of the featurize pipeline: uint8 pixels → penultimate-layer features."""

from __future__ import annotations

import time

import numpy as np

from tagray.features.backbone import build_backbone


class Embedder:
    """Actor: holds the backbone; uint8 pixels → penultimate-layer features (eval mode,
    inference_mode; channels-last and bf16 autocast on GPU)."""

    def __init__(self, name: str, weights_ref: list, seed: int, torch_threads: int, mean, std) -> None:
        import ray
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            torch.set_num_threads(torch_threads)
        state = ray.get(weights_ref[0]) if weights_ref else None
        model, self.dim = build_backbone(name, state, seed)
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        ok = batch["reason"] == ""
        features = np.zeros((len(ok), self.dim), dtype=np.float32)
        if ok.any():
            # (B, H, W, 3) uint8 → (B, 3, H, W) normalised float, channels-last memory
            x = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().sub_(self.mean).div_(self.std)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
                features[ok] = self.model(x).float().cpu().numpy()
        # when this batch left the backbone (wall clock): the driver's start-up figure is the first of them
        embedded_at = np.full(len(ok), time.time(), dtype=np.float64)
        return {k: batch[k] for k in ("image_id", "uri", "stage", "reason")} | {"feature": features,
                                                                              "embedded_at": embedded_at}
