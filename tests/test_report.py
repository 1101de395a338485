"""`cliplab report`: tables side by side, valid PNG plots, parseable HTML, one-line errors."""

import json
import os
import re
import shutil
from html.parser import HTMLParser

import pytest
from PIL import Image

from cliplab.cli import main
from cliplab.errors import DataError
from cliplab.evaluate.report import flatten_metrics, format_value, write_report
from cliplab.evaluate.report_inputs import read_inputs
from tests.stamped import assert_stamped, now


def _few_shot(base):
    return {f"ncm_{k}shot": {"acc1_mean": base + 0.1 * i, "acc1_std": 0.02,
                             "acc1_per_seed": [base + 0.1 * i] * 2}
            for i, k in enumerate((1, 4, 16))}


def _long_tail(slope):
    return {"fit": {"slope": slope, "intercept": 0.1, "r2": 0.8, "n_classes": 3},
            "per_class": {"red": {"acc1": 0.9, "frequency": 100},
                          "blue": {"acc1": 0.5, "frequency": 10},
                          "green": {"acc1": 0.3, "frequency": 1},
                          "white": {"acc1": 0.1, "frequency": 0}},
            "zero_frequency": {"classes": ["white"], "mean_acc1": 0.1}}


@pytest.fixture()
def inputs(tmp_path):
    a = tmp_path / "results-a.json"
    a.write_text(json.dumps({"model": "runs/alpha/checkpoints/step-10/model", "results": {
        "zs": {"acc1": 0.8125, "acc5": 1.0, "mean_per_class_recall": 0.75},
        "fs": _few_shot(0.5), "lt": _long_tail(0.2)}}))
    b = tmp_path / "results-b.json"
    b.write_text(json.dumps({"model": "tiny-clip", "results": {
        "zs": {"acc1": 0.25, "acc5": 0.625, "mean_per_class_recall": 0.3},
        "fs": _few_shot(0.2), "lt": _long_tail(0.05),
        "ret": {"image_retrieval_recall@1": 0.375}}}))
    run = tmp_path / "run-x"
    run.mkdir()
    (run / "config.yaml").write_text("train: {epochs: 1}\n")
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 4.0 / s, "lr": 1e-3 * s, "logit_scale": 14.0 + s}) + "\n"
        for s in (1, 2, 3)))
    (run / "results.json").write_text(json.dumps(
        {"train": {"loss": 1.5}, "evals": {"zs": {"acc1": 0.5}}, "model_dir": "x",
         "wall_time_s": 123.45}))
    return [a, b, run]


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.images, self.stack = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "img", "br", "hr", "link"):  # void elements have no end tag
            self.stack.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] in ("td", "th"):
            self.cells.append(data)


def test_report_tables_plots_and_html(tmp_path, inputs, capsys):
    out = tmp_path / "report"
    (tmp_path / "r.yaml").write_text("title: from the file\nplots: true\n")
    assert main(["report", "--out", str(out), "--no-progress", "--inputs", *map(str, inputs),
                 "--config", str(tmp_path / "r.yaml"), "title=two models"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"(3 plot(s) in {out / 'plots'})")
    # tables only: no plots folder, and none named (it named a folder it never made)
    assert main(["report", "--out", str(tmp_path / "tables"), "--no-progress", "--inputs",
                 *map(str, inputs), "plots=false"]) == 0
    assert capsys.readouterr().out.strip().endswith("(no plots)")
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["report.html",
                                                                        "report.md"]
    md = (out / "report.md").read_text()
    assert md.startswith("<!-- written by cliplab report -->\n# two models")  # the mark: see
    # test_output_safety (a report.md of the user's is never taken for a previous report)
    # one column per model, rows of metrics, values as written
    assert "| metric | alpha/step-10 | tiny-clip | run-x |" in md
    assert "created" not in md  # records written before they carried it: nothing to name
    assert "| acc1 | 0.8125 | 0.2500 | 0.5000 |" in md
    assert "| image_retrieval_recall@1 | 0.3750 |" in md  # a task only one model has
    assert "| ncm_4shot | 0.6000 ± 0.0200 | 0.3000 ± 0.0200 |" in md
    assert "| fit.slope | 0.2000 | 0.0500 |" in md
    assert "| wall_time_s | 123.5 |" in md
    assert "| logit_scale | 17.0000 |" in md  # last logged training step
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["few-shot-fs.png", "long-tail-lt.png", "training-curves.png"]
    for name in pngs:
        with Image.open(out / "plots" / name) as im:
            im.verify()
            assert im.format == "PNG"
        assert f"(plots/{name})" in md

    parser = _Tables()
    parser.feed((out / "report.html").read_text())
    parser.close()
    assert not parser.stack  # every tag closed
    assert "0.8125" in parser.cells and "0.6000 ± 0.0200" in parser.cells
    assert len(parser.images) == 3 and all(s.startswith("data:image/png;base64,")
                                           for s in parser.images)

    # the same folder rewritten without the run: its training curves do not linger as current,
    # and a file of the user's in plots/ (a PNG too) stays
    (out / "plots" / "notes.txt").write_text("mine")
    (out / "plots" / "mine.png").write_bytes(b"my figure")
    assert main(["report", "--out", str(out), "--no-progress", "--inputs",
                 *map(str, inputs[:2])]) == 0
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "few-shot-fs.png", "long-tail-lt.png", "mine.png", "notes.txt"]


def test_a_report_stopped_after_its_plots_is_finished_by_the_same_command(tmp_path, inputs,
                                                                          monkeypatch):
    """A stop (Ctrl-C, a kill) after the plots were drawn left `plots/` without a report.md,
    and the same command then refused the folder as holding other files."""
    import cliplab.evaluate.report as report

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "render_markdown", stop)
    command = ["report", "--out", str(tmp_path / "r"), "--no-progress", "--inputs",
               *map(str, inputs)]
    assert main(command) == 130  # "cliplab: interrupted"
    assert any((tmp_path / "r" / "plots").glob("*.png"))
    assert "stopped while it was written" in (tmp_path / "r" / "report.md").read_text()
    monkeypatch.undo()
    assert main(command) == 0
    assert "| acc1 | 0.8125 |" in (tmp_path / "r" / "report.md").read_text()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["plots", "report.html",
                                                                  "report.md"]

def test_flatten_and_format():
    flat = flatten_metrics({"a": {"b": 1, "c": [1, 2], "d": "x", "e": None},
                            "k": {"acc1_mean": 0.5, "acc1_std": 0.1}, "f": True})
    assert flat == {"a.b": 1, "a.e": None, "k": (0.5, 0.1)}
    assert [format_value(v) for v in (3, 0.123456, 1234.56, None, (0.5, 0.25))] == \
        ["3", "0.1235", "1234.6", "—", "0.5000 ± 0.2500"]
    # a last learning rate read "0.0000"; zero and 0.0005 keep the 4 decimals
    assert [format_value(v) for v in (3.58e-07, -2e-5, 0.0, 0.0005, 0.00049)] == \
        ["3.58e-07", "-2e-05", "0.0000", "0.0005", "0.00049"]


def test_report_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": {')
    assert main(["report", "--inputs", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cliplab: error: {bad}: invalid JSON") and "\n" not in err
    # a key=value word among the inputs is an override (anywhere, as for every command)...
    assert main(["report", "--out", str(tmp_path / "o"), "--inputs", "titel=x", str(bad)]) == 2
    assert "unknown key titel" in capsys.readouterr().err
    # ...unless a file of that name exists: then it is an input
    (tmp_path / "title=x").write_text('{"results": {')
    assert main(["report", "--out", str(tmp_path / "o"), "--inputs",
                 str(tmp_path / "title=x")]) == 2
    assert f"{tmp_path / 'title=x'}: invalid JSON" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path / "o")]) == 2
    assert "say what to report: --inputs" in capsys.readouterr().err
    assert main(["report", "titel=x", "--out", str(tmp_path / "o"), "--inputs", str(bad)]) == 2
    assert "unknown key titel (valid: inputs, names, out, plots, title)" in \
        capsys.readouterr().err
    # it names every kind of input --help lists (merge output folders were left out)
    with pytest.raises(DataError, match=r"report input .*nope.json does not exist; give "
                       r"results JSON files \(cliplab eval --out\), run folders or merge "
                       r"output folders \(merge.json\)$"):
        write_report([tmp_path / "nope.json"], tmp_path / "o")
    with pytest.raises(DataError, match="needs at least one results file, run folder or "
                       "merge output folder$"):
        read_inputs([])
    # one input twice made two identical columns, as if two runs agreed
    with pytest.raises(DataError, match=r"report input \./bad\.json is given twice \(as "
                       rf"{re.escape(str(bad))} too\)"):
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(tmp_path)
            write_report([bad, "./bad.json"], tmp_path / "o")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(DataError, match=r"folder .*run has neither results.json nor "
                       r"metrics.jsonl \(a run folder\) nor merge.json \(a merge's output\)"):
        write_report([run], tmp_path / "o")
    merged = tmp_path / "merged"  # a merge's output folder: its record says what it should be
    merged.mkdir()
    (merged / "merge.json").write_text("{cut")
    with pytest.raises(DataError, match=r"merged/merge.json: invalid JSON \(.*\); expected the "
                       r"merge.json `cliplab merge` writes$"):
        write_report([merged], tmp_path / "o")
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(DataError, match="metrics.jsonl:line 2: invalid JSON"):
        write_report([run], tmp_path / "o")
    # a last line cut off (a run killed while logging) is left out, said once; the run reports
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
                                       '{"step": 3, "lo')
    capsys.readouterr()
    write_report([run], tmp_path / "cut", progress=False)
    assert capsys.readouterr().err == (f"report: {run / 'metrics.jsonl'}:line 3 is cut off (the "
                                       "run stopped while writing it); left out\n")
    assert "| loss | 1.5000 |" in (tmp_path / "cut" / "report.md").read_text()
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="list.json: expected a JSON object"):
        write_report([tmp_path / "list.json"], tmp_path / "o")
    (tmp_path / "empty.json").write_text('{"model": "m"}')
    with pytest.raises(DataError, match="empty.json: no metrics found"):
        write_report([tmp_path / "empty.json"], tmp_path / "o")


def test_report_from_a_real_pretrain_run(tmp_path, tiny_model):
    """A run folder written by `cliplab pretrain` (a few steps) reports its curves, and names
    the cliplab that wrote its results.json and when."""
    from cliplab.train.pretrain import run_pretrain

    started = now()
    returned = run_pretrain({"model": {"name": "tiny-clip",
                            "options": {"image_size": 32, "patch_size": 16, "width": 32,
                                        "layers": 1, "heads": 2, "embed_dim": 16}},
                  "data": {"train": {"source": "shapes", "n": 64, "image_size": 32}},
                  "train": {"steps": 4, "batch_size": 16, "log_every": 1, "augment": False},
                  "eval": {"tasks": [{"name": "colour", "task": "zeroshot",
                                      "data": {"source": "shapes", "attribute": "color",
                                               "n": 32, "image_size": 32}}]},
                  "out": str(tmp_path / "run")}, progress=False)
    finished = now()
    written = write_report([tmp_path / "run"], tmp_path / "rep", progress=False)
    md = written["markdown"].read_text(encoding="utf-8")
    results = json.loads((tmp_path / "run" / "results.json").read_text(encoding="utf-8"))
    assert_stamped(results, started, finished)
    assert returned["created"] == results["created"]  # what it returns is what it wrote
    provenance = f"(cliplab {results['cliplab_version']}, created {results['created']})"
    assert provenance in md and provenance in written["html"].read_text(encoding="utf-8")
    assert f"| acc1 | {results['evals']['colour']['acc1']:.4f} |" in md
    assert "| step | 4 |" in md
    assert (tmp_path / "rep" / "plots" / "training-curves.png").is_file()


def test_a_results_file_is_named_after_its_folder_when_its_name_says_nothing(tmp_path):
    from cliplab.evaluate.report_inputs import read_inputs

    for run in ("baseline", "tuned"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "results.json").write_text(json.dumps({"zs": {"acc1": 0.5}}))
    (tmp_path / "ablation.json").write_text(json.dumps({"zs": {"acc1": 0.4}}))
    sources = read_inputs([tmp_path / "baseline" / "results.json",
                           tmp_path / "tuned" / "results.json", tmp_path / "ablation.json"])
    assert [s.label for s in sources] == ["baseline", "tuned", "ablation"]


def test_a_reduced_precision_eval_is_labelled_with_it(tmp_path):
    from cliplab.evaluate.report_inputs import read_inputs

    for precision in ("fp32", "bf16"):
        (tmp_path / f"{precision}.json").write_text(json.dumps(
            {"model": "runs/base/checkpoints/step-8/model", "precision": precision,
             "results": {"zs": {"acc1": 0.5}}}))
    sources = read_inputs([tmp_path / "fp32.json", tmp_path / "bf16.json"])
    assert [s.label for s in sources] == ["base/step-8", "base/step-8 [bf16]"]
    # a run trained in bf16 whose evals ran in the suite's fp32 is labelled by its evals
    for run, scored in (("bf16-trained", "fp32"), ("all-bf16", "bf16")):
        (tmp_path / run).mkdir()
        (tmp_path / run / "results.json").write_text(json.dumps(
            {"evals": {"zs": {"acc1": 0.5}}, "precision": "bf16", "eval_precision": scored}))
    sources = read_inputs([tmp_path / "bf16-trained", tmp_path / "all-bf16"])
    assert [s.label for s in sources] == ["bf16-trained", "all-bf16 [bf16]"]


def test_an_eval_or_adapt_out_folder_is_labelled_as_its_results_file(tmp_path):
    """README: columns are labelled by model; an eval/adapt --out folder was labelled by its
    folder name (its results.json by model); a training run, whose results name no model,
    keeps its folder's name."""
    from cliplab.evaluate.report_inputs import read_inputs

    model = "runs/base/checkpoints/step-8/model"
    for name, data in (("ev", {"model": model, "precision": "fp32",
                               "results": {"zs": {"acc1": 0.5}}}),
                       ("ad", {"method": "finetune", "model": model, "test": {"acc1": 0.6}}),
                       ("run", {"train": {"step": 3, "loss": 1.0}, "evals": {}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
    sources = read_inputs([tmp_path / "ev", tmp_path / "ad", tmp_path / "run"])
    assert [s.label for s in sources] == ["base/step-8", "finetune (base/step-8)", "run"]
    assert sources[0].sections == read_inputs([tmp_path / "ev" / "results.json"])[0].sections



def _blue_pixels(path, right_half: bool = False) -> int:
    """Pixels near matplotlib's first line colour (C0, #1f77b4) in a plot (or its right half)."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        if right_half:
            rgb = rgb.crop((rgb.width // 2, 0, rgb.width, rgb.height))
        return sum(1 for r, g, b in rgb.getdata()
                   if abs(r - 0x1f) < 40 and abs(g - 0x77) < 40 and abs(b - 0xb4) < 40)


def test_a_run_with_one_logged_step_draws_its_point(tmp_path):
    """A one-record metrics.jsonl draws a dot on each curve (a line of one point drew
    nothing: the plot was empty)."""
    run = tmp_path / "short"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 2.0, "lr": 1e-3}) + "\n")
    out = tmp_path / "report"
    assert main(["report", "--out", str(out), "--no-progress", "--inputs", str(run)]) == 0
    # the lr panel (right; the loss panel's legend has a blue sample line of its own)
    assert _blue_pixels(out / "plots" / "training-curves.png", right_half=True) > 10


def test_a_wise_ft_sweep_gets_a_table_and_an_accuracy_vs_alpha_plot(tmp_path):
    rows = [{"alpha": a, "test": {"acc1": 0.5 + 0.2 * a, "acc5": 1.0},
             "shifted": {"acc1": 0.4 + a * (1 - a)}} for a in (0.0, 0.5, 1.0)]
    res = tmp_path / "wise" / "results.json"
    res.parent.mkdir()
    res.write_text(json.dumps({"method": "wise-ft", "sweep": rows, "best_alpha": 0.5,
                               "test": rows[1]["test"], "shifted": rows[1]["shifted"]}))
    out = tmp_path / "report"
    assert main(["report", "--out", str(out), "--no-progress", "--inputs", str(res)]) == 0
    md = (out / "report.md").read_text()
    assert "## sweep" in md
    assert "| α 0.5.test | 0.6000 |" in md and "| α 0.5.shifted | 0.6500 |" in md
    assert "| α 1.test | 0.7000 |" in md and "| best_alpha | 0.5000 |" in md
    plot = out / "plots" / "alpha-sweep-sweep.png"
    assert "(plots/alpha-sweep-sweep.png)" in md and _blue_pixels(plot) > 20


def test_a_run_ending_in_an_eval_record_still_reports_its_last_training_values(tmp_path):
    """The training table takes each metric's last logged value, not the last record's keys
    alone (a run's final record is often its eval: no loss, lr or logit_scale)."""
    run = tmp_path / "run-e"
    run.mkdir()
    records = [{"step": 1, "loss": 3.0, "lr": 1e-3, "logit_scale": 14.0},
               {"step": 2, "loss": 2.5, "lr": 2e-3, "logit_scale": 15.0},
               {"step": 2, "eval/zs/acc1": 0.625},
               {"step": 2, "eval/zs/acc1": None}]  # a null hides no number
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    md = write_report([run], tmp_path / "rep", {"plots": False}, progress=False)[
        "markdown"].read_text()
    assert "## training (last logged value of each metric)" in md
    for row in ("| step | 2 |", "| loss | 2.5000 |", "| lr | 0.0020 |",
                "| logit_scale | 15.0000 |", "| eval/zs/acc1 | 0.6250 |"):
        assert row in md


def test_hyper_parameters_and_skip_records_are_no_metric_tables(tmp_path):
    """A pretrain run's results.json (train record, skip record) and an adapt result (options)
    give tables of metrics only: the skip total is a number of the run, adapt's options are
    not a task, and a run folder's last training record is in the training table once."""
    from cliplab.evaluate.report_inputs import read_input

    run = tmp_path / "pre"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({
        "train": {"step": 4, "loss": 2.0}, "evals": {"zs": {"acc1": 0.5}},
        "skipped": {"total": 3, "counts": {"missing_file": 3}, "keys": {"missing_file": ["a"]}},
        "model_dir": "pre/checkpoints/step-4/model", "wall_time_s": 9.0}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 2.0}) + "\n")
    assert read_input(run).sections == {"zs": {"acc1": 0.5},
                                        "run": {"skipped": 3, "wall_time_s": 9.0}}
    # an eval task named "train" is a task: only the file's own last training record goes
    results = json.loads((run / "results.json").read_text())
    results["evals"]["train"] = {"acc1": 0.9}
    (run / "results.json").write_text(json.dumps(results))
    assert read_input(run).sections["train"] == {"acc1": 0.9}
    adapt = tmp_path / "tip.json"
    adapt.write_text(json.dumps({"method": "tip-adapter", "shots": 2, "options": {
        "alpha": 1.0, "names": "prompt", "search": False}, "test": {"acc1": 0.6},
        "zeroshot": {"acc1": 0.55}}))
    assert read_input(adapt).sections == {"test": {"acc1": 0.6}, "zeroshot": {"acc1": 0.55},
                                          "run": {"shots": 2}}
    # numbers straight under results (no task level) are the run's, as the error message
    # for a file without metrics promises; they were dropped and the file refused
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"results": {"acc1": 0.5, "note": "x", "ok": True}, "n": 3}))
    assert read_input(flat).sections == {"run": {"acc1": 0.5, "n": 3}}


def test_labels_stay_unique_and_name_the_method(tmp_path):
    """Inputs labelled a, a, a#2 kept two columns called a#2 (one model's numbers lost); an
    adapt result is labelled by its method on its model, a merge by its method."""
    from cliplab.evaluate.report_inputs import read_inputs

    paths = []
    for n, folder in enumerate(("p/a", "q/a", "r/a#2")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "results.json").write_text(json.dumps({"zs": {"acc1": n / 10}}))
        paths.append(tmp_path / folder / "results.json")
    sources = read_inputs(paths)
    assert [s.label for s in sources] == ["a", "a#2", "a#2#2"]
    assert [s.sections["zs"]["acc1"] for s in sources] == [0.0, 0.1, 0.2]
    model = "runs/base/checkpoints/step-8/model"
    for method in ("linear-probe", "tip-adapter"):
        (tmp_path / f"{method}.json").write_text(json.dumps(
            {"method": method, "model": model, "test": {"acc1": 0.5}}))
    (tmp_path / "merge.json").write_text(json.dumps(
        {"method": "greedy", "models": [model, "runs/ft/checkpoints/step-4/model"],
         "origin": {"path": model, "fingerprint": "00"},
         "heldout": {"task": {"task": "zeroshot", "data": {"source": "shapes", "limit": 50}},
                     "metric": "acc1", "scores": {model: 0.4, "runs/ft/checkpoints/step-4/model": 0.6},
                     "merged": 0.7}, "wall_time_s": 1.0}))
    sources = read_inputs([tmp_path / "linear-probe.json", tmp_path / "tip-adapter.json",
                           tmp_path / "merge.json"])
    assert [s.label for s in sources] == ["linear-probe (base/step-8)", "tip-adapter (base/step-8)",
                                          "greedy merge"]
    assert sources[2].sections == {"heldout acc1": {"base/step-8": 0.4, "ft/step-4": 0.6,
                                                    "merged": 0.7},
                                   "run": {"wall_time_s": 1.0}}
    # the merged model's folder (merge.json beside its weights) reads as its merge.json
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    shutil.copy(tmp_path / "merge.json", merged / "merge.json")
    folder, = read_inputs([merged])
    assert (folder.label, folder.sections) == ("greedy merge", sources[2].sections)


def test_a_task_named_run_keeps_its_metrics_and_plots_get_a_file_each(tmp_path):
    """A task named "run" was replaced by the file's top-level numbers; sections named alike
    once slugged ("Few shot", "few-shot") drew into one plot file."""
    from cliplab.evaluate.report_inputs import read_input

    few_shot = {f"linear_probe_{k}shot": {"acc1_mean": acc, "acc1_std": 0.01}
                for k, acc in ((1, 0.3), (4, 0.5), (16, 0.7))}
    data = {"results": {"run": {"acc1": 0.9}, "Few shot": few_shot, "few-shot": few_shot,
                        "few shot": few_shot}, "wall": 3}
    (tmp_path / "r.json").write_text(json.dumps(data))
    sections = read_input(tmp_path / "r.json").sections
    assert sections["run"] == {"acc1": 0.9} and sections["run (numbers)"] == {"wall": 3}
    write_report([tmp_path / "r.json"], tmp_path / "out", progress=False)
    plots = sorted(p.name for p in (tmp_path / "out" / "plots").glob("few-shot-*.png"))
    assert len(plots) == 3, plots
    md = (tmp_path / "out" / "report.md").read_text()
    assert all(f"plots/{name}" in md for name in plots)


def test_a_metrics_file_that_is_no_utf8_is_one_line(tmp_path):
    from cliplab.evaluate.report_inputs import read_input

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="metrics.jsonl: not UTF-8 text"):
        read_input(tmp_path / "run")


def test_a_run_folders_config_is_not_read(tmp_path):
    """Only results.json and metrics.jsonl make the report; a config.yaml that does not parse
    (never shown) failed it."""
    from cliplab.evaluate.report_inputs import read_input

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({"zs": {"acc1": 0.5}}))
    (tmp_path / "run" / "config.yaml").write_text("train: [unclosed\n")
    assert read_input(tmp_path / "run").sections == {"zs": {"acc1": 0.5}}


def test_a_few_shot_task_whose_data_skipped_samples_still_gets_its_plot(tmp_path):
    """An eval whose data skipped samples adds a skip record to each task's results: the
    few-shot section then got no plot at all."""
    skipped = {"total": 2, "reasons": {"unreadable_image": 2}}
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"results": {"fs": {**_few_shot(0.5), "skipped": skipped}}}))
    assert main(["report", "--out", str(tmp_path / "out"), "--no-progress", "--inputs",
                 str(res)]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    plot = tmp_path / "out" / "plots" / "few-shot-fs.png"
    assert "(plots/few-shot-fs.png)" in md and _blue_pixels(plot) > 20
    assert "| skipped.total | 2 |" in md


def test_a_few_shot_task_gets_its_plot_and_a_row_of_its_test_images(tmp_path):
    """A few-shot result says how many test images it is over (``n``): its table shows the
    count beside the accuracies and its plot draws the accuracies only."""
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"results": {"fs": {**_few_shot(0.5), "n": 540}}}))
    assert main(["report", "--out", str(tmp_path / "out"), "--no-progress", "--inputs",
                 str(res)]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    plot = tmp_path / "out" / "plots" / "few-shot-fs.png"
    assert "(plots/few-shot-fs.png)" in md and _blue_pixels(plot) > 20
    assert "| n | 540 |" in md


def test_few_shot_curves_run_in_order_of_shots(tmp_path, monkeypatch):
    """Results keyed 16, 1, 4 shots drew a zig-zag."""
    import matplotlib.axes

    from cliplab.evaluate.report_plots import plot_few_shot

    drawn, real = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, **kw: drawn.append((tuple(x), tuple(y))) or
                        real(self, x, y, **kw))
    metrics = {f"ncm_{k}shot": {"acc1_mean": acc, "acc1_std": 0.01}
               for k, acc in ((16, 0.7), (1, 0.3), (4, 0.5))}
    plot_few_shot("fs", [("m", metrics)], tmp_path / "fs.png")
    assert drawn == [((1, 4, 16), (0.3, 0.5, 0.7))]


def test_a_section_a_sweep_in_one_input_only_gets_a_table_and_no_alpha_plot(tmp_path):
    rows = [{"alpha": a, "test": {"acc1": 0.5 + 0.2 * a}} for a in (0.0, 1.0)]
    wise = tmp_path / "wise.json"
    wise.write_text(json.dumps({"method": "wise-ft", "sweep": rows}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"results": {"sweep": {"acc1": 0.6}}}))
    assert main(["report", "--out", str(tmp_path / "out"), "--no-progress", "--inputs",
                 str(wise), str(other)]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## sweep" in md and "| acc1 | — | 0.6000 |" in md
    assert not list((tmp_path / "out").glob("plots/alpha-sweep-*.png"))


def test_more_names_than_inputs_is_refused(tmp_path):
    from cliplab.evaluate.report_inputs import read_inputs

    (tmp_path / "r.json").write_text(json.dumps({"results": {"zs": {"acc1": 0.5}}}))
    for names in (["a", "b"], []):
        with pytest.raises(DataError, match=f"^{len(names)} names for 1 report inputs$"):
            read_inputs([tmp_path / "r.json"], names)


def test_files_that_are_no_cliplab_results_are_refused_naming_them(tmp_path, tiny_model_dir,
                                                                   capsys):
    """`{"foo": 1}` and a model's config.json made a report (a "run" table of foo | 1), and a
    metrics.jsonl record with a step that is no number was taken as it was."""
    kinds = ("the results JSON of `cliplab eval --out`, a run's results.json (pretrain, adapt, "
             "quickstart), a merge.json or a benchmark's results")
    foo = tmp_path / "x.json"
    foo.write_text('{"foo": 1}')
    config = tiny_model_dir / "config.json"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": "x", "loss": 1.0}\n')
    for path, message in [
            (foo, f"{foo}: not a cliplab results file (no metrics table, only the keys foo); "
                  f"expected {kinds}"),
            (config, f"{config}: a model's config (model_type: 'clip'), not results; expected "
                     f"{kinds}"),
            (run, f"{run / 'metrics.jsonl'}:line 2: step \"x\"; a run's metrics.jsonl logs "
                  "each record with its step, a whole number from 0")]:
        assert main(["report", "--inputs", str(path), "--out", str(tmp_path / "r"),
                     "--no-progress"]) == 2
        assert capsys.readouterr().err == f"cliplab: error: {message}\n"
        assert not (tmp_path / "r").exists()
    (run / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:line 1: no step; "):
        write_report([run], tmp_path / "r")


@pytest.mark.parametrize("data", [
    {"method": "uniform", "models": ["a", "b"], "base": None, "origin": {"unrecorded": []},
     "heldout": None, "wall_time_s": 1.0},  # a merge without held-out scores
    {"precision": "fp32", "batch": 128, "images_per_s": 34.5, "runs": [39.8, 33.5]},  # a row
    {"zs": {"acc1": 0.5}}, {"results": {"acc1": 0.5}}, {"model": "m", "acc1": 0.5},
])
def test_results_of_every_kind_cliplab_writes_still_report(data, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(data))
    assert main(["report", "--inputs", str(tmp_path / "r.json"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0


def test_a_folder_and_its_own_results_file_are_one_input(tmp_path):
    """An eval --out folder reads as its results.json and a merge's output as its merge.json:
    given with that file, the report had two identical columns."""
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "results.json").write_text(json.dumps({"results": {"zs": {"acc1": 0.5}}}))
    for inputs in ([ev, ev / "results.json"], [ev / "results.json", ev]):
        with pytest.raises(DataError, match=r"^report input .* is given twice \(as .* too, one "
                                            r"folder's results\); give each results file"):
            write_report(inputs, tmp_path / "o")
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "merge.json").write_text(json.dumps({"method": "uniform", "heldout": {
        "metric": "acc1", "scores": {"a": 0.4}, "merged": 0.5}}))
    with pytest.raises(DataError, match="is given twice"):
        write_report([merged, merged / "merge.json"], tmp_path / "o")
    # another folder's results.json, and a results file of another name, are other inputs
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"results": {"zs": {"acc1": 0.7}}}))
    (ev / "copy.json").write_text((ev / "results.json").read_text())
    write_report([ev, other / "results.json", ev / "copy.json"], tmp_path / "o")
    assert (tmp_path / "o" / "report.md").is_file()


def test_a_run_that_has_logged_nothing_yet_is_refused_like_an_empty_results_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match=r"^.*run/metrics.jsonl: no record yet \(a run that has "
                                        r"just started\) and no results.json beside it"):
        write_report([run], tmp_path / "o")
    assert not (tmp_path / "o").exists()
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 2.5}\n')  # one record: reported
    write_report([run], tmp_path / "o")
    assert "2.5" in (tmp_path / "o" / "report.md").read_text()


def test_a_run_without_results_says_so_beside_a_finished_one(tmp_path, capsys):
    """A stopped run's final evaluation is missing from the task tables: the report said
    nothing and its column was simply absent. Its input line says why, as does stderr."""
    stopped, done = tmp_path / "stopped", tmp_path / "done"
    bare = tmp_path / "bare"  # a Python Trainer's folder: no config.yaml, never results.json
    for run in (stopped, done, bare):
        run.mkdir()
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    for run in (stopped, done):
        (run / "config.yaml").write_text("model: tiny-clip\n")
    (done / "results.json").write_text(json.dumps({"results": {"zs": {"acc1": 0.7}}}))
    write_report([stopped, done, bare], tmp_path / "o")
    markdown = (tmp_path / "o" / "report.md").read_text()
    assert "- **stopped**: `" + str(stopped) + "` (no results.json: the run stopped" in markdown
    assert "- **done**: `" + str(done) + "`\n" in markdown
    assert "(no results.json: the run stopped" in (tmp_path / "o" / "report.html").read_text()
    assert "- **bare**: `" + str(bare) + "`\n" in markdown
    err = capsys.readouterr().err
    assert f"report: {stopped}: no results.json" in err and str(bare) not in err


def test_a_task_the_inputs_ran_differently_says_how_above_its_table(tmp_path):
    """Two results of task `fs` over 500 and 100 test images, other seeds: set side by side
    as one comparison without a word."""
    def results(name: str, limit: int, seeds: list[int]):
        path = tmp_path / f"{name}.json"
        spec = {"task": "few_shot", "name": "fs", "seeds": seeds, "features": "embeddings",
                "test": {"source": "fashion-mnist", "split": "test", "limit": limit}}
        other = {"task": "zeroshot", "name": "zs", "data": {"source": "digits"}}
        path.write_text(json.dumps({"model": name, "suite_ran": {"tasks": [spec, other]},
                                    "results": {"fs": _few_shot(0.5), "zs": {"acc1": 0.5}}}))
        return path

    folder = tmp_path / "b-out"  # an eval --out folder, read as its results.json
    folder.mkdir()
    results("b", 100, [5]).rename(folder / "results.json")
    assert main(["report", "--out", str(tmp_path / "out"), "--no-progress", "--inputs",
                 str(results("a", 500, [0, 1, 2])), str(folder)]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert ("## fs\n\nNote: the inputs ran fs differently (a, b): seeds: \\[0, 1, 2\\] / \\[5\\]; "
            "test.limit: 500 / 100\n") in md
    assert "## zs\n\n| metric" in md  # alike: no note
    assert "<p>Note: the inputs ran fs differently" in \
        (tmp_path / "out" / "report.html").read_text()


def test_a_task_scored_by_a_head_in_one_input_and_by_prompts_in_another_says_so(tmp_path):
    """A fine-tuned folder's zero-shot task is scored by its head.safetensors, its export's by
    the text prompts (an export holds the towers only): the table set them side by side as
    one comparison, the difference dropped with the results' text values."""
    def results(name: str, classifier: str | None):
        path = tmp_path / f"{name}.json"
        zs = {"acc1": 0.9, **({"classifier": classifier} if classifier else {})}
        path.write_text(json.dumps({"model": name, "results": {"zs": zs, "lp": {"acc1": 0.5}}}))
        return str(path)

    inputs = [results("merged", "runs/merged/head.safetensors"), results("onnx", None),
              results("back", None)]
    assert main(["report", "--out", str(tmp_path / "out"), "--no-progress", "--inputs",
                 *inputs]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert ("## zs\n\nNote: zs was scored by a classifier head in merged "
            "(runs/merged/head.safetensors), by the text prompts in onnx, back\n") in md
    assert "## lp\n\n| metric" in md  # no input has a head: no note
    write_report([inputs[0], results("soup", "runs/soup/head.safetensors")], tmp_path / "same")
    assert "Note:" not in (tmp_path / "same" / "report.md").read_text()  # all by a head


def test_dollar_signs_in_labels_tasks_and_classes_are_drawn_as_written(tmp_path):
    """``$x_$`` in a label, task or class name crashed the plots (matplotlib's mathtext) and
    left a half report; every plot now draws such text as written."""
    import matplotlib
    from matplotlib.text import Text

    drawn: list[str] = []
    real_draw = Text.draw

    def draw(self, renderer):
        if not self.get_parse_math():  # drawn as written, not as math
            drawn.append(self.get_text())
        return real_draw(self, renderer)

    lt = _long_tail(0.2)
    lt["per_class"]["$c_$ bill"] = {"acc1": 0.4, "frequency": 20}
    paths = []
    for n in range(2):
        path = tmp_path / f"r{n}.json"
        path.write_text(json.dumps({"model": f"m{n}", "results": {
            "fs $y_$": _few_shot(0.3), "lt": lt}}))
        paths.append(path)
    run = tmp_path / "$r_$"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    out = tmp_path / "report"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Text, "draw", draw)
        write_report([*paths, run], out, {"names": ["price $a_$ x", "$\\alpha$", "run"]},
                     progress=False)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "stopped" not in md and len(list((out / "plots").glob("*.png"))) == 3
    for text in ("price $a_$ x · ncm", "$\\alpha$ · ncm", "few-shot: fs $y_$", "$c_$ bill"):
        assert any(text in t for t in drawn), text
    assert matplotlib.rcParams["text.parse_math"]  # the user's own setting is left alone


def test_labels_starting_with_an_underscore_stay_in_every_legend(tmp_path):
    """matplotlib leaves labels starting with ``_`` out of a legend: an input named
    ``_baseline`` (or a run folder ``_tmp_run``) was drawn but had no legend entry."""
    from matplotlib.axes import Axes

    shown: list[str] = []
    real_legend = Axes.legend

    def legend(self, *args, **kwargs):
        made = real_legend(self, *args, **kwargs)
        shown.extend(t.get_text().lstrip("\u200b") for t in made.get_texts())
        return made

    rows = [{"alpha": a, "test": {"acc1": 0.5 + 0.2 * a}} for a in (0.0, 1.0)]
    paths = []
    for n in range(2):
        path = tmp_path / f"r{n}.json"
        path.write_text(json.dumps({"model": f"m{n}", "results": {
            "fs": _few_shot(0.3), "lt": _long_tail(0.1)}}))
        paths.append(path)
    wise = tmp_path / "wise.json"
    wise.write_text(json.dumps({"method": "wise-ft", "sweep": rows}))
    run = tmp_path / "_tmp_run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Axes, "legend", legend)
        write_report([*paths, wise, run], tmp_path / "report",
                     {"names": ["plain", "_baseline", "_wise", "_tmp_run"]}, progress=False)
    assert "_baseline · ncm" in shown and "_wise · test" in shown and "_tmp_run" in shown
    assert any(t.startswith("_baseline (slope") for t in shown)


def test_report_md_shows_labels_tasks_classes_and_notes_as_written(tmp_path):
    """report.md escaped only ``|``: a label ``<script>`` rendered as markup, backticks as code,
    ``&amp;`` as ``&``, and a task named ``fs [v2]] x`` broke its plot's image link."""
    import html as html_module

    from markdown_it import MarkdownIt

    task, klass, label = "fs [v2]] x", "<b>bold</b>|`tick`&amp;", "<script>s</script> `c` *e*"
    lt = _long_tail(0.2)
    lt["per_class"][klass] = {"acc1": 0.4, "frequency": 20}
    paths = []
    for n, limit in enumerate((5, 6)):
        path = tmp_path / f"r`{n}.json"
        path.write_text(json.dumps({"model": f"m{n}", "results": {task: _few_shot(0.3), "lt": lt},
                                    "suite_ran": {"tasks": [{"name": "lt", "limit": limit,
                                                            "note": f"<x> `y` {n}"}]}}))
        paths.append(path)
    out = tmp_path / "report"
    write_report(paths, out, {"names": [label, "_a_"], "title": "T <i>x</i> & `y`"},
                 progress=False)
    md = (out / "report.md").read_text(encoding="utf-8")
    rendered = MarkdownIt("commonmark", {"html": True}).enable(["table"]).render(md)
    assert not re.search(r"<(script|b|i|em)\b", rendered)
    assert rendered.count("<code>") == 2  # the two input paths, backtick and all
    for text in (label, "_a_", f"per_class.{klass}.acc1", "T <i>x</i> & `y`", "<x> `y` 1",
                 "r`0.json"):
        assert html_module.escape(text, quote=False) in rendered, text
    assert len(re.findall(r'<img src="plots/', rendered)) == 2


def test_a_merges_ingredients_whose_paths_end_alike_keep_a_row_each(tmp_path):
    """Two ingredients labelled alike (the last two folder names) were one row: the first
    one's score was lost without a word."""
    from cliplab.evaluate.report_inputs import read_inputs

    a, b = "/x/exp1/runs/ft/model", "/x/exp2/runs/ft/model"
    (tmp_path / "merge.json").write_text(json.dumps(
        {"method": "task_arithmetic", "models": [a, b], "heldout": {
            "task": "zs", "metric": "acc1", "scores": {a: 0.61, b: 0.35, "/merged": 0.1},
            "merged": 0.5}}))
    source, = read_inputs([tmp_path / "merge.json"])
    assert source.sections["heldout acc1"] == {"runs/ft": 0.61, "runs/ft#2": 0.35,
                                               "merged#2": 0.1, "merged": 0.5}


def test_report_html_tables_scroll_in_their_own_box_and_fit_a_phone(tmp_path, inputs):
    """A wide table (many inputs, long labels) made the whole page scroll sideways, and without
    a viewport tag a phone laid the page out at 980 px, scaled down."""
    out = tmp_path / "report"
    write_report(inputs, out, progress=False)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert ".scroll{overflow-x:auto" in page
    tables = page.count("<table>")
    assert tables > 2 and page.count('<div class="scroll"><table>') == tables
    assert page.count("</table></div>") == tables


@pytest.mark.parametrize("plots", ["true", "false"])
def test_an_input_named_with_bytes_that_are_no_utf8_is_reported_with_them_escaped(tmp_path,
                                                                                 plots):
    """A run folder ``run\\xe9bad`` (a Latin-1 name) was a traceback at the very end (from
    matplotlib or the UTF-8 writer), leaving a report.md that said it had stopped."""
    run = tmp_path / os.fsdecode(b"run\xe9bad")
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n', encoding="utf-8")
    (run / "results.json").write_text(json.dumps({"results": {"zs": {"acc1": 0.7}}}),
                                      encoding="utf-8")
    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--no-progress", "--inputs", str(run),
                 f"plots={plots}"]) == 0
    markdown = (out / "report.md").read_text(encoding="utf-8")
    shown = f"{tmp_path}/run\\xe9bad"
    assert "- **run\\\\xe9bad**: `" + shown + "`\n" in markdown
    assert "run\\xe9bad</b>: <code>" + shown in (out / "report.html").read_text(encoding="utf-8")
    assert (out / "plots" / "training-curves.png").is_file() == (plots == "true")


def test_two_dozen_inputs_get_a_look_each_and_a_legend_that_hides_no_curve(tmp_path,
                                                                            monkeypatch):
    """With 24 inputs matplotlib's ten colours repeated (run00 and run10 drew alike) and each
    plot's legend sat on the curves, running off the plot with its last entries cut."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # kept open to look at
    paths = []
    for n in range(24):
        run = tmp_path / f"run{n:02d}"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 4.0 / s + n / 100}) + "\n" for s in (1, 2, 3)),
            encoding="utf-8")
        (run / "results.json").write_text(json.dumps({"model": f"m{n}", "results": {
            "fs": _few_shot(0.01 * n), "lt": _long_tail(0.01 * n)}}), encoding="utf-8")
        paths.append(run)
    write_report(paths, tmp_path / "report", {}, progress=False)
    assert len(figures) == 3  # few-shot, long tail, training curves
    for fig in figures:
        ax = fig.axes[0]
        looks = {(str(line.get_color()), line.get_linestyle()) for line in ax.get_lines()
                 if not line.get_label().startswith("_")}  # a fit line is no entry
        looks |= {(tuple(dots.get_facecolor()[0]), str(dots.get_paths()[0].vertices.tolist()))
                  for dots in ax.collections if type(dots).__name__ == "PathCollection"}
        assert len(looks) == 24, ax.get_title()
        legends = [*fig.legends, *(a.get_legend() for a in fig.axes if a.get_legend())]
        assert len(legends) == 1
        assert len({t.get_text() for t in legends[0].get_texts()}) == 24
        fits = {(str(line.get_color()), line.get_linestyle()) for line in ax.get_lines()
                if line.get_label().startswith("_")}  # the long tail's, one per input
        assert len(fits) == (24 if ax.get_title().startswith("long tail") else 0)
        fig.canvas.draw()
        ticks = [t.get_text() for a in fig.axes for t in a.get_xticklabels()]
        assert ticks and not any("$" in t for t in ticks), ticks  # plain numbers, no math
        box = legends[0].get_window_extent()
        assert not any(box.overlaps(a.get_window_extent()) for a in fig.axes)
        close(fig)


def test_a_log_axis_spanning_less_than_a_decade_labels_its_ticks_in_plain_numbers(tmp_path,
                                                                                    monkeypatch):
    """Log ticks were matplotlib's math (``$\\mathdefault{10^{1}}$``, shown as written with math
    text off); an axis from 20 to 60 labels its minor ticks, which must read as numbers too."""
    import matplotlib.pyplot as plt

    from cliplab.evaluate.report_plots import plot_long_tail

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    metrics = _long_tail(0.1)
    metrics["per_class"] = {c: {"acc1": a, "frequency": f}
                            for c, a, f in (("red", 0.9, 60), ("blue", 0.5, 35), ("green", 0.3, 20))}
    plot_long_tail("lt", [("m", metrics)], tmp_path / "lt.png")
    (fig,) = figures
    fig.canvas.draw()
    low, high = fig.axes[0].get_xlim()
    shown = [t.get_text() for t in fig.axes[0].get_xticklabels(minor=True)
             if t.get_text() and low <= t.get_position()[0] <= high]
    assert shown == ["20", "30", "40", "50", "60"] or shown == ["20", "30", "40", "60"], shown
    close(fig)


def test_per_class_values_follow_the_headline_metrics_and_many_classes_show_their_lowest(
        tmp_path):
    """Per-class rows come after a task's other metrics (``n`` was after 998 of them), and a
    task of more than 40 classes lists only its 10 lowest (by the mean over the inputs), its
    note saying how many there are; a long-tail entry's fields stay together per class."""
    from cliplab.evaluate.report import build_tables
    names = [f"class {i:03d}" for i in range(100)]
    a = {c: 0.5 + i / 1000 for i, c in enumerate(names)}
    b = dict(a, **{"class 050": 0.0, "class 070": 0.2})  # means 0.275 and 0.385
    a["class 099"] = 0.1  # lowest in a alone: mean (0.1 + 0.599) / 2 = 0.3495
    lt = {"fit": {"slope": 0.1}, "per_class": {c: {"acc1": a[c], "frequency": i}
                                               for i, c in enumerate(names)}}
    files = []
    for label, per_class in (("a", a), ("b", b)):
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps({"model": label, "results": {
            "zs": {"acc1": 0.5, "per_class_acc1": per_class, "n": 100}, "lt": lt,
            "small": {"acc1": 0.4, "per_class_acc1": {"cat": 0.2, "dog": 0.6}, "n": 2}}}))
        files.append(path)
    tables = {t.title: t for t in build_tables(read_inputs(files))}
    zs = [metric for metric, _ in tables["zs"].rows]
    assert zs[:2] == ["acc1", "n"]
    lowest = [m.removeprefix("per_class_acc1.") for m in zs[2:]]
    assert lowest == ["class 050", "class 099", "class 070", *names[:7]]
    assert dict(tables["zs"].rows)["per_class_acc1.class 050"] == {"a": 0.55, "b": 0.0}
    assert "per_class_acc1: the 10 lowest of 100 classes" in tables["zs"].note
    assert [m for m, _ in tables["small"].rows] == [
        "acc1", "n", "per_class_acc1.cat", "per_class_acc1.dog"]
    assert tables["small"].note == ""
    lt_rows = [m for m, _ in tables["lt"].rows]
    assert lt_rows[:3] == ["fit.slope", "per_class.class 099.acc1",  # a's acc1: 0.1
                           "per_class.class 099.frequency"]
    assert len(lt_rows) == 1 + 2 * 10
    out = tmp_path / "report"
    write_report(files, out, {"plots": False}, progress=False)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "the 10 lowest of 100 classes" in md and "class 098" not in md
    alone = {t.title: t for t in build_tables(read_inputs(files[:1]))}["zs"]
    assert alone.note == ("per_class_acc1: the 10 lowest of 100 classes; every class is in the "
                          "input's results")  # no "mean over the columns" of one column


def test_per_class_values_of_other_shapes_in_two_inputs_still_report(tmp_path):
    """One input's class holding {acc1, frequency}, another's a number or a list: the report
    stopped with AttributeError ('float' object has no attribute 'get')."""
    from cliplab.evaluate.report import build_tables
    files = []
    for label, value in (("c", {"acc1": 0.5, "frequency": 3}), ("d", 0.4), ("e", [0.4])):
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps({"model": label, "results": {
            "lt": {"acc1": 0.5, "per_class": {"cat": value}}}}))
        files.append(path)
    rows = dict(next(t for t in build_tables(read_inputs(files)) if t.title == "lt").rows)
    assert rows["per_class.cat"] == {"c": None, "d": 0.4, "e": None}
    assert rows["per_class.cat.acc1"] == {"c": 0.5, "d": None, "e": None}
    assert rows["per_class.cat.frequency"] == {"c": 3, "d": None, "e": None}


def test_adapts_classes_short_of_shots_follow_its_scores_cut_as_per_class_values(tmp_path):
    """``fewer_than_shots`` (images of each class short of its shots) was a table of its own,
    one row per class, above the scores and never cut."""
    from cliplab.evaluate.report import build_tables
    short = {f"c{i:02d}": i % 3 for i in range(45)}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"method": "zeroshot", "model": "m", "shots": 4,
                                "test": {"acc1": 0.5, "n": 9}, "fewer_than_shots": short}))
    tables = build_tables(read_inputs([path]))
    assert [t.title for t in tables][0] == "test" and "fewer_than_shots" not in \
        [t.title for t in tables]
    run = next(t for t in tables if t.title == "run")
    listed = [m for m, _ in run.rows if m.startswith("fewer_than_shots.")]
    assert listed == [f"fewer_than_shots.c{i:02d}" for i in range(0, 30, 3)]  # the 0s, in order
    assert "fewer_than_shots: the 10 lowest of 45 classes" in run.note
