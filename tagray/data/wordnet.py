"""WordNet 3.0 through nltk: where tagray finds it, and how `tagray setup wordnet` installs it.

nltk reads WordNet from `<folder>/corpora/wordnet/` for any folder on `nltk.data.path`.
tagray puts these first, in this order:

1. `$NLTK_DATA` (one folder, or several separated by `os.pathsep`, as nltk itself reads it);
2. in a checkout, its `.nltk_data/` (what `make setup` assembles);
3. nltk's own defaults (`~/nltk_data`, `<sys.prefix>/nltk_data`, `/usr/share/nltk_data`, …),
   where `tagray setup wordnet` installs by default, so an installed wheel needs no variable.

`install_wordnet` assembles the folder from Debian's `wordnet-base` (data.*, index.*, *.exc,
cntlist.rev) and `wordnet-sense-index` (index.sense), writing the `lexnames` file nltk
expects, or else uses nltk's downloader where a network allows (scripts/setup_wordnet.sh
calls it; there is one implementation).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path


def _checkout_root() -> Path | None:
    """The source checkout tagray runs from (editable install), else None (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "tagray" / "cli.py").is_file() else None


CHECKOUT = _checkout_root()
# Where `tagray setup wordnet` puts WordNet without --dir: first on nltk's default path.
DEFAULT_DIR = Path(os.path.expanduser("~/nltk_data"))
# The folder tagray adds to nltk's path besides $NLTK_DATA (forwarded to Ray workers by tagray.runtime).
LOCAL_NLTK_DATA = CHECKOUT / ".nltk_data" if CHECKOUT else DEFAULT_DIR
# Where Debian's wordnet-base and wordnet-sense-index put the database.
DEBIAN_SOURCE = Path("/usr/share/wordnet")
DEBIAN_PACKAGES = ("wordnet-base", "wordnet-sense-index")

# nltk's lexnames: "<index>\t<lexicographer file>\t<syntactic category>" for the 45 files of
# WordNet 3.0, in the order of lexnames(5WN) (category 1 noun, 2 verb, 3 adjective, 4 adverb).
LEXNAMES = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1), ("noun.animal", 1),
    ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1), ("noun.cognition", 1),
    ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1), ("noun.food", 1), ("noun.group", 1),
    ("noun.location", 1), ("noun.motive", 1), ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1),
    ("noun.plant", 1), ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1), ("verb.body", 2),
    ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2), ("verb.competition", 2),
    ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2), ("verb.emotion", 2), ("verb.motion", 2),
    ("verb.perception", 2), ("verb.possession", 2), ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2),
    ("adj.ppl", 3),
)
SETUP_HINT = (
    "Run `tagray setup wordnet` (installs it into ~/nltk_data, where nltk looks by default), "
    "or `tagray setup wordnet --dir DIR` and set NLTK_DATA=DIR; in a checkout `make setup` does it."
)


class WordNetUnavailable(RuntimeError):
    """nltk cannot find WordNet data, or `tagray setup wordnet` could not install it."""


def search_dirs() -> list[str]:
    """The folders tagray puts first on nltk's path: $NLTK_DATA's, then LOCAL_NLTK_DATA."""
    env = [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    return list(dict.fromkeys([*env, str(LOCAL_NLTK_DATA)]))


@contextmanager
def _identity_mapping_skipped():
    """nltk (3.9–3.10) builds, while loading WordNet, a map from WordNet 3.0's synsets to the
    loaded version's for the Open Multilingual Wordnet (`map30`): it reads index.sense twice and
    matches every sense key, 3.5 of the 5.3 s a process spent loading WordNet here. It means to
    skip that when the loaded data is 3.0, but compares the version with the corpus name
    ("wordnet"), so it never skips. tagray reads no OMW; for 3.0 data (what `tagray setup
    wordnet` installs) the map is the identity, so it is skipped here (other versions keep it)."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    original = WordNetCorpusReader.map_wn

    def map_wn(self, version="wordnet"):
        return None if self.get_version() == "3.0" else original(self, version)

    WordNetCorpusReader.map_wn = map_wn
    try:
        yield
    finally:
        WordNetCorpusReader.map_wn = original


@lru_cache(maxsize=1)
def wordnet():
    """nltk's WordNet reader, loaded once; a clear error when the data is missing."""
    import nltk

    for folder in reversed(search_dirs()):
        if folder in nltk.data.path:
            nltk.data.path.remove(folder)
        nltk.data.path.insert(0, folder)
    from nltk.corpus import wordnet as wn

    try:
        with _identity_mapping_skipped():
            wn.ensure_loaded()
    except LookupError as e:
        raise WordNetUnavailable(
            f"WordNet data for nltk not found (looked for corpora/wordnet in {', '.join(search_dirs())} "
            f"and nltk's defaults). {SETUP_HINT}"
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


def readable_version(folder: Path) -> str | None:
    """The WordNet version nltk reads from `folder` alone (a NLTK_DATA folder holding
    corpora/wordnet or corpora/wordnet.zip), None when it cannot. Reads through a reader of
    its own, so neither nltk's other folders nor the cached `wordnet()` reader play a part."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    added = str(folder) not in nltk.data.path
    if added:  # nltk (≥ 3.9) reads corpora only under the folders on its path
        nltk.data.path.append(str(folder))
    try:
        root = nltk.data.find("corpora/wordnet", paths=[str(folder)])
        with warnings.catch_warnings():  # "multilingual functions are not available": no OMW wanted
            warnings.simplefilter("ignore", UserWarning)
            reader = WordNetCorpusReader(root, None)
        return str(reader.get_version()) if reader.synsets("dog") else None
    except (LookupError, OSError, ValueError, AssertionError):  # missing or unreadable files
        return None
    finally:
        if added:
            nltk.data.path.remove(str(folder))


def assemble_from_debian(source: Path, folder: Path) -> Path:
    """Copies Debian's WordNet database from `source` into `folder`/corpora/wordnet and writes
    nltk's `lexnames`. Raises WordNetUnavailable naming the missing file."""
    for name in ("data.noun", "index.sense"):
        if not (source / name).is_file():
            package = "wordnet-sense-index" if name == "index.sense" else "wordnet-base"
            raise WordNetUnavailable(f"{source / name} is missing (Debian package {package})")
    dest = folder / "corpora" / "wordnet"
    dest.mkdir(parents=True, exist_ok=True)
    for pattern in ("data.*", "index.*", "*.exc", "cntlist.rev"):
        for f in sorted(source.glob(pattern)):
            if f.is_file():
                shutil.copyfile(f, dest / f.name)
    lexnames = "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(LEXNAMES))
    (dest / "lexnames").write_text(lexnames)
    return dest


def apt_install(packages: tuple[str, ...] = DEBIAN_PACKAGES) -> bool:
    """Installs Debian packages with apt-get (as root, or with passwordless sudo); False when it cannot."""
    if not shutil.which("apt-get"):
        return False
    sudo: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        if not shutil.which("sudo") or subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0:
            return False
        sudo = ["sudo", "-n"]
    install = [*sudo, "apt-get", "install", "-y", "-q", *packages]
    if subprocess.run(install, capture_output=True).returncode == 0:
        return True
    subprocess.run([*sudo, "apt-get", "update", "-q"], capture_output=True)
    return subprocess.run(install, capture_output=True).returncode == 0


def nltk_download(folder: Path) -> bool:
    """nltk's downloader into `folder` (needs a network); False when it fails."""
    import nltk

    try:
        return bool(nltk.download("wordnet", download_dir=str(folder), quiet=True, raise_on_error=True))
    except Exception:  # network errors come in many types (URLError, ValueError, OSError…)
        return False


def install_wordnet(
    folder: Path, source: Path = DEBIAN_SOURCE, use_apt: bool = True, download: bool = True,
    log=print,
) -> str:
    """Makes WordNet readable by nltk from `folder` (as NLTK_DATA) and returns its version:
    already there → nothing to do; else Debian's files from `source` (installing the packages
    with apt-get when missing and `use_apt`); else nltk's downloader when `download`."""
    folder = folder.expanduser().resolve()
    version = readable_version(folder)
    if version:
        log(f"WordNet {version} is already readable by nltk from {folder}")
        return version
    tried = []
    missing = not (source / "data.noun").is_file() or not (source / "index.sense").is_file()
    if missing and use_apt and source == DEBIAN_SOURCE:
        log(f"installing Debian packages {' '.join(DEBIAN_PACKAGES)} with apt-get")
        if not apt_install():
            tried.append(f"apt-get install {' '.join(DEBIAN_PACKAGES)} failed or needs root")
    if (source / "data.noun").is_file():
        try:
            dest = assemble_from_debian(source, folder)
            log(f"assembled WordNet from {source} into {dest}")
        except WordNetUnavailable as e:
            tried.append(str(e))
        version = readable_version(folder)
        if version:
            return version
        tried.append(f"nltk cannot read what was assembled from {source}")
    else:
        tried.append(f"no WordNet database in {source} (Debian packages {', '.join(DEBIAN_PACKAGES)})")
    if download:
        log("trying nltk's downloader for WordNet")
        if nltk_download(folder) and (version := readable_version(folder)):
            return version
        tried.append("nltk's downloader failed (no network?)")
    raise WordNetUnavailable(
        f"could not install WordNet into {folder}: {'; '.join(tried)}. Install the Debian packages "
        f"({'apt-get install ' + ' '.join(DEBIAN_PACKAGES)}) and re-run, run `python -m nltk.downloader "
        f"-d {folder} wordnet` where a network allows, or set NLTK_DATA to a folder that holds corpora/wordnet."
    )


def on_nltk_default_path(folder: Path) -> bool:
    """Whether nltk finds `folder` without NLTK_DATA (it is one of nltk's default folders)."""
    import nltk

    env = {os.path.realpath(d) for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d}
    defaults = {os.path.realpath(d) for d in nltk.data.path} - env
    return os.path.realpath(folder) in defaults
