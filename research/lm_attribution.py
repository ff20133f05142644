"""Diagnostic: can a reader tell the users apart from one answer of their assistant?

    python -m research.lm_attribution --run-dir RUN --mode fedper [--cues 5] [--tokens 48]
        [--users N] [--seed 0] [--contrast A] [--hub] [--uncopied] [--threads T] [--json OUT]
    python -m research.lm_attribution --report OUT [--hub] [--uncopied [--run-dir RUN]]
        # read an earlier --json's answers again

``research.lm_context`` measures how well a user's assistant *predicts* the user's real replies. This
one reads what the assistant *says*. For each client state of a finished chat-turn run, the assistant
(what ``fedpers chat`` loads) answers the first ``--cues`` of the user's test cues (the speech before each
test reply, cut as training cuts it) three ways, with the same sampling seed for each cue: with no earlier
turns, with the user's own kept turns (``client.chat-pick``/``client.chat-examples``, as ``fedpers chat``
puts them), and with the next user's kept turns. A stylometric reader that never sees the model then
names the user of each answer: character 3-grams (TF-IDF weighted, cosine) against a profile of each
user's *training* replies, minus the turns the state keeps, so copying a context turn word for word does
not count as that user's style. Chance is one in the number of users. The same reader, given the users'
real test replies (cut to the same number of tokens), shows how far one short text can be told apart at
all: the ceiling. Answers that copy the context are counted too (the share of an answer's word trigrams
found in the turns put before it), and ``--uncopied`` reads each answer without those words.

Nothing is trained; the test split is only read. Sampling is seeded, so a rerun prints the same table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.generate import ChatTurns, kept_turns, load_chat, stream
from client.state import StateStore
from common.chat_format import Example, cue_tail
from common.config import Config
from common.data import ClientData, load_client_data
from common.errors import DataError, FedpersError, StateError
from research.lm_style import client_dirs

CONDITIONS = ("none", "own", "other")


def char_grams(text: str, n: int = 3) -> Counter[str]:
    """Character ``n``-grams of ``text``, lower-cased, whitespace runs as one space, padded by spaces."""
    s = " " + " ".join(text.lower().split()) + " "
    return Counter(s[i : i + n] for i in range(len(s) - n + 1))


def word_trigrams(text: str) -> set[tuple[str, ...]]:
    """The lower-cased word trigrams of ``text`` (punctuation stays on its word)."""
    w = text.lower().split()
    return {tuple(w[i : i + 3]) for i in range(len(w) - 2)}


def _turn_trigrams(turns: Sequence[Example]) -> set[tuple[str, ...]]:
    return set().union(*(word_trigrams(cue) | word_trigrams(reply) for cue, reply in turns), set())


def copied_share(answer: str, turns: Sequence[Example]) -> float:
    """The share of the answer's word trigrams that occur in the turns before it (0 when it has none)."""
    grams = word_trigrams(answer)
    if not grams:
        return 0.0
    return len(grams & _turn_trigrams(turns)) / len(grams)


def strip_copied(answer: str, turns: Sequence[Example]) -> str:
    """``answer`` without every word of a word trigram found in the turns: what is left is not quotation."""
    words, seen = answer.split(), _turn_trigrams(turns)
    lower = [w.lower() for w in words]
    drop: set[int] = set()
    for i in range(len(words) - 2):
        if tuple(lower[i : i + 3]) in seen:
            drop.update((i, i + 1, i + 2))
    return " ".join(w for i, w in enumerate(words) if i not in drop)


class Reader:
    """Names the author of a text among known users by character n-grams (TF-IDF, cosine).

    Each user's profile is the n-gram counts of their texts; a gram's weight is ``(1 + log count) * idf``
    with ``idf = log(users / users whose texts have it) + 1``, so grams every user writes weigh little.
    """

    def __init__(self, corpora: Mapping[str, Sequence[str]], n: int = 3) -> None:
        if len(corpora) < 2:
            raise DataError(f"a reader needs at least two users to tell apart, got {len(corpora)}")
        empty = [u for u, texts in corpora.items() if not any(t.strip() for t in texts)]
        if empty:
            raise DataError(f"no text to profile for {', '.join(empty)}")
        if n < 1:
            raise DataError(f"n-grams need n >= 1, got {n}")
        self.n, self.users = n, list(corpora)
        counts = [sum((char_grams(t, n) for t in corpora[u]), Counter()) for u in self.users]
        self.vocab = {g: i for i, g in enumerate(sorted(set().union(*counts)))}
        df = Counter(g for c in counts for g in c)
        self.idf = np.array([math.log(len(counts) / df[g]) + 1.0 for g in self.vocab])
        self.profiles = np.stack([self._vector(c) for c in counts])

    def _vector(self, counts: Counter[str]) -> np.ndarray:
        v = np.zeros(len(self.vocab))
        for g, c in counts.items():
            if g in self.vocab:
                v[self.vocab[g]] = 1.0 + math.log(c)
        v *= self.idf
        norm = np.linalg.norm(v)
        return v / norm if norm else v

    def scores(self, text: str) -> np.ndarray:
        """Cosine similarity of ``text`` to each user's profile, in ``self.users`` order."""
        return self.profiles @ self._vector(char_grams(text, self.n))

    def ranking(self, text: str) -> list[str]:
        """The users, most likely author first (ties: the earlier user)."""
        return self._order(self.scores(text))

    def rankings(self, texts: Sequence[str], hub: bool = False) -> list[list[str]]:
        """:meth:`ranking` of each text; with ``hub``, each user's scores standardised over ``texts`` first.

        The hubness correction: a profile that is close to every text (generic diction, say) is named
        for many texts whoever wrote them. Subtracting each user's mean score over the texts read and
        dividing by its spread asks instead which user this text is *unusually* close to. It needs a set
        of texts whose authors are spread over the users (every user's answers to the same number of
        cues), and never looks at who wrote which.
        """
        if not texts:
            return []
        s = np.stack([self.scores(t) for t in texts])
        if hub:
            spread = s.std(axis=0)
            s = (s - s.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
        return [self._order(row) for row in s]

    def _order(self, s: np.ndarray) -> list[str]:
        return [self.users[i] for i in sorted(range(len(s)), key=lambda i: (-s[i], i))]


def _cut(tokenizer: Any, text: str, tokens: int) -> str:
    """The first ``tokens`` tokens of ``text``, decoded as common.chat_format.pick_examples decodes them."""
    return str(tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]))


def _play(user: str) -> str:
    return user.split("/", 1)[0]


def _chat_states(clients_dir: Path, users: int = 0) -> tuple[list[Path], list[Config], list[ChatTurns]]:
    """The first ``users`` (0: all) client states of a chat-turn run: folders, configurations, kept turns."""
    dirs = client_dirs(clients_dir)
    if len(dirs) < 2:
        raise StateError(f"{clients_dir} needs at least two client states (one to borrow turns from)")
    dirs = dirs[:users] if users else dirs
    if len(dirs) < 2:
        raise StateError("--users must keep at least two users")
    states = [StateStore(p).load() for p in dirs]
    if any(s is None or "config" not in s.meta for s in states):
        raise StateError(f"a state in {clients_dir} holds no model yet")
    cfgs = [Config.from_run_config(s.meta["config"]) for s in states]  # type: ignore[union-attr]
    if cfgs[0].task.lm_format != "chat":
        raise StateError(f"{clients_dir} was trained on raw text (task.lm-format = 'text'): no turns")
    turns = [kept_turns(c, s.examples) for c, s in zip(cfgs, states, strict=True)]  # type: ignore[union-attr]
    if not all(t.kept for t in turns):
        raise StateError(f"the states in {clients_dir} keep no turns (client.chat-examples = 0)")
    return dirs, cfgs, turns


def generate_answers(
    clients_dir: Path,
    cues: int,
    tokens: int,
    seed: int,
    users: int = 0,
    temperature: float = 0.7,
    contrast: float = 0.0,
) -> dict[str, Any]:
    """Every user's answers to their first ``cues`` test cues with no, own and another user's turns.

    ``contrast`` is ``stream``'s context-aware decoding for the answers with turns (own and other).

    Returns the users, each user's profile texts (training replies minus kept turns), real test replies
    (cut to ``tokens`` tokens) and, per user, one record per cue with the three answers and the turns'
    owners.
    """
    dirs, cfgs, turns = _chat_states(clients_dir, users)
    total = max(int(p.name.removeprefix("client-")) for p in clients_dir.glob("client-*")) + 1
    data: list[ClientData] = [
        load_client_data(cfgs[0].task, int(p.name.removeprefix("client-")), total) for p in dirs
    ]
    if min(len(d.test_prompts) for d in data) < cues:
        raise DataError(f"a user has fewer than {cues} test cues")
    out: dict[str, Any] = {
        "users": [d.user for d in data],
        "contrast": contrast,
        "profiles": {},
        "real": {},
        "answers": {},
    }
    for i, (state_dir, d) in enumerate(zip(dirs, data, strict=True)):
        backbone, model, own = load_chat(state_dir, device="cpu")
        tok, n = backbone.tokenizer, cfgs[i].task.max_length
        other = (i + 1) % len(dirs)
        kept_replies = {reply for _, reply in own.kept}
        out["profiles"][d.user] = [t for t in d.train_texts if _cut(tok, t, n) not in kept_replies]
        out["real"][d.user] = [_cut(tok, t, tokens) for t in d.test_texts[:cues]]
        records = []
        for j in range(cues):
            message = cue_tail(tok, d.test_prompts[j], n)
            contexts = {
                "none": [],
                "own": own.for_message(message),
                "other": turns[other].for_message(message),
            }
            record: dict[str, Any] = {"cue": message, "turns-of": data[other].user}
            for name in CONDITIONS:
                pieces = stream(
                    backbone,
                    model,
                    message,
                    max_new_tokens=tokens,
                    temperature=temperature,
                    seed=seed + j,
                    examples=contexts[name],
                    contrast=contrast if contexts[name] else 0.0,
                )
                record[name] = "".join(pieces).strip()
                record[f"{name}-copied"] = copied_share(record[name], contexts[name])
                record[f"{name}-uncopied"] = strip_copied(record[name], contexts[name])
            records.append(record)
        out["answers"][d.user] = records
        print(f"  {i + 1}/{len(dirs)} {d.user}: {cues} cues answered 3 ways", flush=True)
    return out


def add_uncopied(generated: dict[str, Any], clients_dir: Path) -> None:
    """Give answers stored without ``<condition>-uncopied`` (:func:`strip_copied`) that field, in place.

    The turns come again from the run's states (``clients_dir``); each answer's stored copied share must
    come out the same from them, or the states are not the ones that answered.
    """
    users = generated["users"]
    _, _, turns = _chat_states(clients_dir, len(users))
    for i, user in enumerate(users):
        for record in generated["answers"][user]:
            contexts = {
                "none": [],
                "own": turns[i].for_message(record["cue"]),
                "other": turns[(i + 1) % len(users)].for_message(record["cue"]),
            }
            for name in CONDITIONS:
                if not math.isclose(copied_share(record[name], contexts[name]), record[f"{name}-copied"]):
                    raise StateError(f"the states in {clients_dir} did not give {user}'s stored answers")
                record[f"{name}-uncopied"] = strip_copied(record[name], contexts[name])


def attribute(
    generated: Mapping[str, Any], n: int = 3, hub: bool = False, uncopied: bool = False
) -> dict[str, Any]:
    """How often the reader names the right user (and play) for real replies and for each condition.

    ``hub`` applies :meth:`Reader.rankings`' hubness correction, over each set of texts on its own (the
    real replies; each condition's answers). ``uncopied`` reads each answer without the words it copied
    from the turns before it (:func:`strip_copied`), so what is named is not quotation.
    """
    reader = Reader(generated["profiles"], n)
    users = generated["users"]

    def tally(pairs: list[tuple[str, str]], ranks: list[list[str]] | None = None) -> dict[str, Any]:
        ranks = ranks or reader.rankings([text for text, _ in pairs], hub)
        truth = [u for _, u in pairs]
        return {
            "texts": len(pairs),
            "top1": sum(r[0] == u for r, u in zip(ranks, truth, strict=True)) / len(pairs),
            "play": sum(_play(r[0]) == _play(u) for r, u in zip(ranks, truth, strict=True)) / len(pairs),
            "mean-rank": statistics.fmean(r.index(u) + 1 for r, u in zip(ranks, truth, strict=True)),
        }

    real = [(t, u) for u in users for t in generated["real"][u]]
    plays = Counter(_play(u) for u in users)
    summary: dict[str, Any] = {
        "users": len(users),
        "chance": 1 / len(users),
        "chance-play": sum(plays[_play(u)] for u in users) / len(users) ** 2,
        "contrast": generated.get("contrast", 0.0),
        "reader": "hub-corrected" if hub else "plain",
        "answers-read": "uncopied" if uncopied else "whole",
        "real": tally(real),
    }
    records = [(r, u) for u in users for r in generated["answers"][u]]
    ranks: dict[str, list[int]] = {}  # per condition: the true user's rank (0 = first) of each answer
    for name in CONDITIONS:
        key = f"{name}-uncopied" if uncopied else name
        if any(key not in r for r, _ in records):
            raise DataError(
                "these answers were stored without their uncopied text: give the run's --run-dir "
                "(and --mode) with --report to read the turns from its states"
            )
        texts = [r[key] for r, _ in records]
        ranked = reader.rankings(texts, hub)  # each answer read once
        ranks[name] = [order.index(u) for order, (_, u) in zip(ranked, records, strict=True)]
        row = tally([(t, u) for t, (_, u) in zip(texts, records, strict=True)], ranked)
        row["copied"] = statistics.fmean(r[f"{name}-copied"] for r, _ in records)
        row["words"] = statistics.fmean(len(t.split()) for t in texts)
        row["empty"] = sum(not t.strip() for t in texts)
        if name == "other":  # named as the user whose turns it was given?
            owners = [(t, r["turns-of"]) for t, (r, _) in zip(texts, records, strict=True)]
            row["turn-owner"] = tally(owners, ranked)["top1"]
        row["most-named"] = Counter(order[0] for order in ranked).most_common(2)
        summary[name] = row
    summary["paired"] = {
        f"own-vs-{name}": paired_ranks(ranks["own"], ranks[name]) for name in ("other", "none")
    }
    return summary


def sign_test(better: int, worse: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven from a fair coin (no ties)."""
    n, k = better + worse, min(better, worse)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_ranks(first: Sequence[int], second: Sequence[int]) -> dict[str, Any]:
    """Per text, whether the true user ranks higher (a smaller rank) in ``first`` than in ``second``."""
    if len(first) != len(second):
        raise DataError(f"paired ranks need as many texts on each side, got {len(first)} and {len(second)}")
    better = sum(a < b for a, b in zip(first, second, strict=True))
    worse = sum(a > b for a, b in zip(first, second, strict=True))
    ties = len(first) - better - worse
    return {"better": better, "worse": worse, "ties": ties, "p": sign_test(better, worse)}


def table(summary: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`attribute`'s summary."""
    head = f"{summary['users']} users; chance of naming the right one: {summary['chance']:.1%}"
    head += f", the right play: {summary['chance-play']:.1%}." if "chance-play" in summary else "."
    if summary.get("contrast"):
        head += f" Answers with turns: contrast {summary['contrast']:g}."
    if summary.get("reader") == "hub-corrected":
        head += " Reader: hub-corrected (each user's scores standardised over the texts read)."
    if summary.get("answers-read") == "uncopied":
        empty = sum(summary[name].get("empty", 0) for name in CONDITIONS)
        head += (
            " Answers read without their copied words (every word of a word trigram found in the turns"
            " before it; words: those left" + (f"; {empty} left empty)." if empty else ").")
        )
    lines = [
        head,
        "",
        "| texts | n | named the right user | right play | mean rank of the user | words "
        "| copied from the turns |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "real": "the users' real test replies (ceiling)",
        "none": "answers, no turns",
        "own": "answers, own turns",
        "other": "answers, the next user's turns",
    }
    for key, label in labels.items():
        row = summary[key]
        extra = f" (named as the turns' owner: {row['turn-owner']:.0%})" if "turn-owner" in row else ""
        words = f"{row['words']:.1f}" if "words" in row else "–"
        copied = f"{row['copied']:.0%}" if "copied" in row else "–"
        lines.append(
            f"| {label} | {row['texts']} | {row['top1']:.0%}{extra} | {row['play']:.0%} "
            f"| {row['mean-rank']:.1f} | {words} | {copied} |"
        )
    for key, other in (("own-vs-other", "the next user's turns"), ("own-vs-none", "no turns")):
        pair = summary.get("paired", {}).get(key)
        if pair:
            lines.append(
                f"\nSame cue and seed, own turns against {other}: the right user ranks higher for "
                f"{pair['better']}, lower for {pair['worse']} "
                f"(ties {pair['ties']}; sign test p = {pair['p']:.3f})."
            )
    for key in ("none", "own"):
        named = summary[key].get("most-named")
        if named:
            names = ", ".join(f"{u} {c / summary[key]['texts']:.0%}" for u, c in named)
            which = "no" if key == "none" else "own"
            lines.append(f"\nMost named for the answers with {which} turns: {names}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Generate the answers, name their users and print the table (optionally keep everything as JSON)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, help="a finished chat-turn simulation folder")
    ap.add_argument("--report", type=Path, help="print the table of an earlier --json file and stop")
    ap.add_argument("--mode", default="fedper", help="which mode's client states (default fedper)")
    ap.add_argument("--cues", type=int, default=5, help="test cues answered per user (default 5)")
    ap.add_argument("--tokens", type=int, default=48, help="longest answer, in tokens (default 48)")
    ap.add_argument("--users", type=int, default=0, help="only the first N users (default all)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the first cue (default 0)")
    ap.add_argument(
        "--contrast", type=float, default=0.0, help="context-aware decoding of answers with turns (default 0)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--json", type=Path, help="also write the answers and the summary here")
    ap.add_argument(
        "--hub", action="store_true", help="the reader's hubness correction (see Reader.rankings)"
    )
    ap.add_argument(
        "--uncopied",
        action="store_true",
        help="read each answer without the words it copied from its turns (see strip_copied); with "
        "--report on answers stored before that text was kept, also give --run-dir to read the turns",
    )
    args = ap.parse_args(argv)
    if args.report:
        # read again: same reader, same table (or the hub-corrected reader's, with --hub)
        generated = json.loads(args.report.read_text())
        try:
            if args.uncopied and args.run_dir is not None:
                add_uncopied(generated, args.run_dir / args.mode / "clients")
            print(table(attribute(generated, hub=args.hub, uncopied=args.uncopied)))
        except FedpersError as exc:
            raise SystemExit(f"error: {exc}") from exc
        return
    if args.run_dir is None:
        raise SystemExit("error: give --run-dir (or --report)")
    if args.cues < 1 or args.tokens < 1 or args.users < 0 or args.threads < 1 or not args.contrast >= 0:
        raise SystemExit("error: --cues, --tokens and --threads must be >= 1, --users and --contrast >= 0")
    clients = args.run_dir / args.mode / "clients"
    if not clients.is_dir():
        raise SystemExit(f"error: {clients} is not a folder (a finished `fedpers simulate` run and mode)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        generated = generate_answers(
            clients, args.cues, args.tokens, args.seed, args.users, contrast=args.contrast
        )
        summary = attribute(generated, hub=args.hub, uncopied=args.uncopied)
    except FedpersError as exc:
        raise SystemExit(f"error: {exc}") from exc
    seconds = time.perf_counter() - start
    print(table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"summary": summary, "seconds": seconds, **generated}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
