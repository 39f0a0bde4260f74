"""Word lists for the synthetic corpus: concept nouns, synonyms, free tags, camera tags.

Concept words are common Flickr-style nouns whose plural WordNet lemmatises back to
the singular, so the normaliser's plural merge is exercised on real words. Beyond
the built-in list, concept words are drawn from WordNet's most frequent nouns.
"""

from __future__ import annotations

CONCEPT_WORDS = ["beach", "sunset", "dog", "cat", "car", "flower", "tree", "bird", "boat", "bridge", "building", "church", "cloud", "mountain", "lake", "river", "road", "horse", "bicycle", "train", "airplane", "bus", "chair", "book", "bottle", "cup", "lamp", "window", "door", "garden", "forest", "field", "rock", "wave", "island", "castle", "tower", "street", "house", "fountain", "statue", "candle", "apple", "cake", "pizza", "guitar", "piano", "clock", "shoe", "hat", "umbrella", "kite", "balloon", "butterfly", "fish", "duck", "cow", "sheep", "tiger", "bear", "lion", "zebra", "elephant", "giraffe", "monkey", "rabbit", "turtle", "frog", "snake", "spider", "bee", "flag", "map", "sign", "bench", "fence", "wall", "roof", "stair", "cliff", "valley", "desert", "waterfall", "volcano", "harbor", "lighthouse", "windmill", "barn", "tractor", "truck", "taxi", "tram", "ferry", "yacht", "canoe", "tent", "campfire", "lantern", "mask", "costume", "dress", "jacket", "scarf", "glove", "ring", "necklace", "painting", "sculpture", "mural", "poster", "camera", "phone", "computer", "keyboard"]

SYNONYMS = {
    "car": "auto",
    "dog": "puppy",
    "cat": "kitty",
    "airplane": "plane",
    "bicycle": "bike",
    "boat": "vessel",
    "sunset": "dusk",
    "forest": "woods",
    "road": "highway",
    "flower": "blossom",
    "building": "edifice",
    "rabbit": "bunny",
    "harbor": "port",
    "painting": "artwork",
}

# Words of the pretrained vocabulary that no image is tagged with, each close in meaning to a
# concept (synthetic word vectors put it near that concept): open-vocabulary queries.
UNTAGGED_RELATED = {
    "beach": "seashore",
    "dog": "hound",
    "cat": "feline",
    "car": "automobile",
    "flower": "petal",
    "tree": "oak",
    "bird": "sparrow",
    "boat": "sailboat",
    "bridge": "viaduct",
    "building": "skyscraper",
    "church": "chapel",
    "cloud": "overcast",
    "mountain": "summit",
    "lake": "pond",
    "river": "stream",
    "horse": "stallion",
    "sunset": "twilight",
    "train": "locomotive",
    "airplane": "jet",
    "bus": "coach",
}

# Tags people add that name no visual concept: events, places, moods, styles.
FREE_WORDS = ["holiday", "vacation", "trip", "travel", "friends", "family", "me", "summer", "winter", "spring", "autumn", "weekend", "paris", "london", "tokyo", "berlin", "rome", "nyc", "california", "italy", "france", "japan", "germany", "canada", "hdr", "macro", "bokeh", "vintage", "retro", "cosplay", "instagood", "love", "fun", "happy", "beautiful", "nature", "city", "urban", "night", "light", "color", "bw", "blackandwhite", "portrait", "landscape", "outdoor", "indoor", "art", "music", "party", "festival", "wedding", "birthday", "school", "home", "work", "sky", "blue", "red", "green", "yellow", "old", "new", "morning", "evening", "day", "weather", "walk", "view", "memories"]
FREE_MULTIWORD = ("new york", "san francisco", "hong kong", "road trip", "black and white")

CAMERAS = (
    ("canon", "eos"),
    ("canon", "powershot"),
    ("nikon", "d90"),
    ("nikon", "coolpix"),
    ("sony", "nex"),
    ("iphone",),
    ("olympus",),
    ("fujifilm",),
    ("panasonic", "lumix"),
    ("android",),
)
AWARD_TAGS = ("explore", "abigfave", "superbmasterpiece", "aplusphoto", "flickrdiamond")
YEARS = tuple(str(y) for y in range(2004, 2016))


def plural(word: str) -> str:
    """Regular English plural (the concept words are chosen so WordNet maps it back)."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def concept_words(n: int) -> list[str]:
    """`n` distinct concept nouns: the built-in list, then WordNet's most frequent nouns."""
    words = list(CONCEPT_WORDS[:n])
    if len(words) == n:
        return words
    from tagray.data.wordnet import lemmatizer, wordnet

    wn, lem = wordnet(), lemmatizer()
    taken = set(words) | set(SYNONYMS.values()) | set(FREE_WORDS) | set(UNTAGGED_RELATED.values())
    counted = []
    for lemma in wn.all_lemma_names(pos="n"):
        if lemma.isalpha() and lemma.islower() and 4 <= len(lemma) <= 10 and lemma not in taken:
            synsets = wn.synsets(lemma, pos="n")
            if synsets:
                count = sum(lm.count() for s in synsets for lm in s.lemmas() if lm.name() == lemma)
                counted.append((-count, lemma))
    for _, lemma in sorted(counted):
        if lem.lemmatize(lemma, "n") == lemma and lem.lemmatize(plural(lemma), "n") == lemma:
            words.append(lemma)
            if len(words) == n:
                return words
    raise ValueError(f"WordNet has fewer than {n} usable concept nouns")
