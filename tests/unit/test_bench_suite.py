"""bench.suite (issue 23's development suite): its headline from rows, its BENCHMARKS.md table, and one real run
of hand baseline + cold-start fit on the tiny fixture at a budget of seconds."""

from __future__ import annotations

import json

import pytest

from bench.report import suite_section
from bench.suite import headline, main, resolve, run_suite


def _row(dataset: str, budget: float, seed: int, top1: float, hand: float, **kw) -> dict:
    row = {
        "dataset": dataset, "budget_min": budget, "seed": seed, "test_top1": top1, "hand_top1": hand,
        "gain_points": round(100 * (top1 - hand), 2), "budget_used_fraction": 0.9, "over_budget": False,
        "loss_to_best_points": None, "test_top1_interval": [top1 - 0.01, top1 + 0.01], "wall_s": 54 * budget,
        "chosen": "eval/gap/probe-raw", "best_in_hindsight": None, "command": "python -m bench.suite --budget 5",
    }  # fmt: skip
    return {**row, **kw}


def _rows(*rows: dict) -> dict[str, dict]:
    return {f"{r['dataset']}/{r['budget_min']:g}min/seed{r['seed']}": r for r in rows}


def test_the_headline_is_computed_from_the_rows():
    rows = _rows(
        _row("cub100", 10, 0, 0.92, 0.88, loss_to_best_points=0.4, best_in_hindsight="x", best_in_hindsight_top1=0.924),
        _row("cub100", 10, 1, 0.91, 0.88, loss_to_best_points=1.2, best_in_hindsight="x", best_in_hindsight_top1=0.922),
        _row("cub100", 5, 0, 0.90, 0.88, budget_used_fraction=0.5),
        _row("cub100", 5, 1, 0.89, 0.88),
        _row("cub100", 5, 2, 0.91, 0.88, over_budget=True, budget_used_fraction=1.03),
        _row("rsscn7", 10, 0, 0.95, 0.94),
        _row("rsscn7", 5, 0, 0.96, 0.94),
        _row("rsscn7", 5, 1, 0.93, 0.94),
    )
    h = headline(rows)
    assert h["datasets"] == ["cub100", "rsscn7"] and h["runs"] == sorted(rows)
    assert h["min_gain_over_hand_points_10min"] == 1.0  # seed-0 rows only: cub100 +4, rsscn7 +1
    assert h["mean_gain_over_hand_points_10min"] == 2.5
    assert h["min_mean_gain_over_hand_points_5min"] == 0.5  # cub100 (2+1+3)/3 = 2, rsscn7 (2-1)/2 = 0.5
    assert h["worst_seed_gain_points_5min"] == -1.0
    assert h["min_budget_used_fraction"] == 0.5 and h["over_budget_runs"] == 1
    assert h["min_gain_10min_over_5min_points"] == -1.0  # cub100 92 - 90 = +2, rsscn7 95 - 96 = -1
    assert h["cub100_max_loss_to_best_points_10min"] == 1.2


def test_the_headline_says_none_where_nothing_was_measured():
    h = headline(_rows(_row("flowers17", 1, 0, 0.8, 0.7)))
    assert h["datasets"] == ["flowers17"] and h["over_budget_runs"] == 0 and h["min_budget_used_fraction"] == 0.9
    for key in ("min_gain_over_hand_points_10min", "mean_gain_over_hand_points_10min", "worst_seed_gain_points_5min",
                "min_mean_gain_over_hand_points_5min", "min_gain_10min_over_5min_points",
                "cub100_max_loss_to_best_points_10min"):  # fmt: skip
        assert h[key] is None, key
    assert headline({})["over_budget_runs"] is None


def test_the_report_table_has_one_line_a_run():
    rows = _rows(_row("cub100", 5, 0, 0.90, 0.88), _row("cub100", 5, 1, 0.89, 0.88, over_budget=True))
    lines = suite_section({**rows, "cub100/hand": {"top1": 0.88}, "headline": headline(rows)})
    assert lines[0] == "## Development suite (issue 23)"
    table = [line for line in lines if line.startswith("| cub100 |")]
    assert len(table) == 2 and "+2.0" in table[0] and "**over**" in table[1] and "0.900 [0.890, 0.910]" in table[0]
    assert any(line.startswith("Headline (cub100):") for line in lines)
    assert suite_section({"headline": {}}) == []


def test_the_suite_needs_a_budget_unless_hand_only_and_names_unknown_data_sets():
    with pytest.raises(SystemExit):
        main(["--seeds", "0"])
    data, why = resolve("nope")
    assert data is None and "--data NAME=PATH" in why


def test_the_suite_runs_hand_baseline_and_a_cold_start_fit_on_the_tiny_folder(tiny_folder, tmp_path):
    results = tmp_path / "results"
    rows = run_suite(
        ["tiny"], budget=1.0, seeds=[0], paths={"tiny": tiny_folder}, results=str(results),
        cache=str(tmp_path / "cache"), workers=0, finetune=False, bootstrap=50,
    )  # fmt: skip
    assert set(rows) == {"tiny/hand", "tiny/1min/seed0"}
    hand, row = rows["tiny/hand"], rows["tiny/1min/seed0"]
    assert hand["n_train"] == 18 and hand["n_test"] == 9 and 0 <= hand["top1"] <= 1
    for key in ("test_top1", "test_top1_interval", "test_mean_per_class", "hand_top1", "gain_points", "wall_s",
                "budget_used_fraction", "over_budget", "chosen", "chosen_estimate", "best_in_hindsight",
                "best_in_hindsight_top1", "loss_to_best_points", "skipped_candidates"):  # fmt: skip
        assert key in row, key
    assert 0 <= row["test_top1"] <= 1 and row["hand_top1"] == hand["top1"]
    assert row["gain_points"] == round(100 * (row["test_top1"] - row["hand_top1"]), 2)
    assert row["budget_used_fraction"] == pytest.approx(row["wall_s"] / 60, abs=0.01)
    assert row["over_budget"] == (row["wall_s"] > 65)
    assert 0 <= row["best_in_hindsight_top1"] <= 1 and row["loss_to_best_points"] >= 0
    saved = json.loads((results / "suite.json").read_text())
    assert saved["tiny/1min/seed0"]["command"] and saved["tiny/hand"]["dataset"] == "tiny"
    assert saved["headline"]["datasets"] == ["tiny"] and saved["headline"]["runs"] == ["tiny/1min/seed0"]
