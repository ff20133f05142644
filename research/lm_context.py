"""Diagnostic: do a user's own turns as chat context make the assistant speak more like that user?

    python -m research.lm_context --run-dir RUN --mode fedper [--examples 2,4,8]
        [--pick spread,longest,retrieve,scored] [--contrast 0.5,1] [--users N] [--threads T] [--json OUT]
    python -m research.lm_context --report OUT        # the table of an earlier --json, again

For each client state of a finished chat-turn run (``RUN/MODE/clients/client-NNNN``), the user's personal
model (what ``fedpers chat`` loads) scores the user's *test* replies given their cues three ways: with no
earlier turns; with ``--examples`` of the user's own *training* turns first, picked as the client picks
them (common.chat_format.pick_examples, ``client.chat-pick``; ``retrieve`` picks per cue from a pool); and
with as many training turns of another user of the run (the next one), picked the same way. "own < none"
says the context helps; "own < other" says it carries this user's voice, not just the register every user
shares. Several ``--examples`` and ``--pick`` values run as one sweep (each state loaded once). Nothing is
trained; the test split is only read (on a ``task.evaluate-on = validation`` run it is the validation
split). ``--transcript MSG`` answers one message for two users (``--transcript-users``), with and without
the turns. ``--pick`` defaults to ``spread``, the first default, so earlier figures reproduce.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from client.generate import stream
from client.predict import load_personal_model
from common.chat_format import PICKS, Example, chat_prompt, keep_turns, pick_examples, turns_before
from common.data import ClientData, load_client_data
from common.errors import FedpersError, StateError
from common.features import Features, encode
from common.tasks.generate import next_token_loss
from research.context_scoring import contrast_losses, encode_turns
from research.lm_style import client_dirs

SCORED = "scored"
SCORED_CANDIDATES, SCORED_PROBES = 16, 8


def scored_turns(
    model: Any,
    backbone: Any,
    max_length: int,
    d: ClientData,
    k: int,
    candidates: int = SCORED_CANDIDATES,
    probes: int = SCORED_PROBES,
) -> list[Example]:
    """The ``k`` of the user's longest training turns that most lower the loss of their other turns.

    Each candidate (one of the ``candidates`` longest replies) goes alone before ``probes`` training
    turns that are not candidates (spread over them); the ``k`` candidates with the lowest mean loss on
    those replies are kept, in data order (ties: the earlier turn).
    """
    tok, m = backbone.tokenizer, len(d.train_texts)
    size = [len(tok(r, add_special_tokens=False)["input_ids"]) for r in d.train_texts]
    cands = sorted(sorted(range(m), key=lambda i: (-size[i], i))[:candidates])
    rest = [i for i in range(m) if i not in set(cands)]
    if probes < 1 or len(rest) < probes or k > len(cands):
        raise StateError(f"{d.user}: {m} training turns are too few to score {k} of them")
    probe = [rest[(j * len(rest)) // probes] for j in range(probes)]
    turns = pick_examples(  # every candidate, cut as training cuts it ("spread" over all keeps all)
        tok, [d.train_prompts[i] for i in cands], [d.train_texts[i] for i in cands], len(cands), max_length
    )
    texts, prompts = [d.train_texts[i] for i in probe], [d.train_prompts[i] for i in probe]
    losses = []
    for turn in turns:
        feats = encode_turns(backbone, texts, max_length, prompts, [[turn]] * probes)
        losses.append(next_token_loss(model, feats))
    return [turns[i] for i in sorted(sorted(range(len(turns)), key=lambda i: (losses[i], i))[:k])]


def _states(clients_dir: Path, users: int) -> list[Path]:
    found = client_dirs(clients_dir)
    if len(found) < 2:
        raise StateError(f"{clients_dir} needs at least two client states (one to borrow turns from)")
    return found[:users] if users else found


def _contexts(how: str, k: int, kept: list[Example], d: ClientData) -> list[list[Example]]:
    """Each test cue's earlier turns, as ``fedpers chat`` would put them before that message."""
    return [turns_before(kept, "longest" if how == SCORED else how, k, cue) for cue in d.test_prompts]


def _features(backbone: Any, max_length: int, d: ClientData, shots: list[list[Example]] | None) -> Features:
    if shots is None:  # no earlier turns: what the client itself scores (encode's cache)
        return encode(backbone, d.test_texts, None, max_length, prompts=d.test_prompts)
    return encode_turns(backbone, d.test_texts, max_length, d.test_prompts, shots)


def _context_tokens(tokenizer: Any, contexts: list[list[Example]]) -> float:
    """How many tokens the turns add before a message, on average (each answer's extra prompt)."""

    def size(shots: list[Example]) -> int:
        return len(tokenizer(chat_prompt(tokenizer, "?", shots), add_special_tokens=False)["input_ids"])

    return statistics.fmean(size(shots) for shots in contexts) - size([])


def context_perplexity(clients_dir: Path, k: int, users: int = 0, how: str = "spread") -> dict[str, Any]:
    """Per user: test perplexity with no turns, ``k`` own training turns and ``k`` of the next user's."""
    return context_sweep(clients_dir, [(how, k)], users)[0]


def context_sweep(
    clients_dir: Path, settings: list[tuple[str, int]], users: int = 0, contrasts: tuple[float, ...] = ()
) -> list[dict[str, Any]]:
    """:func:`context_perplexity` for several (how, k) settings; each state loads and scores "none" once.

    For ``retrieve`` each user keeps a pool as the client does (``client.chat-pool`` turns, spread over
    their training data) and each test cue gets the ``k`` pool turns closest to it; "other" retrieves
    from the next user's pool for the same cue. With ``contrasts`` each row also has the perplexities
    under context-aware decoding (``fedpers chat --contrast a``) with the own and the other turns.
    """
    dirs = _states(clients_dir, users)
    rows: list[list[dict[str, Any]]] = [[] for _ in settings]
    data: list[ClientData] = []
    kept: list[list[list[Example]]] = []  # [setting][user]: the turns each user keeps
    for i, state_dir in enumerate(dirs):
        cfg, backbone, model = load_personal_model(state_dir, None, command="chat")
        tok, n = backbone.tokenizer, cfg.task.max_length
        if not data:
            if cfg.task.lm_format != "chat":
                raise StateError(f"{clients_dir} was trained on raw text (task.lm-format = 'text'): no turns")
            parts = [int(p.name.removeprefix("client-")) for p in dirs]
            total = max(int(p.name.removeprefix("client-")) for p in clients_dir.glob("client-*")) + 1
            data = [load_client_data(cfg.task, part, total) for part in parts]
            pool = cfg.client.chat_pool
            kept = [
                [
                    [] if how == SCORED else keep_turns(tok, d.train_prompts, d.train_texts, n, how, k, pool)
                    for d in data
                ]
                for how, k in settings
            ]
            for j, (how, k) in enumerate(settings):  # each user's own model picks ("other" borrows them)
                if how == SCORED:
                    for u, state_u in enumerate(dirs):
                        own_model = model if u == i else load_personal_model(state_u, None, command="chat")[2]
                        kept[j][u] = scored_turns(own_model, backbone, n, data[u], k)
        d, other = data[i], (i + 1) % len(dirs)
        plain = _features(backbone, n, d, None)
        none = math.exp(next_token_loss(model, plain))
        line = [f"  {i + 1}/{len(dirs)} {d.user}: none {none:.2f}"]
        for j, (how, k) in enumerate(settings):
            own = _contexts(how, k, kept[j][i], d)
            feats = [
                _features(backbone, n, d, own),
                _features(backbone, n, d, _contexts(how, k, kept[j][other], d)),
            ]
            row = {
                "user": d.user,
                "other": data[other].user,
                "none": none,
                "own": math.exp(next_token_loss(model, feats[0])),
                "other-turns": math.exp(next_token_loss(model, feats[1])),
                "context-tokens": _context_tokens(tok, own),
            }
            if contrasts:
                losses = contrast_losses(model, plain, feats, contrasts)
                row["own-contrast"] = [math.exp(x) for x in losses[0]]
                row["other-contrast"] = [math.exp(x) for x in losses[1]]
            rows[j].append(row)
            line.append(f"{how} k={k}: own {row['own']:.2f}, other {row['other-turns']:.2f}")
        print("; ".join(line), flush=True)
    return [
        {
            "pick": how,
            "examples": k,
            "rows": r,
            "summary": summarize(r, contrasts),
            "contrasts": list(contrasts),
        }
        for (how, k), r in zip(settings, rows, strict=True)
    ]


def summarize(rows: list[dict[str, Any]], contrasts: tuple[float, ...] | list[float] = ()) -> dict[str, Any]:
    """Means, medians and how many users each comparison favours the own turns (and each contrast)."""
    out: dict[str, Any] = {"users": len(rows)}
    for key in ("none", "own", "other-turns"):
        vals = [r[key] for r in rows]
        out[f"{key}-mean"], out[f"{key}-median"] = statistics.fmean(vals), statistics.median(vals)
    if all("context-tokens" in r for r in rows):
        out["context-tokens-mean"] = statistics.fmean(r["context-tokens"] for r in rows)
    out["own-beats-none"] = sum(r["own"] < r["none"] for r in rows)
    out["own-beats-other"] = sum(r["own"] < r["other-turns"] for r in rows)
    for key in ("none", "other-turns"):  # geometric-mean change of perplexity, own turns vs these
        ratio = statistics.fmean(math.log(r["own"] / r[key]) for r in rows)
        out[f"own-vs-{key.removesuffix('-turns')}-pct"] = 100 * (math.exp(ratio) - 1)
    out["contrast"] = []
    for j, a in enumerate(contrasts):
        own = [r["own-contrast"][j] for r in rows]
        other = [r["other-contrast"][j] for r in rows]
        out["contrast"].append(
            {
                "contrast": a,
                "own-mean": statistics.fmean(own),
                "own-vs-plain-pct": _geo_pct(own, [r["own"] for r in rows]),
                "own-beats-plain": sum(c < r["own"] for c, r in zip(own, rows, strict=True)),
                "other-mean": statistics.fmean(other),
                "own-vs-other-pct": _geo_pct(own, other),
                "own-beats-other": sum(a_ < b for a_, b in zip(own, other, strict=True)),
            }
        )
    return out


def _geo_pct(first: list[float], second: list[float]) -> float:
    """The geometric-mean change from ``second`` to ``first``, in per cent."""
    return 100 * (math.exp(statistics.fmean(math.log(a / b) for a, b in zip(first, second, strict=True))) - 1)


def transcript(
    clients_dir: Path,
    k: int,
    message: str,
    seed: int,
    tokens: int,
    users: tuple[int, ...],
    how: str = "spread",
) -> list[str]:
    """Users' (partition ids) answers to ``message`` without and with ``k`` of their own turns."""
    lines = []
    for user in users:
        state_dir = clients_dir / f"client-{user:04d}"
        if not (state_dir / "personal.state").is_file():
            raise StateError(f"no client state {state_dir}")
        cfg, backbone, model = load_personal_model(state_dir, None, command="chat")
        part = int(state_dir.name.removeprefix("client-"))
        d = load_client_data(cfg.task, part, part + 1)
        tok, n = backbone.tokenizer, cfg.task.max_length
        kept = keep_turns(tok, d.train_prompts, d.train_texts, n, how, k, cfg.client.chat_pool)
        turns = turns_before(kept, how, k, message)
        for label, shots in (("no turns", []), (f"{k} own turns ({how})", turns)):
            pieces = stream(
                backbone, model, message, max_new_tokens=tokens, temperature=0.7, seed=seed, examples=shots
            )
            answer = "".join(pieces).strip().replace("\n", " / ")
            lines.append(f"{d.user} ({label}): {answer}")
    return lines


def table(sweep: list[dict[str, Any]]) -> str:
    """A Markdown table of a sweep: one row per (pick, k), perplexities over users and the paired changes."""
    none = sweep[0]["summary"]
    lines = [
        f"No turns: perplexity mean {none['none-mean']:.2f}, median {none['none-median']:.2f} "
        f"({none['users']} users).",
        "",
        "| pick | k | context tokens | own turns: mean | median | vs none (geo. mean) | users better "
        "| another user's turns: mean | own vs another's | own better for |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for one in sweep:
        m = one["summary"]
        lines.append(
            f"| {one['pick']} | {one['examples']} | {m.get('context-tokens-mean', float('nan')):.0f} "
            f"| {m['own-mean']:.2f} | {m['own-median']:.2f} | {m['own-vs-none-pct']:+.1f} % "
            f"| {m['own-beats-none']} of {m['users']} | {m['other-turns-mean']:.2f} "
            f"| {m['own-vs-other-pct']:+.1f} % | {m['own-beats-other']} of {m['users']} |"
        )
    extra = [(one, c) for one in sweep for c in one["summary"].get("contrast", [])]
    if extra:
        lines += [
            "",
            "Context-aware decoding (`fedpers chat --contrast a`): the same perplexities under "
            "(1 + a) logits with the turns - a logits without.",
            "",
            "| pick | k | contrast a | own turns: mean | vs a = 0 (geo. mean) | users better "
            "| another user's turns: mean | own vs another's | own better for |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for one, c in extra:
            users = one["summary"]["users"]
            lines.append(
                f"| {one['pick']} | {one['examples']} | {c['contrast']:g} | {c['own-mean']:.2f} "
                f"| {c['own-vs-plain-pct']:+.1f} % | {c['own-beats-plain']} of {users} "
                f"| {c['other-mean']:.2f} "
                f"| {c['own-vs-other-pct']:+.1f} % | {c['own-beats-other']} of {users} |"
            )
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: expected comma-separated whole numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    """Print the per-user perplexities and the summary (and optionally a transcript)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, help="a finished chat-turn simulation folder")
    ap.add_argument("--report", type=Path, help="print the table of an earlier --json file and stop")
    ap.add_argument("--mode", default="fedper", help="which mode's client states (default fedper)")
    ap.add_argument("--examples", default="4", help="own turns put first; several (1,2,4) sweep (default 4)")
    ap.add_argument(
        "--pick",
        default="spread",
        help=f"how turns are picked, one or several of {','.join(PICKS)} (or {SCORED}, a diagnostic)",
    )
    ap.add_argument("--users", type=int, default=0, help="only the first N users (default all)")
    ap.add_argument("--contrast", default="", help="also score context-aware decoding at these a (0.5,1,2)")
    ap.add_argument("--json", type=Path, help="also write the rows and the summary here")
    ap.add_argument(
        "--transcript", default="", help="a message the --transcript-users answer, with and without"
    )
    ap.add_argument("--transcript-users", default="1,2", help="partition ids (default 1,2: Othello, Iago)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the transcript")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        print(table(saved.get("sweep", [saved])))
        return
    if args.run_dir is None:
        raise SystemExit("error: give --run-dir (or --report)")
    ks, picks = _ints(args.examples), [h.strip() for h in args.pick.split(",") if h.strip()]
    if not ks or min(ks) < 1 or args.users < 0 or args.threads < 1:
        raise SystemExit("error: --examples and --threads must be >= 1 and --users >= 0")
    try:
        contrasts = tuple(float(a) for a in args.contrast.split(",") if a.strip())
    except ValueError:
        raise SystemExit(f"error: --contrast takes comma-separated numbers, got {args.contrast!r}") from None
    if any(not a > 0 or not math.isfinite(a) for a in contrasts):
        raise SystemExit(f"error: --contrast values must be finite and > 0, got {args.contrast!r}")
    if not picks or set(picks) - {*PICKS, SCORED}:
        raise SystemExit(f"error: --pick takes {', '.join(PICKS)} or {SCORED}, got {args.pick!r}")
    clients = args.run_dir / args.mode / "clients"
    if not clients.is_dir():
        raise SystemExit(f"error: {clients} is not a folder (a finished `fedpers simulate` run and mode)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        if args.transcript:
            if picks[0] == SCORED:
                raise SystemExit(f"error: --transcript takes a client's pick ({', '.join(PICKS)})")
            users = tuple(int(u) for u in args.transcript_users.split(","))
            for line in transcript(clients, ks[0], args.transcript, args.seed, 50, users, picks[0]):
                print(line)
            return
        sweep = context_sweep(clients, [(h, k) for h in picks for k in ks], args.users, contrasts)
    except FedpersError as exc:
        raise SystemExit(f"error: {exc}") from exc
    seconds = time.perf_counter() - start
    print(table(sweep))
    result: dict[str, Any] = (
        {**sweep[0], "seconds": seconds} if len(sweep) == 1 else {"sweep": sweep, "seconds": seconds}
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
