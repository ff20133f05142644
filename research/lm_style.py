"""Diagnostic: does each user's assistant speak more like *that* user than like the others?

    python -m research.lm_style --run-dir runs/shakespeare-bias [--modes fedper,local] [--json OUT]

For every client state of a finished causal-LM run (``<run>/<mode>/clients/client-NNNN``), the user's
personal model (the latest shared tensors plus their own part, exactly what ``fedpers chat`` loads)
scores the *test* replies of every user of the run. Cell (i, j) of the matrix is the perplexity of user
j's test replies under user i's model. A personal part that carries the user's style makes the diagonal
the best entry of each column: the report gives how often the own model wins its column (chance: 1/N),
the mean own-vs-others log-perplexity gap, and the same for pairs of users from the same play (whose
vocabulary overlaps, so only style can separate them); also the spread in general quality between the
models and each user's perplexity with their personal part zeroed. Nothing is trained; the test split is
only read.
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

from client.predict import load_personal_model
from common.data import load_client_data
from common.errors import FedpersError, StateError
from common.features import Features, encode
from common.split import split_names
from common.tasks.generate import next_token_loss


def client_dirs(clients_dir: Path) -> list[Path]:
    """The client state folders of one run's mode (``client-NNNN`` with a state file), sorted."""
    found = sorted(p for p in clients_dir.glob("client-*") if (p / "personal.state").is_file())
    if not found:
        raise StateError(f"{clients_dir} has no client state: is this a finished causal-LM run?")
    return found


def _test_features(cfg: Any, backbone: Any, partition: int, count: int) -> tuple[str, Features]:
    d = load_client_data(cfg.task, partition, count)
    feats = encode(backbone, d.test_texts, None, cfg.task.max_length, prompts=d.test_prompts)
    return d.user, feats


def cross_perplexity(clients_dir: Path) -> dict[str, Any]:
    """Users, the matrix ``ppl[i][j]`` (user j's test replies under user i's personal model) and
    ``without-personal[i]`` (user i's replies under their model with the personal part zeroed).

    ``clients_dir`` holds the states ``client-NNNN`` of one run (NNNN: the user's partition id).
    """
    dirs = client_dirs(clients_dir)
    n = len(dirs)
    users: list[str] = []
    feats: list[Features] = []
    ppl: list[list[float]] = []
    without: list[float] = []  # user i's replies under model i with its personal part zeroed
    for i, state_dir in enumerate(dirs):
        cfg, backbone, model = load_personal_model(state_dir, None, command="chat")
        if i == 0:  # every client of a run has the same task, so the test splits are read once
            parts = [int(d.name.removeprefix("client-")) for d in dirs]
            for part in parts:
                user, f = _test_features(cfg, backbone, part, max(parts) + 1)
                users.append(user)
                feats.append(f)
        ppl.append([math.exp(next_token_loss(model, f)) for f in feats])
        without.append(math.exp(next_token_loss(_zero_personal(model, cfg.personalization.mode), feats[i])))
        print(f"  {clients_dir.parent.name} model {i + 1}/{n} ({users[i]}) scored", flush=True)
    return {"users": users, "ppl": ppl, "without-personal": without}


@torch.no_grad()
def _zero_personal(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model`` with its personal tensors set to zero (for the offset and adapter: no personal change)."""
    personal = set(split_names([n for n, _ in model.named_parameters()], mode)["personal"])
    for name, param in model.named_parameters():
        if name in personal:
            param.zero_()
    return model


def summarize(users: list[str], ppl: list[list[float]], without: list[float] | None = None) -> dict[str, Any]:
    """Own-model wins and log-perplexity gaps (others minus own; > 0 means the own model fits better).

    Also the spread in general quality between models (geometric mean of each row without its diagonal,
    max / min) and, with ``without``, how the personal part changes each user's own perplexity.
    """
    n = len(users)
    wins = sum(all(ppl[j][j] < ppl[i][j] for i in range(n) if i != j) for j in range(n))  # strictly best
    gaps = [
        statistics.fmean(math.log(ppl[i][j]) for i in range(n) if i != j) - math.log(ppl[j][j])
        for j in range(n)
    ]
    play = [u.split("/")[0] for u in users]
    pairs = [(i, j) for j in range(n) for i in range(n) if i != j and play[i] == play[j]]
    pair_gaps = [math.log(ppl[i][j]) - math.log(ppl[j][j]) for i, j in pairs]
    quality = [statistics.fmean(math.log(ppl[i][j]) for j in range(n) if j != i) for i in range(n)]
    out: dict[str, Any] = {
        "users": n,
        "model-spread-pct": 100 * (math.exp(max(quality) - min(quality)) - 1) if n > 1 else 0.0,
        "own-model-wins": wins,
        "chance-wins": 1.0,
        "mean-gap-pct": 100 * (math.exp(statistics.fmean(gaps)) - 1),
        "same-play-pairs": len(pairs),
        "same-play-own-better": sum(g > 0 for g in pair_gaps),
        "same-play-mean-gap-pct": 100 * (math.exp(statistics.fmean(pair_gaps)) - 1) if pairs else None,
    }
    if without is not None:
        own = [ppl[i][i] for i in range(n)]
        out["own-mean"] = statistics.fmean(own)
        out["without-personal-mean"] = statistics.fmean(without)
        out["personal-helps"] = sum(o < w for o, w in zip(own, without, strict=True))
    return out


def main(argv: list[str] | None = None) -> None:
    """Print, per mode, how much better each user's own model fits their test replies than others'."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished causal-LM simulation folder")
    ap.add_argument("--modes", default="fedper,local", help="comma-separated modes under --run-dir")
    ap.add_argument("--json", type=Path, help="also write the matrices and summaries here")
    args = ap.parse_args(argv)
    if not args.run_dir.is_dir():
        raise SystemExit(f"error: {args.run_dir} is not a folder (a finished `fedpers simulate` run)")
    out: dict[str, Any] = {}
    for mode in filter(None, args.modes.split(",")):
        mode_dir = args.run_dir / mode
        if not mode_dir.is_dir():
            raise SystemExit(
                f"{mode_dir} does not exist (modes of this run: "
                f"{', '.join(sorted(p.name for p in args.run_dir.iterdir() if p.is_dir()))})"
            )
        start = time.perf_counter()
        try:
            result = cross_perplexity(mode_dir / "clients")
        except FedpersError as exc:
            raise SystemExit(f"error: {exc}") from exc
        result["summary"] = summarize(result["users"], result["ppl"], result["without-personal"])
        out[mode] = result
        s = result["summary"]
        same = s["same-play-mean-gap-pct"]
        print(
            f"{mode}: own model best for {s['own-model-wins']}/{s['users']} users (chance 1); others' models "
            f"are {s['mean-gap-pct']:+.2f} % in perplexity on a user's replies; same play: own better in "
            f"{s['same-play-own-better']}/{s['same-play-pairs']} pairs, "
            + (f"{same:+.2f} %" if same is not None else "no pairs")
            + f"; quality spread between models {s['model-spread-pct']:.1f} %; own perplexity mean "
            f"{s['own-mean']:.2f}, {s['without-personal-mean']:.2f} with the personal part zeroed (it helps "
            f"{s['personal-helps']}/{s['users']} users) ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
