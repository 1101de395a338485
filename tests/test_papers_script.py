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


def test_a_run_of_some_claims_replaces_only_theirs_in_the_results_file(tmp_path, monkeypatch):
    """`--claims hard_negatives` re-measures that claim; the file keeps every other claim's
    entry (it wrote only the claims run, deleting the rest of the committed table), in the
    table's order, and the printed table is the whole file's."""
    import json

    out = tmp_path / "papers.json"
    old = [{"claim_id": n, "claim": n, "old": True} for n in ("coop", "hard_negatives", "soups")]
    out.write_text(json.dumps(old))
    monkeypatch.setattr(papers, "competent_base", lambda *a: "base")
    monkeypatch.setattr(papers, "run_claims", lambda names, *a, **k: [
        {"claim_id": n, "claim": n, "old": False} for n in names])
    printed = []
    monkeypatch.setattr(papers, "format_table", lambda entries: printed.append(entries) or "")
    papers.main(["--claims", "hard_negatives", "--out", str(out), "--work", str(tmp_path)])
    written = json.loads(out.read_text())
    assert [(e["claim_id"], e["old"]) for e in written] == [
        ("coop", True), ("soups", True), ("hard_negatives", False)]
    assert printed == [written]


def test_an_entry_written_before_claim_ids_is_redone_by_its_claim(tmp_path):
    """A results file from before entries had a ``claim_id`` (the curation claims'): the re-run
    claim replaces its old entry (same ``claim`` text) instead of standing beside it."""
    import json

    from results_file import write_merged

    out = tmp_path / "claims.json"
    out.write_text(json.dumps([{"claim": "A beats B", "v": 1}, {"claim": "C holds", "v": 1}]))
    written = write_merged(out, [{"claim_id": "a", "claim": "A beats B", "v": 2}], ["a", "c"])
    assert written == [{"claim_id": "a", "claim": "A beats B", "v": 2},
                       {"claim": "C holds", "v": 1}]
    assert json.loads(out.read_text()) == written
