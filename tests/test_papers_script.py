"""`benchmarks/papers.py`'s own logic: how claims are split over processes, the decision rule,
and the README table (the claims themselves are measured by running the script)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import papers  # noqa: E402
from paper_claims.adapt_runs import beats  # noqa: E402


def test_each_claim_runs_once_and_the_costliest_starts_first():
    units = papers.groups(papers.CLAIMS)
    assert sorted(n for u in units for n in u) == sorted(papers.CLAIMS)  # each claim once
    costs = [sum(papers.COST.get(n, 1) for n in u) for u in units]
    assert costs == sorted(costs, reverse=True)
    assert papers.groups(["soups", "cocoop"]) == [["cocoop"], ["soups"]]


def test_a_gap_counts_only_beyond_twice_the_pooled_std():
    # pooled std of [1, 3] and [0, 0]: sqrt((2 + 0) / 2) = 1, so the bar is 2 points
    a, b = {"mean": 2.0, "values": [1.0, 3.0]}, {"mean": 0.0, "values": [0.0, 0.0]}
    assert not beats(a, b)  # a gap of exactly 2 is a tie
    assert beats({**a, "mean": 2.1}, b)


def test_the_table_shows_each_arm_and_says_why_a_claim_failed():
    entry = {"claim": "X > Y", "paper": "P", "paper_numbers": "90 vs 80", "reproduced": False,
             "note": "X tie with Y", "numbers": {"X": {"mean": 71.234, "std": 0.5},
                                                  "α*": [0.5, 0.25]}}
    rows = papers.format_table([entry]).splitlines()
    assert rows[2] == ("| X > Y | P | X 71.2 ± 0.5; α* [0.5, 0.25] | 90 vs 80 "
                       "| no — X tie with Y |")
