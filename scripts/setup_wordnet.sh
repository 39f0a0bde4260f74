#!/usr/bin/env bash
# Makes WordNet 3.0 readable by nltk from the checkout's .nltk_data/ (tagray adds it to
# nltk's search path; NLTK_DATA may point elsewhere). The work is `tagray setup wordnet`
# (tagray/data/wordnet.py), the same command an installed tagray or a cluster image runs:
#   1. Debian's wordnet-base + wordnet-sense-index (installed with apt-get when missing),
#      assembled into .nltk_data/corpora/wordnet with the lexnames file nltk expects;
#   2. else nltk's downloader, where a network allows it;
#   3. else a message saying what to install (exit status 2).
# Used by scripts/setup.sh (make setup):  bash scripts/setup_wordnet.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
exec "$PY" -m tagray.cli setup wordnet --dir "$PWD/.nltk_data"
