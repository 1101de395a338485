"""The papers' claims, measured as the papers measure them, on a competent base: one table with
seeds and spread, every hyperparameter chosen on a validation split disjoint from what is
reported.

    python benchmarks/papers.py [--quick] [--claims coop tip_adapter ...] [--seeds 1 2 3] [--jobs 2]

Trains the competent base once (`paper_claims.common.competent_base`, kept under
``--work``), runs each claim module of `paper_claims`, writes ``examples/results/papers.json``
(``papers-quick.json`` with ``--quick``): a list with one entry per claim (``claim_id``,
``claim``, ``paper``, ``reproduced``, ``seeds``, ``numbers``, ``base``, ``paper_numbers``,
``note``), and prints the README's table. Never asserts: a claim that does not
reproduce says so in the table.
With ``--jobs N`` the claims run in N processes of one torch thread each (the longest first);
the JSON and the table keep the table order.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_args import check_seeds, existing_dir, make_parser, non_negative_int  # noqa: E402
from cli_args import positive_int  # noqa: E402
from cli_args import run_main  # noqa: E402
from paper_claims.common import REPO, ClaimContext, competent_base  # noqa: E402
from results_file import write_merged  # noqa: E402

# claim modules in table order (each: CLAIM, PAPER, BASE, run(ctx) -> entry)
CLAIMS: list[str] = [
    "coop", "cocoop", "tip_adapter", "clip_adapter",
    "wise_ft", "soups", "task_arithmetic",
    "hard_negatives",
]
# rough single-thread cost at full size, for starting the longest first under --jobs
COST = {"cocoop": 6, "coop": 5, "wise_ft": 5, "soups": 3, "task_arithmetic": 2}


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


def run_claims(names: list[str], base: Path, args: argparse.Namespace, kind: str,
               threads: int | None = None) -> list[dict]:
    """Run the claim modules ``names`` in order; each result gains its wall time in seconds."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    results = []
    for name in names:
        module = importlib.import_module(f"paper_claims.{name}")
        ctx = ClaimContext(base=base, seeds=args.seeds, quick=args.quick,
                           work=args.work / kind / name, data_dir=args.data_dir)
        ctx.work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        result = module.run(ctx)
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["claim_id"] = name
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def groups(names: list[str]) -> list[list[str]]:
    """``names`` as units of work for the process pool, one claim each (no two claims share
    a cached fine-tune recipe), the costliest first."""
    return sorted(([n] for n in names), key=lambda u: -COST.get(u[0], 1))


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (minutes, not tens)")
    ap.add_argument("--claims", nargs="+", default=None, choices=CLAIMS, metavar="CLAIM",
                    help="re-measure only these; the results file keeps the other entries "
                    "(of: " + ", ".join(CLAIMS) + "; default: all)")
    ap.add_argument("--seeds", type=non_negative_int, nargs="+", default=[1, 2, 3],
                    help="seeds of every claim, 3 or more, each once: mean and std over them")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "papers",
                    help="folder for the competent base and the claims' runs")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: Debian's)")
    ap.add_argument("--jobs", type=positive_int, default=1,
                    help="claims run in this many processes at once (one torch thread each)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default examples/results/papers[-quick].json)")
    args = ap.parse_args(argv)
    check_seeds(ap, args.seeds)
    if args.data_dir:  # a str: it goes into the claims' data specs as given
        try:
            existing_dir(args.data_dir)
        except argparse.ArgumentTypeError as err:
            ap.error(f"argument --data-dir: {err}")
    kind = "quick" if args.quick else "full"
    base = competent_base(args.work / f"base-{kind}", args.quick, args.data_dir)
    out = args.out or REPO / "examples" / "results" / f"papers{'-quick' if args.quick else ''}.json"
    names = args.claims or CLAIMS
    done: dict[str, dict] = {}

    def keep(results: list[dict]) -> None:  # finished claims survive a crash
        done.update((r["claim_id"], r) for r in results)
        write_merged(out, list(done.values()), CLAIMS)  # other claims' entries stay

    if args.jobs <= 1:
        for name in names:
            keep(run_claims([name], base, args, kind))
    else:
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            futures = [pool.submit(run_claims, unit, base, args, kind, 1)
                       for unit in groups(names)]
            for future in concurrent.futures.as_completed(futures):
                keep(future.result())
    print(format_table(json.loads(out.read_text())))  # the whole file: the README's table


if __name__ == "__main__":
    run_main(main)
