#!/usr/bin/env bash
# Makes WordNet 3.0 readable by nltk from the project-local folder .nltk_data/
# (tagray adds it to nltk's search path; NLTK_DATA may point elsewhere).
#   1. Debian's wordnet-base + wordnet-sense-index (installed with apt-get when missing),
#      assembled into .nltk_data/corpora/wordnet with the lexnames file nltk expects;
#   2. else nltk's downloader, where a network allows it;
#   3. else a message saying what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DEST=.nltk_data/corpora/wordnet
SRC=/usr/share/wordnet

check() { NLTK_DATA="$PWD/.nltk_data" "$PY" -c "from nltk.corpus import wordnet as wn; assert wn.synsets('dog'); print('[setup] WordNet', wn.get_version(), 'readable from .nltk_data')"; }

if [ -f "$DEST/data.noun" ] && [ -f "$DEST/lexnames" ] && check 2>/dev/null; then exit 0; fi

if [ ! -f "$SRC/data.noun" ] || [ ! -f "$SRC/index.sense" ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null; then
    echo "[setup] installing Debian packages wordnet-base wordnet-sense-index"
    $sudo apt-get install -y -q wordnet-base wordnet-sense-index >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q wordnet-base wordnet-sense-index >/dev/null 2>&1; } \
      || echo "[setup] apt-get could not install WordNet"
  fi
fi

if [ -f "$SRC/data.noun" ] && [ -f "$SRC/index.sense" ]; then
  mkdir -p "$DEST"
  cp "$SRC"/data.* "$SRC"/index.* "$SRC"/*.exc "$SRC"/cntlist.rev "$DEST"/
  # nltk reads lexnames as "<index> <name> <syntactic category>", one line per lexicographer file.
  i=0
  for name in adj.all:3 adj.pert:3 adv.all:4 noun.Tops:1 noun.act:1 noun.animal:1 noun.artifact:1 \
      noun.attribute:1 noun.body:1 noun.cognition:1 noun.communication:1 noun.event:1 noun.feeling:1 \
      noun.food:1 noun.group:1 noun.location:1 noun.motive:1 noun.object:1 noun.person:1 \
      noun.phenomenon:1 noun.plant:1 noun.possession:1 noun.process:1 noun.quantity:1 noun.relation:1 \
      noun.shape:1 noun.state:1 noun.substance:1 noun.time:1 verb.body:2 verb.change:2 \
      verb.cognition:2 verb.communication:2 verb.competition:2 verb.consumption:2 verb.contact:2 \
      verb.creation:2 verb.emotion:2 verb.motion:2 verb.perception:2 verb.possession:2 verb.social:2 \
      verb.stative:2 verb.weather:2 adj.ppl:3; do
    printf '%02d\t%s\t%s\n' "$i" "${name%%:*}" "${name##*:}"
    i=$((i + 1))
  done > "$DEST/lexnames"
  check && exit 0
fi

echo "[setup] trying nltk's downloader for WordNet"
if "$PY" -m nltk.downloader -q -d .nltk_data wordnet >/dev/null 2>&1 && check 2>/dev/null; then exit 0; fi

cat >&2 <<MSG
[setup] WordNet is not available to nltk. Do one of:
  - Debian/Ubuntu: apt-get install wordnet-base wordnet-sense-index, then re-run this command;
  - with a network: $PY -m nltk.downloader -d .nltk_data wordnet;
  - or set NLTK_DATA to a folder that holds corpora/wordnet.
MSG
exit 1
