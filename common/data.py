"""Per-client text classification data: tweets (Dirichlet label skew), news (per-user interests), file.

Every client gets its own train and test split drawn from the same (its own) distribution. For hundreds
of users, ``task.partitioner = "fixed-size"`` gives each exactly train-size + test-size examples of its own,
and ``task.news-holdout`` keeps every news test article out of all users' training data. Everything is
seeded by ``task.seed`` and the partition id, so the same configuration gives the same split in every
process. Loaded corpora and partitionings are cached per process (many clients load in one process).
Exact duplicate texts are dropped from the bundled corpora (tweets, news) so train and test never share one.
A single-class shard is allowed: it trains, and its majority baseline is then 1.0.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from common.assets import ensure
from common.config import TEXT_DATASETS, TaskConfig
from common.datafile import Table, read_file
from common.errors import ConfigError, DataError
from common.pii import parse_patterns, scrub
from common.users import select_users

TWEET_LABELS = ("negative", "neutral", "positive")
NEWS_LABELS = ("not-liked", "liked")
NEWS_BODY_CHARS = 600


@dataclasses.dataclass(frozen=True)
class ClientData:
    """One client's train and test split (labels are read-only int64 arrays; none for free text)."""

    train_texts: tuple[str, ...]
    train_labels: np.ndarray
    test_texts: tuple[str, ...]
    test_labels: np.ndarray
    label_names: tuple[str, ...]
    user: str
    train_prompts: tuple[str, ...] = ()  # causal LM chat turns: the user turn each text replies to
    test_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            prompts, texts = getattr(self, f"{split}_prompts"), getattr(self, f"{split}_texts")
            if prompts and len(prompts) != len(texts):
                raise DataError(f"{self.user}: {len(prompts)} {split} prompts for {len(texts)} texts")
        for split in ("train", "test"):
            labels = np.array(getattr(self, f"{split}_labels"), dtype=np.int64).reshape(-1)
            labels.flags.writeable = False
            object.__setattr__(self, f"{split}_labels", labels)
            if not self.label_names and not labels.size:  # free text: the targets are the text itself
                continue
            if len(labels) != len(getattr(self, f"{split}_texts")):
                raise DataError(f"{self.user}: {split} texts and labels differ in length")
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
                raise DataError(f"{self.user}: {split} labels outside 0..{len(self.label_names) - 1}")


def label_names(task: TaskConfig) -> tuple[str, ...]:
    """The class names of ``task.dataset`` (read from ``task.labels`` for "file"), without loading data.

    Free text (shakespeare, text-file) has none: its targets are the text itself.
    """
    if task.dataset in TEXT_DATASETS:
        return ()
    if task.dataset == "tweets":
        return TWEET_LABELS
    if task.dataset == "news":
        return NEWS_LABELS
    if task.dataset != "file":
        raise ConfigError(f"unknown task.dataset {task.dataset!r}; allowed: tweets, news, file")
    # TaskConfig has checked that task.labels lists distinct names for "file"
    return tuple(n.strip() for n in task.labels.split(",") if n.strip())


def load_client_data(
    task: TaskConfig, partition_id: int, num_partitions: int, data_path: str | None = None
) -> ClientData:
    """Load client ``partition_id`` of ``num_partitions`` (``data_path`` overrides ``task.data_path``)."""
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition_id {partition_id} must be in [0, num_partitions={num_partitions})")
    if task.seed < 0:
        raise ConfigError(f"task.seed must be a non-negative integer, got {task.seed}")
    names = label_names(task)
    if task.dataset == "news":
        return _news_client(task, partition_id)
    if task.dataset == "shakespeare":
        return _shakespeare_client(task, partition_id)
    if task.dataset == "text-file":
        return _text_file_client(task, partition_id, data_path)
    if task.dataset == "tweets":
        source: tuple[Any, ...] = ("tweets", str(ensure("tweets")))
    else:
        source = _file_source(task, data_path, names)
    texts, labels, users = _load_source(source)
    where = source[1]
    if users is None and (task.min_examples or task.max_users):
        raise ConfigError(
            f"task.min-examples / task.max-users select users, but {where} has no user column "
            "(add one, or set both to 0)"
        )
    if users is not None and task.partitioner != "dirichlet":
        raise ConfigError(
            f"task.partitioner = {task.partitioner!r} splits a corpus without users, but {where} has a user "
            "column (each user is one client): leave task.partitioner = 'dirichlet'"
        )
    if users is not None:
        user, rows = _user_rows(users, partition_id, where, task)
        shard = np.array(rows, dtype=np.int64)
    else:
        user = f"client-{partition_id}"
        if task.partitioner == "fixed-size":
            want = task.train_size + task.test_size
            shard = _fixed_size(source, num_partitions, want, task.dirichlet_alpha, task.seed)[partition_id]
        else:
            shard = _dirichlet(source, num_partitions, task.dirichlet_alpha, task.seed)[partition_id]
    return _split(texts, labels, shard, task, partition_id, names, user, where)


def file_users(task: TaskConfig, data_path: str | None = None) -> tuple[str, ...] | None:
    """The user column (one entry a row) of a "file" / "text-file" data file; None without one.

    Reads the file as the clients do (cached per process), so every data error surfaces here.
    """
    if task.dataset == "text-file":
        path = _data_file(task, data_path)
        st = path.stat()
        return tuple(_text_source(str(path.resolve()), st.st_mtime_ns, st.st_size)[1])
    if task.dataset == "file":
        users = _load_source(_file_source(task, data_path, label_names(task)))[2]
        return None if users is None else tuple(users)
    return None


def _file_source(task: TaskConfig, data_path: str | None, names: tuple[str, ...]) -> tuple[Any, ...]:
    """The cache key of a labelled data file: its path, modification time, size and label names."""
    path = _data_file(task, data_path)
    st = path.stat()
    return ("file", str(path.resolve()), st.st_mtime_ns, st.st_size, names)


@lru_cache(maxsize=4)
def _roles(root: str, min_speeches: int) -> tuple[Any, ...]:
    from common.shakespeare import load_roles

    return tuple(load_roles(root, min_speeches))


def _shakespeare_client(task: TaskConfig, partition_id: int) -> ClientData:
    """User ``partition_id``: the play × speaker with the (partition_id+1)-th most speeches."""
    from common.shakespeare import split_indices

    roles = _roles(str(ensure("shakespeare")), task.min_speeches)
    if partition_id >= len(roles):
        raise DataError(
            f"client {partition_id}: only {len(roles)} roles have >= {task.min_speeches} speeches "
            "(lower task.min-speeches or use fewer clients)"
        )
    role = roles[partition_id]
    train, test = split_indices(role, task.test_size / (task.train_size + task.test_size), task.seed)
    return _text_client(task, role.user, role.speeches, role.cues, train, test)


def _text_file_client(task: TaskConfig, partition_id: int, data_path: str | None) -> ClientData:
    """User ``partition_id`` (common.users' order) of a free-text file: their texts, split train/test."""
    from common.shakespeare import seeded_split

    path = _data_file(task, data_path)
    st = path.stat()
    texts, users, prompts = _text_source(str(path.resolve()), st.st_mtime_ns, st.st_size)
    if task.lm_format == "chat" and prompts is None:
        raise DataError(
            f"{path} has no prompt column: task.lm-format = 'chat' trains each text as the reply to its "
            "prompt (add a prompt field, or use task.lm-format = 'text')"
        )
    user, rows = _user_rows(users, partition_id, str(path), task)
    if len(rows) < 2:
        raise DataError(
            f"user {user!r} has {len(rows)} text(s) in {path}: need 2 to split train/test "
            "(task.min-examples = 2 leaves such users out)"
        )
    own = tuple(texts[i] for i in rows)
    cues = tuple(prompts[i] for i in rows) if prompts is not None else ()
    fraction = task.test_size / (task.train_size + task.test_size)
    train, test = seeded_split(len(own), fraction, f"{task.seed}/{user}")
    return _text_client(task, user, own, cues, train, test)


def _user_rows(
    users: Sequence[str], partition_id: int, where: str, task: TaskConfig
) -> tuple[str, list[int]]:
    """(user, their row indices) of client ``partition_id``: the kept users in common.users' order."""
    kept = select_users(users, task).kept
    if partition_id >= len(kept):
        raise DataError(
            f"client {partition_id} has no user in {where}: the file has {len(set(users))} users, "
            f"{len(kept)} kept by task.min-examples = {task.min_examples} and task.max-users = "
            f"{task.max_users} (partition ids 0..{len(kept) - 1})"
        )
    user = kept[partition_id]
    return user, [i for i, u in enumerate(users) if u == user]


@lru_cache(maxsize=2)
def _text_source(path: str, mtime_ns: int, size: int) -> tuple[Any, ...]:
    from common.datafile import read_text_file

    return read_text_file(Path(path))


def _text_client(
    task: TaskConfig,
    user: str,
    texts: Sequence[str],
    cues: Sequence[str],
    train: list[int],
    test: list[int],
) -> ClientData:
    """A causal-LM user: train/test texts (capped by the task sizes), the validation tail, cues if chat."""
    train, test = train[: task.train_size], test[: task.test_size]
    if task.evaluate_on == "validation":  # tuning: the tail of the train texts, never the test ones
        n_val = max(1, round(len(train) * task.validation_fraction))
        if len(train) - n_val < 2:
            raise DataError(f"{user}: {len(train)} training texts are too few for a validation split")
        train, test = train[:-n_val], train[-n_val:]
    clean = _scrubber(task)
    split = {"train": train, "test": test}
    out = {name: tuple(clean(texts[i]) for i in idx) for name, idx in split.items()}
    prompts: dict[str, tuple[str, ...]] = {"train": (), "test": ()}
    if task.lm_format == "chat":  # each text answers its cue (Shakespeare: the speech before it)
        prompts = {name: tuple(clean(cues[i]) for i in idx) for name, idx in split.items()}
    return ClientData(
        out["train"],
        np.zeros(0),
        out["test"],
        np.zeros(0),
        (),
        user,
        train_prompts=prompts["train"],
        test_prompts=prompts["test"],
    )


def _data_file(task: TaskConfig, data_path: str | None) -> Path:
    raw_path = (data_path or task.data_path).strip()
    if not raw_path:  # not a config rule: a device may bring its own file (fedpers agent --data)
        raise ConfigError(f"task.data-path must name a CSV or JSONL file for task.dataset = {task.dataset!r}")
    path = Path(raw_path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (task.data-path)")
    return path


def _scrubber(task: TaskConfig) -> Callable[[str], str]:
    """The PII scrubber ``task`` asks for (the identity when ``task.pii-scrub`` is off)."""
    if not task.pii_scrub:
        return lambda text: text
    extra = parse_patterns(task.pii_patterns)
    return lambda text: scrub(text, extra)


def majority_baseline_accuracy(data: ClientData) -> float:
    """Test accuracy of always predicting the client's own majority train label (ties: lowest index)."""
    if len(data.test_labels) == 0 or len(data.train_labels) == 0:
        raise DataError(f"{data.user}: the majority baseline needs train and test examples")
    majority = int(np.bincount(data.train_labels, minlength=len(data.label_names)).argmax())
    return float(np.mean(data.test_labels == majority))


def _split(
    texts: tuple[str, ...],
    labels: np.ndarray,
    shard: np.ndarray,
    task: TaskConfig,
    partition_id: int,
    names: tuple[str, ...],
    user: str,
    where: str,
) -> ClientData:
    """Seeded draw of up to train_size + test_size examples from the shard, split train/test."""
    if len(shard) == 0:
        raise DataError(f"client {partition_id} has no examples in {where}")
    rng = np.random.default_rng([task.seed, partition_id])
    picked = shard[rng.permutation(len(shard))]
    want = task.train_size + task.test_size
    if len(picked) >= want:
        n_train, n_test = task.train_size, task.test_size
    else:  # too small: split proportionally train_size:test_size, at least one test example
        n_test = max(1, round(len(picked) * task.test_size / want))
        n_train = len(picked) - n_test
    if n_train < 2:
        raise DataError(
            f"client {partition_id} ({user}) has only {len(shard)} examples in {where}: fewer than 2 "
            "training examples after holding out its test split (needs at least 3; with a user column, "
            "task.min-examples = 3 leaves such users out)"
        )
    tr, te = picked[:n_train], picked[n_train : n_train + n_test]
    return _client(texts, labels, tr, te, task, partition_id, names, user)


def _client(
    texts: tuple[str, ...],
    labels: np.ndarray,
    tr: np.ndarray,
    te: np.ndarray,
    task: TaskConfig,
    partition_id: int,
    names: tuple[str, ...],
    user: str,
) -> ClientData:
    """The client of train rows ``tr`` and test rows ``te`` (validation: the tail of ``tr``), scrubbed."""
    n_train = len(tr)
    if task.evaluate_on == "validation":  # tuning: evaluate on held-out train examples, never on test
        n_val = max(1, round(n_train * task.validation_fraction))
        if n_train - n_val < 2:
            raise DataError(
                f"client {partition_id} ({user}) has {n_train} training examples: too few to hold out "
                f"a validation split of {task.validation_fraction:.0%} and keep 2 for training"
            )
        tr, te = tr[: n_train - n_val], tr[n_train - n_val :]
    train_texts, test_texts = tuple(texts[i] for i in tr), tuple(texts[i] for i in te)
    clean = _scrubber(task)  # on the device, before anything is encoded or trained on
    train_texts, test_texts = tuple(map(clean, train_texts)), tuple(map(clean, test_texts))
    return ClientData(train_texts, labels[tr], test_texts, labels[te], names, user)


@lru_cache(maxsize=8)
def _dirichlet(
    source: tuple[Any, ...], num_partitions: int, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    """Indices of every partition under flwr-datasets' Dirichlet label-skew partitioner."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = _load_source(source)[1]
    n, where = len(labels), source[1]
    if n < num_partitions:
        raise DataError(
            f"client {num_partitions - 1} has no examples in {where}: {n} examples cannot be split "
            f"across {num_partitions} clients"
        )
    if n < 3 * num_partitions:
        raise DataError(f"{n} examples in {where} are too few for {num_partitions} clients (3 per client)")
    if num_partitions == 1:
        return (np.arange(n, dtype=np.int64),)
    # Arrow format: columns come back as Arrow arrays (fast), not row by row.
    ds = Dataset.from_dict({"label": labels.tolist(), "idx": list(range(n))}).with_format("arrow")
    preferred = min(10, max(3, n // (2 * num_partitions)))
    error: ValueError | None = None
    for min_size in dict.fromkeys((preferred, 3)):  # fall back to the bare minimum (2 train + 1 test)
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            seed=seed,
            min_partition_size=min_size,
        )
        partitioner.dataset = ds
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return tuple(
                    partitioner.load_partition(p)["idx"].to_numpy().astype(np.int64)
                    for p in range(num_partitions)
                )
        except ValueError as exc:
            error = exc
    raise DataError(
        f"cannot split {where} across {num_partitions} clients with dirichlet_alpha={alpha} so that every "
        f"client gets at least 3 examples: {error} (task.partitioner = 'fixed-size' gives hundreds of "
        "clients a fixed number of examples each; or raise task.dirichlet-alpha or use fewer clients)"
    ) from error


@lru_cache(maxsize=8)
def _fixed_size(
    source: tuple[Any, ...], num_partitions: int, size: int, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    """Exactly ``size`` indices per partition, disjoint across partitions, with Dirichlet label skew.

    User u draws a class mix p_u ~ Dirichlet(alpha · K · prior) (K classes, prior = the corpus' class
    frequencies, so the mean mix is the corpus' and ``alpha`` acts per class as in the flwr partitioner),
    then ``size`` examples by class from the pools left by users 0..u-1 (without replacement). When a
    class runs dry, the rest of u's examples come from p_u renormalised over the classes left.
    """
    labels = _load_source(source)[1]
    n, need = len(labels), num_partitions * size
    if need > n:
        what = f"the corpus {source[1]} has {n:,}" + (" after deduplication" if source[0] == "tweets" else "")
        raise DataError(
            f"{num_partitions} users × {size} examples need {need:,}; {what} (task.partitioner = "
            f"'fixed-size' gives each user its own examples): use at most {n // size} clients or a smaller "
            "task.train-size + task.test-size"
        )
    rng = np.random.default_rng([seed, 31])
    classes = np.flatnonzero(np.bincount(labels))  # absent labels get no pool (Dirichlet needs > 0)
    pools = [rng.permutation(np.flatnonzero(labels == k)) for k in classes]
    sizes = np.array([len(pool) for pool in pools], dtype=np.int64)
    concentration = alpha * len(classes) * sizes / n
    used = np.zeros(len(classes), dtype=np.int64)  # taken from the front of each pool so far
    out = []
    for _ in range(num_partitions):
        mix = rng.dirichlet(concentration)
        take = np.zeros(len(classes), dtype=np.int64)
        while (short := size - int(take.sum())) > 0:  # more than one pass only when a pool runs dry
            room = sizes - used - take
            weights = np.where(room > 0, np.nan_to_num(mix), 0.0)
            if not weights.sum() > 0:  # the mix puts (numerically) nothing on the classes left
                weights = (room > 0).astype(np.float64)
            take += np.minimum(rng.multinomial(short, weights / weights.sum()), room)
        out.append(np.concatenate([pools[k][used[k] : used[k] + take[k]] for k in range(len(classes))]))
        used += take
    return tuple(out)


@lru_cache(maxsize=4)
def _load_source(source: tuple[Any, ...]) -> Table:
    """(texts, int64 labels, users or None) of the tweets corpus or a user file."""
    if source[0] == "tweets":  # exact duplicate tweets are dropped (first kept): no train/test leakage
        with open(source[1], encoding="latin-1", newline="") as fh:
            rows = list(csv.DictReader(fh))
        index = {n: i for i, n in enumerate(TWEET_LABELS)}
        unique: dict[str, int] = {}
        for r in rows:
            text = (r.get("text") or "").strip()
            if text and r.get("sentiment") in index:
                unique.setdefault(text, index[r["sentiment"]])
        return tuple(unique), np.fromiter(unique.values(), dtype=np.int64, count=len(unique)), None
    return read_file(Path(source[1]), source[4])


@lru_cache(maxsize=2)
def _news_corpus(root: str) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
    """(topics, texts, topic index per text) of the BBC corpus: title + start of the body."""
    topics = tuple(sorted(p.name for p in Path(root).iterdir() if p.is_dir()))
    texts: dict[str, int] = {}  # text -> topic; the corpus repeats some articles: keep the first
    for t, topic in enumerate(topics):
        for f in sorted((Path(root) / topic).glob("*.txt")):
            raw = f.read_bytes()
            try:
                content = raw.decode("utf-8")
            except UnicodeDecodeError:
                content = raw.decode("latin-1")
            title, _, body = content.strip().partition("\n")
            body = re.sub(r"\s+", " ", body).strip()
            if len(body) > NEWS_BODY_CHARS:
                body = body[:NEWS_BODY_CHARS].rsplit(" ", 1)[0]
            texts.setdefault(f"{title.strip()}. {body}", t)
    if len(topics) < 2 or not texts:
        raise DataError(f"the news corpus at {root} has no topic folders with articles")
    return topics, tuple(texts), np.fromiter(texts.values(), dtype=np.int64, count=len(texts))


def _news_client(task: TaskConfig, partition_id: int) -> ClientData:
    """User ``partition_id`` likes ``task.topics_liked`` random topics; label = article topic is liked."""
    root = ensure("news")
    topics, texts, topic_ids = _news_corpus(str(root))
    if task.topics_liked >= len(topics):  # the corpus' topic count is a fact of the data, not the config
        raise ConfigError(f"task.topics-liked = {task.topics_liked} must be below the {len(topics)} topics")
    rng = np.random.default_rng([task.seed, partition_id, 7])
    liked = rng.choice(len(topics), size=task.topics_liked, replace=False)
    labels = np.isin(topic_ids, liked).astype(np.int64)
    user = f"client-{partition_id}"
    if task.news_holdout > 0:  # test rows only from the held-out articles, train rows only from the rest
        test_pool, train_pool = _news_holdout(len(texts), task.news_holdout, task.seed)
        tr = rng.choice(train_pool, size=min(len(train_pool), task.train_size), replace=False)
        te = rng.choice(test_pool, size=min(len(test_pool), task.test_size), replace=False)
        return _client(texts, labels, tr, te, task, partition_id, NEWS_LABELS, user)
    shard = rng.choice(len(texts), size=min(len(texts), task.train_size + task.test_size), replace=False)
    return _split(texts, labels, shard, task, partition_id, NEWS_LABELS, user, str(root))


@lru_cache(maxsize=4)
def _news_holdout(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, training) article indices: a seeded ``share`` of the ``n`` articles, the same for all."""
    order = np.random.default_rng([seed, 17]).permutation(n)
    held = min(n - 2, max(1, round(share * n)))  # both pools non-empty, at least 2 articles to train on
    return np.sort(order[:held]), np.sort(order[held:])
