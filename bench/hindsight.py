"""Hindsight for suite runs that finished without it (`bench.suite --no-hindsight`): every candidate of a finished
`fit` scored on the test split (bench only), the chosen one's rank among them, and how a validation-only challenger
(a fine-tune, an ensemble with one) fared against the out-of-fold leader it displaced or did not.

    python -m bench.hindsight flowers17-10min-seed0 rsscn7-10min-seed0     # folders under bench/cache/suite-fit

Candidates are rebuilt from the run's own state (fit-state/candidates.json, leaderboard.csv for ensembles); test
features go to <run>/features-test (as `bench.suite` with hindsight writes them). Rows are recorded in
bench/results/hindsight.json under the run's folder name.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
from types import SimpleNamespace

import numpy as np

from bench.common import record
from bench.fit import CACHE, hindsight_probas
from bench.suite import resolve


def run_result(out: str, data: str) -> tuple[object, SimpleNamespace]:
    """(fit's config, a result with its leaderboard and chosen candidate) of a finished fit in `out` on `data` (the
    run may have been made from another checkout: its paths are re-rooted here)."""
    import dataclasses

    import yaml

    from finegrain.recipe import FitConfig
    from finegrain.recipe.candidates import Candidate

    with open(os.path.join(out, "config.yaml"), encoding="utf-8") as f:
        saved = yaml.safe_load(f)
    old_out = saved["out"]
    fields = {f.name for f in dataclasses.fields(FitConfig)}
    cfg = FitConfig(**{k: v for k, v in saved.items() if k in fields} | {"data": data, "out": out})
    with open(os.path.join(out, "fit-state", "candidates.json"), encoding="utf-8") as f:
        board = {c["name"]: Candidate(**c) for c in json.load(f)["candidates"]}
    for c in board.values():
        if "run" in c.params:
            c.params["run"] = c.params["run"].replace(old_out, out)
    with open(os.path.join(out, "leaderboard.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["kind"] == "ensemble" and r["name"] not in board:
            est = r["estimate"]
            board[r["name"]] = Candidate(r["name"], "ensemble", float(r["val_top1"] or 0), 0.0, 0.0,
                                         members=r["members"].split("+"), estimate=est,
                                         oof_top1=float(r["oof_top1"]) if r["oof_top1"] else None)  # fmt: skip
    with open(os.path.join(out, "fit.json"), encoding="utf-8") as f:
        chosen = board[json.load(f)["chosen"]]
    order = [r["name"] for r in rows]
    return cfg, SimpleNamespace(leaderboard=[board[n] for n in order if n in board], chosen=chosen)


def near_tie_union(out: str, cfg, result, y_test: np.ndarray, probas: dict[str, np.ndarray], cap: int = 6) -> dict:
    """What averaging the near-tied leaders would have given: the cross-validated candidates (ensembles included)
    whose out-of-fold top-1 is within one paired standard error of the out-of-fold leader's, their members pooled
    (the leader's first, at most `cap`), averaged; its out-of-fold and test top-1 beside the leader's."""
    from finegrain.data import load_image_set
    from finegrain.recipe.candidates import paired_difference
    from finegrain.recipe.fit import _folds
    from finegrain.train.data import make_splits

    splits = make_splits(load_image_set(cfg.data), val_fraction=cfg.val_fraction, seed=cfg.seed)
    y = _folds(splits, cfg.seed).y
    state = os.path.join(out, "fit-state")
    board = {c.name: c for c in result.leaderboard}

    def oof(name: str) -> np.ndarray:
        c = board[name]
        if c.members:
            return sum(oof(m) for m in c.members) / len(c.members)
        key = hashlib.sha1(name.encode()).hexdigest()[:16]
        return np.load(os.path.join(state, f"{key}-oof.npy"))

    cross = [c for c in result.leaderboard if c.estimate.startswith("oof")]
    leader = cross[0]
    ties = []
    for c in cross:
        diff, se = paired_difference(oof(leader.name), oof(c.name), y)
        if diff <= se:
            ties.append(c)
    members: list[str] = []
    for c in ties:
        for m in c.members or [c.name]:
            if m not in members and len(members) < cap:
                members.append(m)
    union_oof = sum(oof(m) for m in members) / len(members)
    union_test = sum(probas[m] for m in members) / len(members)
    return {
        "near_ties": [c.name for c in ties], "union_members": members,
        "union_oof_top1": float(np.mean(union_oof.argmax(1) == y)), "leader_oof_top1": leader.oof_top1,
        "union_test_top1": float(np.mean(union_test.argmax(1) == y_test)),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="folders under bench/cache/suite-fit (e.g. flowers17-10min-seed0)")
    args = ap.parse_args()
    for name in args.runs:
        out = os.path.join(CACHE, "suite-fit", name)
        data, why = resolve(name.rsplit("-", 2)[0])
        if data is None:
            print(f"hindsight: skipping {name}: {why}")
            continue
        cfg, result = run_result(out, data)
        probas, y = hindsight_probas(cfg, result)
        scores = {n: float(np.mean(p.argmax(1) == y)) for n, p in probas.items()}
        oof = [c for c in result.leaderboard if c.estimate.startswith("oof")]
        leader = oof[0].name if oof else None
        best = max(scores, key=scores.get)
        row = {
            "chosen": result.chosen.name, "chosen_estimate": result.chosen.estimate,
            "chosen_test_top1": scores.get(result.chosen.name),
            "oof_leader": leader, "oof_leader_test_top1": scores.get(leader),
            "best_in_hindsight": best, "best_in_hindsight_top1": scores[best],
            "loss_to_best_points": round(100 * (scores[best] - scores.get(result.chosen.name, 0.0)), 2),
            **(near_tie_union(out, cfg, result, y, probas) if leader else {}),
            "command": f"python -m bench.hindsight {name}",
            "test_top1": dict(sorted(scores.items(), key=lambda kv: -kv[1])),
        }  # fmt: skip
        record("hindsight.json", name, row)
        print(f"{name}: chosen {row['chosen']} ({row['chosen_estimate']}) {row['chosen_test_top1']:.4f}; "
              f"out-of-fold leader {leader} {row['oof_leader_test_top1']:.4f}; best {best} {scores[best]:.4f}; "
              f"near-tie union of {len(row.get('union_members', []))}: oof {row.get('union_oof_top1', 0):.4f} "
              f"(leader {row.get('leader_oof_top1') or 0:.4f}), test {row.get('union_test_top1', 0):.4f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
