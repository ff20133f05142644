"""Names of records and metric keys exchanged between server and clients (one place)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Config keys sent by the server.
SERVER_ROUND = "server-round"
FINAL_ROUND = "final-round"
SHARED_NAMES = "shared-names"  # SecAgg+ FitIns: the order of the tensors in the legacy Parameters list

# Metric keys sent back by clients (scalars only).
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
LOSS = "train-loss"
ACC_BEFORE = "acc-before"
ACC_AFTER = "acc-after"
EVAL_ACC = "eval-acc"
EVAL_LOSS = "eval-loss"
PERPLEXITY = "perplexity"  # causal LM: exp(mean next-token loss) on the user's test split
PPL_BEFORE = "perplexity-before"  # causal LM: the same, before this round's local training
EPSILON = "epsilon"
DELTA = "delta"
SIGMA = "sigma"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
TOTAL_STEPS = "total-steps"
MAJORITY_ACC = "majority-acc"
BYTES_UP = "bytes-up"
TRAIN_SECONDS = "train-seconds"
UPDATE_NORM = "update-norm"

PRIVACY_KEYS = (EPSILON, DELTA, SIGMA, SAMPLE_RATE, STEPS, TOTAL_STEPS)
ENTITY_F1 = "entity-f1"  # tagger: exact-span entity F1 on the user's test split (in the user's label view)
MAJORITY_F1 = "majority-f1"  # tagger: the same for each word's most frequent tag in the user's train split


@dataclass(frozen=True)
class Score:
    """A task's headline per-user score, as every report, progress line and comparison names and reads it.

    ``metric``: the client metric key (also the ``clients.csv`` column, and ``<metric>-mean`` in round
    lines); ``row``: its key in the client rows of a sequential run's ``summary.json``.
    """

    name: str
    metric: str
    row: str
    lower_is_better: bool = False


# The first one a run has data for is its headline: a causal LM's perplexity, a tagger's entity F1, else
# a classifier's accuracy (the fallback: every task reports an accuracy).
SCORES = (
    Score("perplexity", PERPLEXITY, "ppl", lower_is_better=True),
    Score("entity F1", ENTITY_F1, "f1"),
    Score("accuracy", EVAL_ACC, "acc"),
)


def headline(has: Callable[[Score], bool]) -> Score:
    """The headline score: the first of ``SCORES`` that ``has`` finds data for, else accuracy."""
    return next((s for s in SCORES if has(s)), SCORES[-1])
