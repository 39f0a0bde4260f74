"""WordNet through nltk, from the project-local `.nltk_data/` that `make setup` assembles."""

from __future__ import annotations

import os
from functools import lru_cache

from tagray.config import REPO_ROOT

LOCAL_NLTK_DATA = REPO_ROOT / ".nltk_data"


class WordNetUnavailable(RuntimeError):
    """nltk cannot find WordNet data."""


@lru_cache(maxsize=1)
def wordnet():
    """nltk's WordNet reader, loaded once; a clear error when the data is missing."""
    import nltk

    for folder in (os.environ.get("NLTK_DATA"), str(LOCAL_NLTK_DATA)):
        if folder and folder not in nltk.data.path:
            nltk.data.path.insert(0, folder)
    from nltk.corpus import wordnet as wn

    try:
        wn.ensure_loaded()
    except LookupError as e:
        raise WordNetUnavailable(
            "WordNet data for nltk not found. Run `make setup` (it assembles it from Debian's "
            "wordnet-base and wordnet-sense-index into .nltk_data/), or "
            "`python -m nltk.downloader -d .nltk_data wordnet`, or set NLTK_DATA."
        ) from e
    return wn


@lru_cache(maxsize=1)
def lemmatizer():
    """nltk's WordNet lemmatiser (morphy), bound to the loaded WordNet."""
    from nltk.stem import WordNetLemmatizer

    wordnet()
    return WordNetLemmatizer()


def wordnet_version() -> str:
    """The WordNet version nltk reads (part of the normaliser's identity)."""
    return str(wordnet().get_version())
