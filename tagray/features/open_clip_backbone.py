"""CLIP towers from the `open_clip_torch` package: the image tower as a featurize backbone
(`--backbone open_clip:ViT-B-32`) and the text tower as the embedding head's pretrained word
vectors (`--vectors open_clip:ViT-B-32@WEIGHTS`).

The image feature is the tower's output, `CLIP.encode_image(x)` unnormalised: the embedding
in CLIP's joint space (ViT-B-32: 512-D), the vector other CLIP pipelines store. Weights are a
state_dict file of the whole CLIP model (open_clip's `open_clip_pytorch_model.bin` or
`open_clip_model.safetensors`) or of the image tower alone (keys `visual.*`), read through
`tagray.data.storage`; the model is always built with open_clip's random initialisation and no
download (`create_model(..., pretrained=None, load_weights=False)`), then the file is loaded
strictly. The preprocessing is open_clip's for the model (its config's image size; mean/std
and resize mode of its published weights, `open_clip.get_pretrained_cfg`, when they all agree,
else open_clip's `PreprocessCfg` defaults).

Word vectors (seed 004 §2.1 wants pretrained vectors for words no image carries): each word is
written into the prompt `PROMPT` ("a photo of {word}.", the template CLIP users write for a
label), encoded by the text tower and L2-normalised (CLIP compares text and image embeddings
by cosine). The words are the caller's (the training tags) followed by frequent English words:
the whole-word tokens of CLIP's BPE vocabulary in merge order (≈ frequency order) that are
WordNet lemmas, up to `max_words` (default `DEFAULT_WORDS`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from tagray.config import ConfigError

log = logging.getLogger(__name__)

PREFIX = "open_clip:"
PROMPT = "a photo of {}."
DEFAULT_WORDS = 5000  # extra words encoded when `max_words` is not set
ENCODE_BATCH = 256  # prompts per text-tower call


def is_open_clip(name: str) -> bool:
    return name.startswith(PREFIX)


def model_name(name: str) -> str:
    """`open_clip:ViT-B-32` → `ViT-B-32`, checked against open_clip's built-in configs."""
    try:
        import open_clip
    except ImportError as e:
        raise ConfigError(f"backbone {name!r} needs the open_clip_torch package (pip install 'open_clip_torch>=3.3'): "
                          f"{e}") from e
    arch = name.removeprefix(PREFIX)
    if arch not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else "e.g. open_clip:ViT-B-32, open_clip:RN50"
        raise ConfigError(f"unknown open_clip model {arch!r} in backbone {name!r}: {hint} "
                          f"(open_clip {open_clip.__version__} knows {len(open_clip.list_models())} models)")
    return arch


def preprocess(name: str) -> dict:
    """open_clip's preprocessing for the model: `image_size`, `resize_size` (the same: open_clip
    resizes the shorter side to the crop size), `mean`, `std`, `interpolation`, `resize_mode`."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    arch = model_name(name)
    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ConfigError(f"backbone {name!r} takes {size[0]}×{size[1]} images; tagray's decoder crops squares")
        size = size[0]
    cfg = PreprocessCfg()
    keys = ("mean", "std", "interpolation", "resize_mode")
    found = {tuple(tuple(v) if isinstance(v, list) else v for v in (open_clip.get_pretrained_cfg(arch, t).get(k)
                                                                    for k in keys))
             for t in open_clip.list_pretrained_tags_by_model(arch)}
    values = dict(zip(keys, next(iter(found)), strict=True)) if len(found) == 1 else {}
    return {
        "image_size": int(size),
        "resize_size": int(size),
        "mean": tuple(float(v) for v in values.get("mean") or cfg.mean),
        "std": tuple(float(v) for v in values.get("std") or cfg.std),
        "interpolation": values.get("interpolation") or cfg.interpolation,
        "resize_mode": values.get("resize_mode") or cfg.resize_mode,
    }


def refuse_pretrained_tag(name: str, weights: str) -> None:
    """A ConfigError when `weights` is one of open_clip's pretrained tags for the model
    (`laion2b_s34b_b79k`): tagray reads CLIP weights from a file, and says where to get it."""
    if not is_open_clip(name):
        return
    import open_clip

    arch = model_name(name)
    if weights in open_clip.list_pretrained_tags_by_model(arch):
        cfg = open_clip.get_pretrained_cfg(arch, weights)
        where = f"huggingface.co/{cfg['hf_hub'].rstrip('/')}" if cfg.get("hf_hub") else cfg.get("url", "open_clip")
        raise ConfigError(f"--weights {weights} is an open_clip pretrained tag; tagray reads CLIP weights from a file: "
                          f"get open_clip_pytorch_model.bin (or open_clip_model.safetensors) from {where} and pass "
                          "--weights PATH or s3://…")


def _clip_model(arch: str, seed: int) -> nn.Module:
    """open_clip's model with its own random initialisation (seeded); nothing downloaded."""
    import open_clip

    torch.manual_seed(seed)
    root = logging.getLogger()
    root.addFilter(_no_random_init_warning)  # weights are loaded next, or random was asked for (and said so)
    try:
        model = open_clip.create_model(arch, pretrained=None, load_weights=False, pretrained_image=False,
                                       pretrained_text=False)
    finally:
        root.removeFilter(_no_random_init_warning)
    return model.eval()


def _no_random_init_warning(record: logging.LogRecord) -> bool:
    """Drops open_clip's root-logger "No pretrained weights loaded … initialized randomly"."""
    return not str(record.msg).startswith("No pretrained weights loaded")


def _fit(state: dict, model: nn.Module) -> dict:
    """open_clip's own fix-ups of a checkpoint (`factory.load_checkpoint`): a DataParallel
    `module.` prefix, a scalar vs 1-element `logit_scale` / `logit_bias`."""
    if state and next(iter(state)).startswith("module."):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    state = dict(state)
    for key in ("logit_scale", "logit_bias"):
        ref = getattr(model, key, None)
        if key in state and isinstance(ref, torch.Tensor) and state[key].ndim != ref.ndim:
            state[key] = state[key].reshape(ref.shape)
    return state


def _load(model: nn.Module, state: dict, name: str, visual_only: bool) -> None:
    from tagray.features.weights import misfit

    try:
        if visual_only:
            model.visual.load_state_dict({k.removeprefix("visual."): v for k, v in state.items()}, strict=True)
        else:
            model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise misfit(name, e) from e


def image_state(state: dict) -> dict:
    """The image tower's part of a CLIP state_dict (what featurize ships to its actors)."""
    return {k: v for k, v in state.items() if k.removeprefix("module.").startswith("visual.")}


class ImageTower(nn.Module):
    """CLIP's image tower: (B, 3, S, S) normalised pixels → (B, embed_dim) `encode_image` output."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def build_image_tower(name: str, state: dict | None, seed: int = 0) -> nn.Module:
    """The image tower of `open_clip:<model>` with `state` loaded strictly (a whole-CLIP
    state_dict, or `visual.*` keys only), or open_clip's random init under `seed`; eval mode."""
    model = _clip_model(model_name(name), seed)
    if state is not None:
        state = _fit(state, model)
        visual_only = all(k.startswith("visual.") for k in state)
        _load(model, state, name, visual_only)
    return ImageTower(model.visual).eval()


def parse_vectors_spec(spec: str) -> tuple[str, str]:
    """`open_clip:ViT-B-32@WEIGHTS` → ("open_clip:ViT-B-32", WEIGHTS); WEIGHTS is a state_dict
    path or URI, or `random`. Checked before anything is loaded."""
    name, sep, weights = spec.partition("@")
    if not sep or not weights:
        raise ConfigError(
            f"--vectors {spec}: name the CLIP weights the text tower uses: {name}@/path/open_clip_pytorch_model.bin "
            f"(or s3://…), or {name}@random for randomly initialised ones (test runs only)"
        )
    model_name(name)
    return name, weights


def bpe_words(normalizer, limit: int) -> list[str]:
    """Frequent English words: CLIP's BPE whole-word tokens (`…</w>`) in merge order that are
    WordNet lemmas, through the tag normaliser, first `limit` normal forms."""
    from open_clip.tokenizer import SimpleTokenizer

    from tagray.data.wordnet import wordnet

    lemmas = set(wordnet().all_lemma_names())
    encoder = SimpleTokenizer().encoder  # token → id; ids follow the merge order
    out: list[str] = []
    seen: set[str] = set()
    for token, _ in sorted(encoder.items(), key=lambda kv: kv[1]):
        if len(out) >= limit:
            break
        word = token.removesuffix("</w>")
        if word == token or len(word) < 3 or not word.isascii() or not word.isalpha() or word not in lemmas:
            continue
        normal = normalizer.normalize_tag(word)
        if normal and normal not in seen:
            seen.add(normal)
            out.append(normal)
    return out


def _encode_short(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)` computed over the first L positions only, L = the longest
    prompt: with CLIP's causal mask the end-of-text token's output does not depend on the
    padding after it, so the result is the same at ~77/L times less work. Models without a
    causal mask or without these attributes take the plain `encode_text`."""
    from open_clip.transformer import text_global_pool

    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask", "text_projection")
    pool = getattr(model, "text_pool_type", None)
    if any(not hasattr(model, a) for a in needed) or model.attn_mask is None or pool != "argmax":
        return model.encode_text(tokens)
    length = int((tokens != 0).sum(dim=1).max())
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, pool)
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def text_vectors(
    spec: str,
    normalizer,
    words: tuple[str, ...] | list[str] = (),
    max_words: int | None = None,
    endpoint_url: str | None = None,
) -> tuple[list[str], np.ndarray]:
    """(normal-form words, (n, embed_dim) float32 unit vectors) from the text tower of the CLIP
    weights `spec` names (`open_clip:<model>@WEIGHTS`): `words` (normalised) first, then up to
    `max_words` frequent words (`bpe_words`); each encoded as `PROMPT.format(word)`."""
    import open_clip

    from tagray.features.weights import RANDOM, read_weights

    name, weights = parse_vectors_spec(spec)
    arch = model_name(name)
    state = None
    if weights == RANDOM:
        log.warning("!!! word vectors from a RANDOMLY INITIALISED %s text tower, as asked: they carry no meaning", arch)
    else:
        state, _ = read_weights(weights, endpoint_url)
        if all(k.removeprefix("module.").startswith("visual.") for k in state):
            raise ConfigError(f"--vectors {spec}: {weights} holds only the image tower (visual.*); the text tower needs "
                              "the whole CLIP checkpoint")
    model = _clip_model(arch, seed=0)
    if state is not None:
        _load(model, _fit(state, model), name, visual_only=False)
    model.visual = None  # the image tower is not needed here
    given: list[str] = []
    taken: set[str] = set()
    for w in words:
        normal = normalizer.normalize_tag(w)
        if normal and normal not in taken:
            taken.add(normal)
            given.append(normal)
    limit = DEFAULT_WORDS if max_words is None else max_words
    extra = [w for w in bpe_words(normalizer, limit + len(given)) if w not in taken][:limit]
    vocab = given + extra
    if not vocab:
        raise ConfigError(f"--vectors {spec}: no words to encode")
    tokenizer = open_clip.get_tokenizer(arch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    rows = []
    with torch.inference_mode():
        for i in range(0, len(vocab), ENCODE_BATCH):
            tokens = tokenizer([PROMPT.format(w) for w in vocab[i : i + ENCODE_BATCH]]).to(device)
            rows.append(torch.nn.functional.normalize(_encode_short(model, tokens).float(), dim=-1).cpu().numpy())
    log.info("word vectors: %d words (%d given, %d frequent) encoded by the %s text tower as %r",
             len(vocab), len(given), len(extra), arch, PROMPT)
    return vocab, np.concatenate(rows).astype(np.float32)


def check_vectors_source(spec: str) -> None:
    """Checks `--vectors` without reading it (before Ray starts): an `open_clip:` source must
    name a known model and its weights (`open_clip:ViT-B-32@PATH` or `@random`)."""
    if spec.startswith(PREFIX):
        parse_vectors_spec(spec)


def pretrained_vectors(spec: str, normalizer, max_words: int | None = None, endpoint_url: str | None = None,
                       words: tuple[str, ...] | list[str] = ()) -> tuple[list[str], np.ndarray]:
    """The embed head's pretrained word vectors: for `open_clip:<model>@WEIGHTS` CLIP's text
    tower over `words` (the training tags) and up to `max_words` frequent words, each encoded as
    "a photo of {word}." (`text_vectors`); otherwise a word-vector file
    (`tagray.data.word_vectors.read_word_vectors`, which ignores `words`)."""
    if spec.startswith(PREFIX):
        return text_vectors(spec, normalizer, words, max_words, endpoint_url)
    from tagray.data.word_vectors import read_word_vectors

    return read_word_vectors(spec, normalizer, max_words, endpoint_url)
