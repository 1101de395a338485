"""The papers' claims, measured as the papers measure them, on a competent base: one table with
seeds and spread, every hyperparameter chosen on a validation split disjoint from what is
reported.

    python benchmarks/papers.py [--quick] [--claims coop tip_adapter ...] [--seeds 1 2 3]

Trains the competent base once (`paper_claims.common.competent_base`, kept under
``--work``), runs each claim module of `paper_claims`, writes ``examples/results/papers.json``
(``papers-quick.json`` with ``--quick``): a list with one entry per claim (``claim``, ``paper``,
``reproduced``, ``seeds``, ``numbers``, ``base``, ``paper_numbers``, ``note``), and prints the
README's table. Never asserts: a claim that does not reproduce says so in the table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_claims.common import REPO, ClaimContext, competent_base  # noqa: E402

# claim modules in table order (each: CLAIM, PAPER, BASE, run(ctx) -> entry)
CLAIMS: list[str] = [
    "coop", "cocoop", "tip_adapter", "clip_adapter",
    "wise_ft", "soups", "task_arithmetic",
    "hard_negatives",
]


def format_table(entries: list[dict]) -> str:
    """The README's markdown table: claim, paper, ours (mean ± std per arm), paper's, verdict."""
    rows = ["| claim | paper | ours (mean ± std over seeds) | paper's numbers | reproduced |",
            "|---|---|---|---|---|"]
    for e in entries:
        ours = "; ".join(f"{arm} {v['mean']:.1f} ± {v['std']:.1f}" if isinstance(v, dict)
                         and "mean" in v else f"{arm} {v}" for arm, v in e["numbers"].items())
        verdict = "yes" if e["reproduced"] else f"no — {e['note']}"
        rows.append(f"| {e['claim']} | {e['paper']} | {ours} | {e['paper_numbers']} | {verdict} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (minutes, not tens)")
    ap.add_argument("--claims", nargs="+", default=None, choices=CLAIMS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "papers")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: Debian's)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default examples/results/papers[-quick].json)")
    args = ap.parse_args(argv)
    kind = "quick" if args.quick else "full"
    base = competent_base(args.work / f"base-{kind}", args.quick, args.data_dir)
    out = args.out or REPO / "examples" / "results" / f"papers{'-quick' if args.quick else ''}.json"
    entries = []
    for name in args.claims or CLAIMS:
        module = importlib.import_module(f"paper_claims.{name}")
        ctx = ClaimContext(base=base, seeds=args.seeds, quick=args.quick,
                           work=args.work / kind / name, data_dir=args.data_dir)
        ctx.work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        result = module.run(ctx)
        result["seconds"] = round(time.perf_counter() - start, 1)
        entries.append(result)
        print(json.dumps(result), flush=True)
        out.write_text(json.dumps(entries, indent=2) + "\n")  # finished claims survive a crash
    print(format_table(entries))


if __name__ == "__main__":
    main()
