"""Per-user named-entity data: the WNUT-16 tweets, users built by interest profile, their label views.

The corpus (asset ``wnut16``) has no author ids, so users are built (docs/ner-data.md): user ``i`` has
interest profile ``i % 5`` (a group of entity types) and is named ``f"{profile}-{i // 5}"``. Each tweet
goes to exactly one user, drawn with weight ``1 + BETA * |types(tweet) ∩ profile(user)|``, so users mostly
see what they care about. A user's label view keeps only its profile's types (partial annotation): every
other tag becomes "O". All tags index the 21-tag union space ``TAG_NAMES``. Everything is seeded by
``task.seed`` and the same in every process; parses and assignments are cached per process.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from common.assets import ensure
from common.config import TaskConfig
from common.errors import ConfigError, DataError
from common.pii import parse_patterns, scrub
from common.spans import entity_counts, f1, spans

PROFILES: dict[str, tuple[str, ...]] = {
    "entertainment": ("musicartist", "tvshow", "movie"),
    "sports": ("sportsteam", "person"),
    "travel": ("geo-loc", "facility"),
    "brands": ("company", "product"),
    "people": ("person", "other"),
}
TAG_TYPES: tuple[str, ...] = tuple(dict.fromkeys(t for types in PROFILES.values() for t in types))
TAG_NAMES: tuple[str, ...] = ("O", *(f"{p}-{t}" for t in TAG_TYPES for p in ("B", "I")))
# How strongly a tweet is drawn to users who care about its entity types: a tweet with one in-profile type
# is 1 + BETA = 4 times as likely to go to such a user as to a user who cares about none of its types.
BETA = 3.0
_TAG_ID = {name: i for i, name in enumerate(TAG_NAMES)}

Tweet = tuple[tuple[str, ...], tuple[str, ...]]  # (words, tags)


@dataclasses.dataclass(frozen=True)
class TaggedData:
    """One user's train and test sentences; tags are ids into ``tag_names``, one per word."""

    train_words: tuple[tuple[str, ...], ...]
    train_tags: tuple[tuple[int, ...], ...]
    test_words: tuple[tuple[str, ...], ...]
    test_tags: tuple[tuple[int, ...], ...]
    tag_names: tuple[str, ...]
    user: str
    profile: tuple[str, ...]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            words, tags = getattr(self, f"{split}_words"), getattr(self, f"{split}_tags")
            if len(words) != len(tags):
                raise DataError(f"{self.user}: {len(words)} {split} sentences but {len(tags)} tag rows")
            for i, (w, t) in enumerate(zip(words, tags, strict=True)):
                if len(w) != len(t):
                    raise DataError(f"{self.user}: {split} sentence {i} has {len(w)} words, {len(t)} tags")
                if any(not 0 <= tag < len(self.tag_names) for tag in t):
                    raise DataError(
                        f"{self.user}: {split} sentence {i} has a tag id outside 0..{len(self.tag_names) - 1}"
                    )


def parse_corpus(path: Path) -> tuple[Tweet, ...]:
    """The tweets of a ``token<TAB>tag`` file; a line of only a tab (or an empty line) ends a tweet."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the NER corpus {path}: {exc}") from exc
    tweets: list[Tweet] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if fields in ([""], ["", ""]):
            if words:
                tweets.append((tuple(words), tuple(tags)))
            words, tags = [], []
            continue
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise DataError(f"{path}:{number}: expected 'token<TAB>tag', got {line!r}")
        if fields[1] not in _TAG_ID:
            raise DataError(f"{path}:{number}: unknown tag {fields[1]!r}; allowed: {', '.join(TAG_NAMES)}")
        words.append(fields[0])
        tags.append(fields[1])
    if words:
        tweets.append((tuple(words), tuple(tags)))
    if not tweets:
        raise DataError(f"the NER corpus {path} holds no tweets")
    return tuple(tweets)


@lru_cache(maxsize=2)
def _parsed(path: str, mtime_ns: int, size: int) -> tuple[Tweet, ...]:
    return parse_corpus(Path(path))


def corpus() -> tuple[Tweet, ...]:
    """The WNUT-16 training tweets (fetched on first use), with all 10 entity types tagged."""
    path = ensure("wnut16")
    st = path.stat()
    return _parsed(str(path.resolve()), st.st_mtime_ns, st.st_size)


def user_profile(index: int) -> tuple[str, tuple[str, ...]]:
    """(name, entity types) of user ``index``: profile ``index % 5``, named ``<profile>-<index // 5>``."""
    name = list(PROFILES)[index % len(PROFILES)]
    return f"{name}-{index // len(PROFILES)}", PROFILES[name]


def user_view(tags: Sequence[str], profile: Sequence[str]) -> tuple[str, ...]:
    """The tags a user with ``profile`` would write: tags of other types (B- and I-) become "O"."""
    return tuple(t if t == "O" or t[2:] in profile else "O" for t in tags)


def assign_users(num_users: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """Corpus indices of each user's tweets: every distinct tweet to exactly one user (seeded skew above).

    Of a tweet that occurs more than once (99 exact repeats, mostly retweets) only the first is dealt out,
    so no tweet is in both a user's train and test split.
    """
    if num_users < 1 or seed < 0:
        raise ConfigError(f"need num_users >= 1 and seed >= 0, got num_users={num_users}, seed={seed}")
    path = ensure("wnut16")
    st = path.stat()
    return _assigned((str(path.resolve()), st.st_mtime_ns, st.st_size), num_users, seed)


@lru_cache(maxsize=8)
def _assigned(source: tuple[Any, ...], num_users: int, seed: int) -> tuple[tuple[int, ...], ...]:
    tweets = _parsed(*source)
    first = np.array(sorted({words: i for i, (words, _) in reversed(list(enumerate(tweets)))}.values()))
    kinds = [{t[2:] for t in tweets[i][1] if t != "O"} for i in first]
    present = np.array([[t in k for t in TAG_TYPES] for k in kinds], dtype=np.float64)
    cares = np.array([[t in user_profile(u)[1] for u in range(num_users)] for t in TAG_TYPES], dtype=float)
    weights = 1.0 + BETA * (present @ cares)  # tweets x users
    cumulative = np.cumsum(weights, axis=1)
    draw = np.random.default_rng([seed, num_users, 16]).random(len(first)) * cumulative[:, -1]
    owner = (cumulative <= draw[:, None]).sum(axis=1)
    return tuple(tuple(first[owner == u].tolist()) for u in range(num_users))


def _hold_out(ids: np.ndarray, flags: np.ndarray, n_hold: int, rng: np.random.Generator) -> tuple[Any, Any]:
    """(kept, held): ``n_hold`` of ``ids`` held out, stratified by ``flags`` (has an entity).

    The held part gets its proportional share of flagged ids, and at least one when two or more exist.
    """
    ent, rest = ids[flags], ids[~flags]
    k = round(n_hold * len(ent) / len(ids))
    k = min(k, len(ent) - 1) if len(ent) >= 2 else min(k, len(ent))
    k = max(k, 1 if len(ent) >= 2 else 0, n_hold - len(rest))
    k = min(k, n_hold, len(ent))
    held = np.concatenate([ent[:k], rest[: n_hold - k]])
    kept = np.concatenate([ent[k:], rest[n_hold - k :]])
    return rng.permutation(kept), rng.permutation(held)


def load_tagged_client(task: TaskConfig, partition_id: int, num_partitions: int) -> TaggedData:
    """User ``partition_id`` of ``num_partitions``: their tweets in their label view, split train/test."""
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition_id {partition_id} must be in [0, num_partitions={num_partitions})")
    if task.seed < 0:
        raise ConfigError(f"task.seed must be a non-negative integer, got {task.seed}")
    tweets = corpus()
    own = np.array(assign_users(num_partitions, task.seed)[partition_id], dtype=np.int64)
    user, profile = user_profile(partition_id)
    view = {int(i): user_view(tweets[i][1], profile) for i in own}
    want = task.train_size + task.test_size
    n_test = task.test_size if len(own) >= want else max(1, round(len(own) * task.test_size / want))
    n_train = min(len(own), want) - n_test
    if n_train < 2:
        raise DataError(
            f"client {partition_id} ({user}) got {len(own)} tweets of {len(tweets)}: too few for 2 training "
            f"tweets and a test split; use fewer clients than {num_partitions}"
        )
    rng = np.random.default_rng([task.seed, num_partitions, partition_id, 16])
    ids = rng.permutation(own)

    def flags(x: np.ndarray) -> np.ndarray:
        return np.array([any(t != "O" for t in view[int(i)]) for i in x], dtype=bool)

    if len(ids) > want:
        ids = _hold_out(ids, flags(ids), want, rng)[1]
    train, test = _hold_out(ids, flags(ids), n_test, rng)
    if task.evaluate_on == "validation":  # tuning: held-out train tweets, never the test ones
        n_val = max(1, round(n_train * task.validation_fraction))
        if n_train - n_val < 2:
            raise DataError(
                f"client {partition_id} ({user}) has {n_train} training tweets: too few to hold out a "
                f"validation split of {task.validation_fraction:.0%} and keep 2 for training"
            )
        train, test = _hold_out(train, flags(train), n_val, rng)
    clean = _scrubber(task)
    return TaggedData(
        tuple(clean(tweets[i][0]) for i in train),
        tuple(tuple(_TAG_ID[t] for t in view[int(i)]) for i in train),
        tuple(clean(tweets[i][0]) for i in test),
        tuple(tuple(_TAG_ID[t] for t in view[int(i)]) for i in test),
        TAG_NAMES,
        user,
        profile,
    )


def _scrubber(task: TaskConfig) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    """Word-by-word PII scrub (keeps one word per tag); the identity when ``task.pii-scrub`` is off."""
    if not task.pii_scrub:
        return lambda words: words
    extra = parse_patterns(task.pii_patterns)
    return lambda words: tuple(scrub(w, extra) or w for w in words)


def majority_tags(
    train_words: Sequence[Sequence[str]],
    train_tags: Sequence[Sequence[int]],
    tag_names: Sequence[str] = TAG_NAMES,
) -> Callable[[Sequence[str]], list[int]]:
    """A tagger giving each word (lowercased) its most frequent train tag (ties: lowest id; unseen: "O").

    A predicted ``I-x`` that does not continue an ``x`` span is turned into ``B-x``, so spans are valid.
    """
    seen: defaultdict[str, Counter[int]] = defaultdict(Counter)
    for words, tags in zip(train_words, train_tags, strict=True):
        for word, tag_id in zip(words, tags, strict=True):
            seen[word.lower()][tag_id] += 1
    best = {w: min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] for w, counts in seen.items()}
    outside = tag_names.index("O")
    begin = {n: tag_names.index(f"B-{n[2:]}") for n in tag_names if n.startswith("I-")}

    def tagger(words: Sequence[str]) -> list[int]:
        out = [best.get(w.lower(), outside) for w in words]
        for i, t in enumerate(out):
            name = tag_names[t]
            if name.startswith("I-") and (i == 0 or tag_names[out[i - 1]][2:] != name[2:]):
                out[i] = begin[name]
        return out

    return tagger


def baseline_f1(data: TaggedData) -> float:
    """Entity F1 on the user's test split of the own-majority-tag baseline (micro over its sentences)."""
    if not data.train_words or not data.test_words:
        raise DataError(f"{data.user}: the majority-tag baseline needs train and test sentences")
    tagger = majority_tags(data.train_words, data.train_tags, data.tag_names)
    names = data.tag_names
    gold = [[names[t] for t in tags] for tags in data.test_tags]
    pred = [[names[t] for t in tagger(words)] for words in data.test_words]
    return f1(*entity_counts(gold, pred))


def corpus_stats(num_users: int, seed: int) -> list[dict[str, Any]]:
    """Per user: name, profile, tweets, tweets with an in-profile entity, in-profile entities."""
    tweets = corpus()
    rows = []
    for u, own in enumerate(assign_users(num_users, seed)):
        user, profile = user_profile(u)
        found = [len(spans(user_view(tweets[i][1], profile))) for i in own]
        rows.append(
            {
                "user": user,
                "profile": "+".join(profile),
                "tweets": len(own),
                "entity_tweets": sum(n > 0 for n in found),
                "entities": sum(found),
            }
        )
    return rows
