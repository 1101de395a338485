"""`cliplab adapt`: the one loop around every method — draw the training set (k shots per
class, a random subset), fit the method, score it and the zero-shot head on the test sets,
write what was learned, ``config.yaml`` and ``results.json``."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from cliplab.adapt import ADAPT_METHODS, AdaptContext, Adapter, get_method
from cliplab.adapt.base import method_options, require_pytorch_model
from cliplab.adapt.common import subsample
from cliplab.adapt.config import AdaptConfig
from cliplab.adapt.featured import streamed_training
from cliplab.adapt.scored import (ListedSet, ScoredSet, check_readable, score_sets,
                                  scored_data)
from cliplab.config import Section, validate
from cliplab.data.pairs import check_same_classes, classes_with_fewer, leave_out_classes
from cliplab.data.listed import ListedImages, ShotDraws, list_source, listed_data
from cliplab.data.sources import as_labelled, filled_spec, load_source, same_images
from cliplab.data.types import LabelledImages
from cliplab.errors import ConfigError, DataError, errors_naming, warn
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.tasks.base import data_origin
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.preprocess import PreprocessConfig
from cliplab.models.presets import PRESETS
from cliplab.models.resolve import load_model, model_record, resolve_model_path
from cliplab.models.spec import ModelSpec
from cliplab.output_folder import check_cache_dir, spec_paths
from cliplab.provenance import stamp
from cliplab.runs import RunDir, check_run_out, default_run_dir, removed_unless_checkpointed


def checked_config(cfg: AdaptConfig | dict, where: str = "the adapt config"
                   ) -> tuple[AdaptConfig, Section]:
    """The config and the method's validated options; every problem is a one-line error
    naming ``where`` and the key path, before any work starts."""
    if not isinstance(cfg, AdaptConfig):
        cfg = validate(AdaptConfig, cfg, where)
    schema = get_method(cfg.method).Options
    try:
        options = method_options(schema, cfg.options, cfg.method, where)
    except ConfigError as err:
        given = cfg.options if isinstance(cfg.options, dict) else {}
        owners = other_methods_keys(set(given) - set(schema.model_fields), cfg.method)
        if not owners:
            raise
        raise ConfigError(f"{err} ({'; '.join(owners)})") from None
    return cfg, options


def other_methods_keys(keys: set[str], method: str) -> list[str]:
    """Which other methods take each of ``keys`` (``rank: an option of lora``): a key of
    another method was only "unknown"."""
    said = []
    for key in sorted(keys):
        takers = [name for name in ADAPT_METHODS
                  if name != method and key in get_method(name).Options.model_fields]
        if takers:
            said.append(f"{key}: an option of {', '.join(takers)}")
    return said


def check_model_found(spec: ModelSpec) -> None:
    """A ``ModelError`` now, before the data is decoded, when ``spec`` is no preset and names
    no model it can be loaded from (a missing folder, a file that is no model, an uncached Hub
    id offline)."""
    if spec.name not in PRESETS:
        resolve_model_path(spec)


def few_shot_split(train: LabelledImages | ListedImages | ShotDraws, shots: int | None,
                   val_shots: int, seed: int) -> tuple[LabelledImages, LabelledImages | None]:
    """``shots`` samples per class (all with 0/None) and, disjoint from them, ``val_shots`` per
    class for validation (None with 0). With all samples and a validation split, the
    validation samples are drawn first and training gets the rest. A listed set
    (`list_source`) decodes only the samples drawn."""
    draws = train if isinstance(train, ShotDraws) else ShotDraws(train, progress=False)
    if not shots:
        if not val_shots:
            return draws.listed.data, None
        val, val_idx = draws.draw(int(val_shots), seed + 1, label="draw data.train val_shots")
        rest = torch.ones(len(draws.listed), dtype=torch.bool)
        rest[val_idx] = False
        return draws.listed.data.subset(rest.nonzero().flatten()), val
    drawn, idx = draws.draw(int(shots), seed, label="draw data.train shots")
    val = None
    if val_shots:
        taken = torch.zeros(len(draws.listed), dtype=torch.bool)
        taken[idx] = True
        if bool((taken | draws.unreadable).all()):
            raise DataError("no training samples are left for the validation split; "
                            "lower shots or set val_shots=0")
        val, _ = draws.draw(int(val_shots), seed + 1, exclude=taken,
                            label="draw data.train val_shots")
    return drawn, val


def check_training_classes(train: LabelledImages, shots: int | None, val_drawn: bool,
                           learns: bool = True, empty: set[str] = frozenset()) -> None:
    """Every class keeps a training image after the split when the method ``learns`` from
    images (a ``DataError`` naming those without, and the ways out: of a class ``empty``
    before any was drawn, leaving it out; of one the validation draw emptied, val_shots); the
    zero-shot head learns nothing from them, so a class without images stays one of its
    classes, as in eval's zero-shot. Classes with fewer than ``shots`` are told on stderr
    (they train on what they have, and "N per class" would not be true of them)."""
    missing = [name for name, _ in classes_with_fewer(train.labels, train.classnames, 1)]
    if missing and learns:
        sets = "data.train and of data.test (and of data.val and data.shifted when given)"
        why = (" after val_shots drew the validation split from it; give more images, or "
               "lower val_shots") if val_drawn and not empty & set(missing) else \
            f"; give images of every class; {leave_out_classes(sets)}; --method zeroshot " \
            "learns from no image and runs with them"
        raise DataError(f"data.train leaves no training image of {len(missing)} class(es) "
                        f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}){why}")
    warn_fewer_than(train, shots, "shots", "training", "train on")


def warn_fewer_than(data: LabelledImages, k: int | None, key: str, split: str,
                    uses: str) -> None:
    """Tell on stderr which classes of ``data`` hold fewer than ``k`` images (``key=k``), so
    "k per class" is never silently untrue of them."""
    short = [f"{name}={n}" for name, n in classes_with_fewer(data.labels, data.classnames, k or 0)]
    if short:
        warn(f"adapt: {len(short)} class(es) have fewer than {key}={k} {split} images and "
             f"{uses} what they have ({', '.join(short[:10])}"
             f"{', ...' if len(short) > 10 else ''})")


def load_validation(cfg: AdaptConfig, train: LabelledImages | ListedImages, progress: bool = True,
                    model_input: PreprocessConfig | None = None
                    ) -> LabelledImages | ListedImages:
    """``data.val`` as loaded (image files decoded to ``model_input``, `load_source`; only
    listed, `list_source`, when ``val_shots`` draws from it), checked against the training
    set's classes."""
    load = list_source if cfg.val_shots else load_source
    val = load(cfg.data.val, progress, "data.val", model_input)
    if not isinstance(val, ListedImages):
        val = as_labelled(val, "data.val")
    if len(val) == 0:
        raise DataError("data.val holds no images")
    check_same_classes(listed_data(train), listed_data(val), "adapt", ("data.train", "data.val"))
    return val


def draw_validation(cfg: AdaptConfig, val: LabelledImages | ListedImages | ShotDraws
                    ) -> LabelledImages:
    """``val_shots`` per class drawn from ``data.val`` (seeded) when set, else all of it."""
    draws = val if isinstance(val, ShotDraws) else ShotDraws(val, progress=False)
    if cfg.val_shots:
        return draws.draw(int(cfg.val_shots), cfg.seed + 1, label="draw data.val val_shots")[0]
    return draws.listed.data


def val_label(cfg: AdaptConfig) -> str:
    """What a choice made on the validation split is recorded as made on: the reported test
    set when ``data.val`` is ``data.test``'s spec."""
    val = filled_spec(cfg.data.val)
    if same_images(val, filled_spec(cfg.data.test)):
        return "validation, which is data.test (the reported set, so its numbers are optimistic)"
    return "validation"


def warn_validation_overlap(cfg: AdaptConfig, apart: bool) -> None:
    """One line on stderr when ``data.val`` is ``data.test`` (choices are made on the reported
    set) or overlaps ``data.train`` where the drawn shots could not be kept out of it
    (``apart``: they were)."""
    val = filled_spec(cfg.data.val)
    if same_images(val, filled_spec(cfg.data.test)):
        warn("adapt: data.val is data.test, so what is chosen on validation is chosen on the "
             "reported test set and its numbers are optimistic; give data.val other images")
    train = filled_spec(cfg.data.train)
    if apart or not same_images(val, train):
        return
    why = ("the run trains on all of data.train (shots=0), so every validation image is a "
           "training image" if val == train and not cfg.shots else
           "its validation draw may hold training shots")
    warn(f"adapt: data.val reads the same data as data.train ({train['source']}"
         f"{' ' + str(train['split']) if train.get('split') else ''}): {why}; leave data.val "
         "out to draw val_shots apart from the shots, or give it other images")


def validation_apart(cfg: AdaptConfig, draws: ShotDraws) -> LabelledImages:
    """The validation split of a ``data.val`` that is ``data.train``'s very spec, drawn from
    the training listing with the drawn shots passed over (as `few_shot_split` draws
    ``val_shots`` from data.train): ``val_shots`` per class, or all the rest with 0."""
    taken = torch.zeros(len(draws.listed), dtype=torch.bool)
    taken[draws.indices(int(cfg.shots), cfg.seed)] = True
    if bool((taken | draws.unreadable).all()):
        raise DataError("data.val is data.train, and its shots leave no image for validation; "
                        "lower shots, or give data.val other images")
    if cfg.val_shots:
        return draws.draw(int(cfg.val_shots), cfg.seed + 1, exclude=taken,
                          label="draw data.val val_shots")[0]
    return draws.listed.data.subset((~(taken | draws.unreadable)).nonzero().flatten())


def load_sets(cfg: AdaptConfig, progress: bool = True,
              model_input: PreprocessConfig | None = None, stream: bool = False,
              list_train: bool = False
              ) -> tuple[LabelledImages | ListedImages, dict[str, ScoredSet]]:
    """The training set and the scored sets (``test``, and ``shifted`` if given), image
    files decoded to ``model_input`` (`load_source`); with ``shots``, the training set's
    files are only listed (`list_source`): the draw decodes what it takes; so are they with
    ``list_train`` (to be streamed: `streamed_training`), a set without a readable file
    refused now (`check_readable`). With ``stream``, a scored image folder or manifest is
    listed too (`ListedSet`: streamed when scored)."""
    def load(key: str) -> LabelledImages:
        spec = getattr(cfg.data, key)
        return as_labelled(load_source(spec, progress, f"data.{key}", model_input), f"data.{key}")

    def scored(key: str) -> ScoredSet:
        if not stream:
            return load(key)
        spec = getattr(cfg.data, key)
        listed = list_source(spec, progress, f"data.{key}", model_input)
        if isinstance(listed, ListedImages):
            listed_set = ListedSet(spec, listed, f"data.{key}")
            # before training, as a whole load did
            check_readable(spec, listed, f"data.{key}", model_input)
            return listed_set
        return as_labelled(listed, f"data.{key}")  # nothing deferred: read as before

    if cfg.shots or list_train:
        train = list_source(cfg.data.train, progress, "data.train", model_input)
        if not isinstance(train, ListedImages):
            train = as_labelled(train, "data.train")
        elif not cfg.shots:  # before any work, as a whole load did
            check_readable(cfg.data.train, train, "data.train", model_input)
    else:
        train = load("train")
    sets = {"test": scored("test")}
    if cfg.data.shifted is not None:
        sets["shifted"] = scored("shifted")
    for name, data in {"train": listed_data(train), **sets}.items():
        if len(data) == 0:
            raise DataError(f"data.{name} holds no images")
        check_same_classes(listed_data(train), data, "adapt", ("data.train", f"data.{name}"))
    return train, sets


def report_skips(cfg: AdaptConfig, loaded: dict[str, LabelledImages | ShotDraws]
                 ) -> dict[str, dict]:
    """What loading each set skipped (``{set: SkipReport.to_dict()}``; sets that skipped
    nothing left out), each told in one line on stderr. For a set drawn from a listing
    (`ShotDraws`), what its draws skipped, and how many files they decoded."""
    skipped = {}
    for name, data in loaded.items():
        report = data.skipped
        if not report.total:
            continue
        if isinstance(data, ShotDraws):
            listed = len(data.listed)
            lost = int(data.unreadable.sum())
            line = report.line(f"data.{name}", listed - lost,
                               data_origin(getattr(cfg.data, name), data.listed.data))
            line += data.decoded_note()
        else:
            line = report.line(f"data.{name}", len(data),
                               data_origin(getattr(cfg.data, name), data))
        print(line, file=sys.stderr)
        skipped[name] = report.to_dict()
    return skipped


def read_skips(cfg: AdaptConfig, sets: dict[str, ScoredSet], skipped: dict[str, dict]
               ) -> dict[str, dict]:
    """``skipped`` with what reading the streamed ``sets`` skipped (each told in one line on
    stderr, as `report_skips` tells the others), in the sets' order (train, test, shifted,
    val) as a whole load records them."""
    streamed = report_skips(cfg, {name: scored_data(data) for name, data in sets.items()
                                  if isinstance(data, ListedSet)})
    merged = {**skipped, **streamed}
    return {name: merged[name] for name in ("train", "test", "shifted", "val") if name in merged}


def run_adapt(cfg: AdaptConfig | dict, model: DualEncoder | None = None, progress: bool = True,
              cache: FeatureCache | None = None, write: bool = True,
              where: str = "the adapt config") -> dict[str, Any]:
    """Fit ``cfg.method`` on the drawn training set and score it on the test sets; with
    ``write`` what it learned, ``config.yaml`` and ``results.json`` go to ``cfg.out`` (default
    ``runs/adapt-<method>-<time>``). ``model`` (a loaded model) stands in for ``cfg.model``;
    methods that train weights change it in place."""
    start = time.time()
    cfg, options = checked_config(cfg, where)
    method = get_method(cfg.method)
    check_before_work(cfg, method, model, write, where)
    # the model before the data: its input is what the images are decoded to
    model = model if model is not None else load_model(cfg.model, cfg.device)
    # what fit would refuse of its options on this model, before any image is decoded
    getattr(method, "check_first", lambda *_: None)(
        model, options, cfg.data.val is not None or bool(cfg.val_shots))
    cache = cache or FeatureCache(cfg.cache_dir)
    # a data error names its key (data.train), and where its file (draw_sets)
    train, val, sets, skipped = draw_sets(cfg, method, options, progress,
                                          getattr(model, "preprocess_config", None),
                                          model, cache, where)
    given = str(cfg.model) if cfg.model is not None else None  # else the model's own folder
    run, existed = None, True
    if write:
        out = cfg.out or default_run_dir(f"adapt-{cfg.method}")
        existed = Path(out).exists()
        run = RunDir(out)
        run.write_config({**cfg.to_dict(), "out": str(run.path), "options": options.to_dict()})

    torch.manual_seed(cfg.seed)
    ctx = AdaptContext(cache=cache, val=val, seed=cfg.seed, progress=progress, run=run,
                       model_name=given, val_label=val_label(cfg))
    model_name = ctx.origin(model) or "(given model)"
    # a preset is its name and its options (tiny-clip with embed_dim 64 is another model)
    built = {"model_options": cfg.model.options} if cfg.model is not None and \
        cfg.model.options else {}
    # wise-ft of a given fine-tune trains nothing here: no shots or training images to record
    # (that fine-tune's own results.json holds its)
    trains = not getattr(options, "finetuned", None)
    shots = cfg.shots if trains else None
    # the base's folder and weights, before any method trains them in place
    results: dict[str, Any] = {
        "method": cfg.method, "model": model_name, **built,
        **model_record(cfg.model, model), "shots": shots, "seed": cfg.seed,
        "train_size": len(train) if trains else None, "val_size": len(val) if val else 0,
        "test_size": None}  # once scored: a streamed set's unreadable files are found then
    short = dict(classes_with_fewer(train.labels, train.classnames, shots or 0)) if trains else {}
    if short:  # "shots per class" is untrue of these: each trained on what it has
        results["fewer_than_shots"] = short
    # stopped before its first checkpoint, a run is half-built: adapt cannot resume it
    stop_guard = (removed_unless_checkpointed(run.path, existed, "adapt") if run is not None
                  else nullcontext())
    with stop_guard:
        zeroshot, told = None, set()  # told: the streamed sets whose skips are told
        if cfg.compare_zeroshot and cfg.method != "zeroshot":  # before fit: some methods train
            # (streamed with the adapter's extra features: served again by the cache)
            probe = getattr(method, "scoring_probe", lambda _: None)(options)
            zeroshot = score_sets(model, {"test": sets["test"]}, cache, progress,
                                  probe=probe)["test"]
            # its skips told now, not after training (which may fail or be stopped)
            skipped, told = read_skips(cfg, {"test": sets["test"]}, skipped), {"test"}
        adapter: Adapter = method.fit(model, train, options, ctx)
        scores = adapter.score(sets, cache, progress)
        results["test_size"] = len(sets["test"])
        skipped = read_skips(cfg, {k: v for k, v in sets.items() if k not in told}, skipped)
        if run is not None:
            adapter.save(run.path, extra={"model": model_name, **built, "shots": shots,
                                          "seed": cfg.seed, "train_size": results["train_size"]})
        results.update(options=adapter.options, **scores)
        if zeroshot is not None:
            results["zeroshot"] = zeroshot
        results.update(adapter.summary())
        if adapter.trained_with is not None:
            results["train_settings"] = adapter.trained_with
        if skipped:
            results["skipped"] = skipped
        results["wall_time_s"] = round(time.time() - start, 1)
        if run is not None:
            run.write_json("results.json", stamp(results))
            results["out"] = str(run.path)
    results["adapter"] = adapter
    return results


def check_before_work(cfg: AdaptConfig, method: Any, model: DualEncoder | None, write: bool,
                      where: str) -> None:
    """What can be refused before any slow loading: no model, an ONNX export given to a
    method that trains, a misspelt model, an output folder that overlaps an input, a cache
    inside an input."""
    if model is None and cfg.model is None:
        raise ConfigError(f"{where}: model is required (or --model): a preset, a model or run "
                          "folder, or a Hugging Face Hub id")
    needs = getattr(method, "NEEDS_PYTORCH_MODEL", None)
    if needs:  # an ONNX export (inference only) is refused before any work
        require_pytorch_model(cfg.method, needs, model if model is not None else cfg.model)
    if model is None:  # a misspelt --model is said at once, not after decoding every set
        check_model_found(cfg.model)
    data = cfg.data
    option_inputs = [cfg.options.get(name) for name in getattr(method, "INPUT_OPTIONS", ())]
    inputs = [cfg.model.name if cfg.model else None, *option_inputs,
              *spec_paths(data.train, data.test, data.shifted, data.val)]
    if write and cfg.out:
        check_run_out(cfg.out, inputs)
    check_cache_dir(cfg.cache_dir, inputs)


def should_stream_training(cfg: AdaptConfig, method: Any, options: Section) -> bool:
    """Whether ``data.train`` is streamed (`streamed_training`): the method reads it only
    through its image features (``trains_on_features``) and all of it trains (``shots`` 0, no
    validation split drawn from it, no ``train_size``). A split or subset of it is encoded in
    batches of its own by the whole load: the whole set's batches could give features other
    in their last bits (and so other weights), so it is loaded whole."""
    if cfg.shots or cfg.train_size is not None or (cfg.data.val is None and cfg.val_shots):
        return False
    return bool(getattr(method, "trains_on_features", lambda _: False)(options))


def draw_sets(cfg: AdaptConfig, method: Any, options: Section, progress: bool,
              model_input: PreprocessConfig | None, model: DualEncoder | None = None,
              cache: FeatureCache | None = None, where: str | None = None
              ) -> tuple[LabelledImages, LabelledImages | None, dict[str, ScoredSet],
                         dict[str, dict]]:
    """The training set (``shots`` per class, then ``train_size``), the validation split
    (``data.val`` or ``val_shots`` drawn apart from training), the scored sets (an image folder
    or manifest listed, `ListedSet`, unless the method is ``SCORED_WHOLE``) and what loading
    them skipped (a listed one's is known when it is scored: `read_skips`); each class short of
    images, and a validation split the method will not use, said on stderr. Given ``model``, a
    training folder or manifest is streamed with it where `should_stream_training` says so (its
    features cached in ``cache``). Errors are named ``where`` (`errors_naming`), but for a
    model's error while streaming: the whole load met it in ``fit``, unnamed."""
    stream_train = model is not None and should_stream_training(cfg, method, options)
    with errors_naming(where):
        # a method scoring its sets with many models (WiSE-FT's sweep) holds them: decoded once
        train_all, sets = load_sets(cfg, progress, model_input,
                                    stream=not getattr(method, "SCORED_WHOLE", None),
                                    list_train=stream_train)
        own_val = (load_validation(cfg, train_all, progress, model_input)
                   if cfg.data.val is not None else None)
    if stream_train and isinstance(train_all, ListedImages):  # after the checks: the work
        probe = getattr(method, "scoring_probe", lambda _: None)(options)
        with errors_naming(where, (DataError,)):
            train_all = streamed_training(model, cfg.data.train, train_all,
                                          cache if cache is not None else FeatureCache(),
                                          probe, progress)
    with errors_naming(where):
        return drawn_sets(cfg, method, options, progress, train_all, own_val, sets)


def drawn_sets(cfg: AdaptConfig, method: Any, options: Section, progress: bool,
               train_all: LabelledImages | ListedImages, own_val: LabelledImages | None,
               sets: dict[str, ScoredSet]
               ) -> tuple[LabelledImages, LabelledImages | None, dict[str, ScoredSet],
                          dict[str, dict]]:
    """`draw_sets`' draws from the loaded (or listed) training set ``train_all`` and
    ``data.val``'s ``own_val``, their checks and skip lines."""
    train_draws = ShotDraws(train_all, progress)
    val_draws = ShotDraws(own_val, progress) if own_val is not None else None
    train, val = few_shot_split(train_draws, cfg.shots,
                                0 if own_val is not None else cfg.val_shots, cfg.seed)
    # data.val of data.train's very spec: drawn apart from the shots, as val_shots are
    apart = bool(cfg.shots) and own_val is not None and \
        filled_spec(cfg.data.val) == filled_spec(cfg.data.train)
    warn_validation_overlap(cfg, apart)
    if apart:
        val, val_draws = validation_apart(cfg, train_draws), None
    elif val_draws is not None:
        val = draw_validation(cfg, val_draws)
    # (a listed scored set finds its unreadable files when it is scored: told then)
    read = {name: data for name, data in sets.items() if not isinstance(data, ListedSet)}
    skipped = report_skips(cfg, {"train": train_draws, **read,
                                 **({"val": val_draws} if val_draws is not None else {})})
    learns = getattr(method, "LEARNS_FROM_IMAGES", True)
    listed = listed_data(train_all)
    check_training_classes(train, cfg.shots, val_drawn=own_val is None and bool(cfg.val_shots),
                           learns=learns, empty={name for name, _ in classes_with_fewer(
                               listed.labels, listed.classnames, 1)})
    if val is not None and cfg.val_shots:
        warn_fewer_than(val, cfg.val_shots, "val_shots", "validation", "validate on")
    if val is not None and not getattr(method, "uses_validation", lambda o: False)(options):
        held_out = own_val is None and not cfg.shots  # taken out of "all" training images
        warn(f"adapt: {cfg.method} chooses nothing on a validation split with these "
             f"options, so its {len(val)} images (" + ("data.val" if own_val is not None else
             f"val_shots={cfg.val_shots}") + ") go unused" + (
                 ", and are not trained on either; set val_shots=0" if held_out else ""))
    from_train = own_val is None and cfg.val_shots or \
        same_images(filled_spec(cfg.data.val), filled_spec(cfg.data.train))
    if from_train and getattr(options, "finetuned", None):
        split = ("the validation split (val_shots) is drawn from data.train" if own_val is None
                 else "data.val reads the same data as data.train")
        warn(f"adapt: {split}, which the "
             "given fine-tune (options.finetuned) may have trained on: a choice made on "
             "images it has seen favours it; give data.val with images it was not trained on")
    if cfg.train_size is not None and cfg.train_size > len(train) and \
            not getattr(options, "finetuned", None):  # a given fine-tune: nothing trains
        warn(f"adapt: train_size={cfg.train_size} is more than the {len(train)} training images "
             f"drawn, so all {len(train)} are used")
    # classes empty before the subset (which only a method learning nothing is given) are not its
    empty = {name for name, _ in classes_with_fewer(train.labels, train.classnames, 1)}
    train = subsample(train, cfg.train_size, cfg.seed)
    lost = [name for name, _ in classes_with_fewer(train.labels, train.classnames, 1)
            if name not in empty]
    if lost and learns:  # a random subset of the few-shot set can miss whole classes
        raise DataError(f"train_size={cfg.train_size} leaves no training image of {len(lost)} "
                        f"class(es) ({', '.join(lost[:5])}{', ...' if len(lost) > 5 else ''}); "
                        "raise it, or leave it out")
    return train, val, sets, skipped


def _fewer_note(short: dict[str, int] | None) -> str:
    """"; fewer in 2 class(es): cat 3, dog 5" for the classes that had fewer than ``shots``."""
    if not short:
        return ""
    named = ", ".join(f"{name} {n}" for name, n in list(short.items())[:5])
    return f"; fewer in {len(short)} class(es): {named}{', ...' if len(short) > 5 else ''}"


def format_results(results: dict) -> str:
    """The training set, then one line per scored set: method, acc1, acc5 (and WiSE-FT's
    sweep)."""
    shots = results["shots"] or "all"
    given = (results.get("options") or {}).get("finetuned")  # wise-ft of an earlier fine-tune
    trained = (f"the fine-tuned model {results.get('finetuned') or given} (options.finetuned; "
               "nothing trained here)" if given else
               f"{results['train_size']} training images ({shots} per class, seed "
               f"{results['seed']}{_fewer_note(results.get('fewer_than_shots'))})")
    lines = [f"{trained}, {results['test_size']} test images"]
    rows = [(f"{results['method']} {name}", results[name]) for name in ("test", "shifted")
            if name in results]
    if "zeroshot" in results:
        rows.append(("zeroshot test (hand-written prompts)", results["zeroshot"]))
    lines += [f"  {name:<36} acc1 {m['acc1']:6.1%}  acc5 {m['acc5']:6.1%}" for name, m in rows]
    for row in results.get("sweep", []):
        lines.append(f"  alpha {row['alpha']:<5g}" + "".join(
            f"  {k} acc1 {v['acc1']:6.1%}" for k, v in row.items() if isinstance(v, dict)))
    if "best_alpha" in results:
        chosen_on = results["selected_on"]
        if not chosen_on.startswith("validation"):  # no validation split: an oracle's choice
            chosen_on = "the reported sets (val_shots=0), so its numbers are optimistic"
        lines.append(f"  best alpha {results['best_alpha']:g}, chosen on {chosen_on}")
    if "params" in results:
        lines.append(f"  trainable parameters {results['params']['trainable']:,}")
    return "\n".join(lines)
