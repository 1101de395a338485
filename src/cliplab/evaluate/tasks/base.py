"""What every evaluation task shares: the spec base class, the context a task runs in, and the
`Classifier` hook that lets a task score a learned head instead of the zero-shot one.

A task is a module with a ``Spec`` (a `TaskSpecBase` subclass declaring ``task:
Literal["<name>"]`` and its own keys) and ``run(model, spec, context) -> dict`` of metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

from pydantic import InstanceOf

from cliplab.config import Section
from cliplab.data.fingerprint import image_digest
from cliplab.data.images import deferred_decoding
from cliplab.data.listed import ListedImages, ShotDraws, listed_data
from cliplab.data.multilabel import MultiLabelImages
from cliplab.data.sources import as_labelled, as_pairs, load_source
from cliplab.data.types import ImageTextPairs, LabelledImages, SkipReport
from cliplab.errors import CliplabError, ConfigError, DataError
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.features import DEFAULT_PROBE_LAYERS, ImageFeatures
from cliplab.evaluate.streamed import StreamedSet, StreamPlan, stream_set, streaming_plan
from cliplab.evaluate.text_cache import TextFeatureCache
from cliplab.evaluate.zeroshot import zeroshot_classifier, zeroshot_logits
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.fingerprints import image_tower_fingerprint
from cliplab.models.preprocess import PreprocessConfig

# a data spec ({source: digits, split: test, ...}) or an already loaded dataset (Python API)
DataSpec = (dict[str, Any] | InstanceOf[LabelledImages] | InstanceOf[ImageTextPairs]
            | InstanceOf[MultiLabelImages])
ProbeKind = Literal["embeddings", "backbone", "tokens", "layers"]
# data key -> (probe kind, layers) to compute when that dataset is first encoded
ProbePlan = dict[str, tuple[str, int]]


# a set read whole (not listed) above this many bytes of images is not held from `preload`
# to its task's turn in a one-off evaluation: read again then (a suite of such sets held
# together would need their sum)
HOLD_BYTES = 512 * 2**20


def data_key(spec: DataSpec) -> str:
    """A stable key of a data spec (an in-memory dataset is keyed by its identity)."""
    if isinstance(spec, dict):
        return json.dumps(spec, sort_keys=True, default=str)
    return f"object:{id(spec)}"


def data_origin(spec: DataSpec, data: Any) -> str:
    """Where a dataset came from, for messages: its spec's path or root, else its source
    name (an in-memory dataset: its name)."""
    if isinstance(spec, dict):
        return str(spec.get("path") or spec.get("root") or spec.get("source"))
    return str(getattr(data, "name", "dataset"))


class TaskSpecBase(Section):
    """Keys every task takes: ``task`` (its registry name, narrowed by each subclass to a
    Literal) and an optional ``name`` for its results."""

    task: str
    name: str | None = None
    # keys of the sets this task draws a few samples per class from (few_shot's ``train``):
    # a one-off evaluation lists their files and decodes only the drawn ones (`TaskContext`)
    drawn: ClassVar[tuple[str, ...]] = ()
    # keys of the sets this task only encodes (reads their features, labels and classes, never
    # their pixels): a one-off evaluation streams a listed set all its readers only encode
    encoded: ClassVar[tuple[str, ...]] = ()

    def datasets(self) -> list[DataSpec]:
        """The data specs of this task's `DataSpec` keys (the sets it encodes)."""
        return [spec for _, spec in self.data_keys()]

    def data_keys(self) -> list[tuple[str, DataSpec]]:
        """(key, data spec) of each of this task's `DataSpec` keys that is set."""
        return [(key, getattr(self, key)) for key, info in type(self).model_fields.items()
                if info.annotation in (DataSpec, DataSpec | None)
                and getattr(self, key) is not None]

    def check(self, context: "TaskContext") -> None:
        """Check this task against its loaded data (e.g. class names) before any task of the
        suite runs; a one-line error if it cannot run, naming the key (``classes: ...``) but
        not the task: the caller prefixes where the task is (``tasks[1] (name 'zs'): ``).
        Nothing to check by default."""

    def check_model(self, model: DualEncoder) -> None:
        """Check this task against the model it will score (e.g. its number of blocks) before
        any task runs; errors as `check`'s. Nothing to check by default."""

    def probes(self) -> list[tuple[DataSpec, str, int]]:
        """(data spec, probe kind, layers) of the extra image features this task will read, so
        the suite computes them in the first pass over that dataset."""
        return []


@runtime_checkable
class Classifier(Protocol):
    """A learned classifier over image features (e.g. an adapter): ``probe`` names the extra
    features it needs (``tokens``/``layers``) or None; ``logits`` maps features to ``[N, C]``
    (``progress``: the task's progress flag, for classifiers whose scoring is long)."""

    probe: str | None

    def logits(self, features: ImageFeatures, progress: bool = False) -> torch.Tensor: ...


def class_order(have: Sequence[str], want: Sequence[str]) -> list[int] | None:
    """The rows of a head over classes ``have`` that score classes ``want``, in ``want``'s
    order (``have``'s own order: ``[0, 1, ...]``), or None when ``want`` are other classes
    (a head trained on a manifest's class order scores a folder's sorted one)."""
    if list(have) == list(want):
        return list(range(len(have)))
    if len(set(have)) != len(have) or sorted(have) != sorted(want):
        return None
    row = {name: i for i, name in enumerate(have)}
    return [row[name] for name in want]


class LinearHead:
    """A `Classifier` from a weight matrix ``[C, D]`` over unit image embeddings (a fine-tuned
    head or a text classifier; its scale does not change the ranking).

    With ``classnames`` it scores only data of those classes, in that order (other data gets
    the zero-shot text head); ``label`` names it in the results of the tasks it scored."""

    probe = None

    def __init__(self, weight: torch.Tensor, classnames: Sequence[str] | None = None,
                 label: str | None = None):
        self.weight = weight.detach().float().cpu()
        self.classnames = None if classnames is None else list(classnames)
        self.label = label

    def in_class_order(self, classnames: Sequence[str]) -> LinearHead | None:
        """This head with its rows in the order of ``classnames`` (itself when they are its
        own, or it names none), or None when they are other classes (`class_order`)."""
        if self.classnames is None:
            return self
        order = class_order(self.classnames, classnames)
        if order is None:
            return None
        return self if order == list(range(len(order))) else \
            LinearHead(self.weight[order], classnames, self.label)

    def logits(self, features: ImageFeatures, progress: bool = False) -> torch.Tensor:
        return features.embeddings @ self.weight.t()


@dataclass
class TaskContext:
    """What a task may use besides the model and its spec.

    ``cache``: image and text features shared by every task; ``probe_plan``: the extra
    features to compute when a dataset is first encoded; ``classifier``: when set, tasks that
    would score the zero-shot text head (zeroshot, long_tail, multilabel_zeroshot) score it
    instead; ``datasets``: loaded data by spec, so a dataset is read once per context;
    ``reported``: skip lines already printed (shared by copies, so repeated evaluations during
    training print each once); ``where``: how errors point at the suite's tasks (``suite.yaml:
    tasks``), set by a `preload` given one and kept by copies, so the model checks of a later
    `run_suite` name the suite file too; ``model_input``: the preprocessing of the model the
    tasks run on (set when a task is checked against the model), to which image files are decoded
    (`load_source`'s ``model_input``: a set in memory costs the model's input per image);
    ``hold``: keep every set loaded for later runs (training evaluates the same sets again).
    Without it (a one-off evaluation: `run_suite` without a context, ``cliplab eval``) a
    suite holds one task's sets at a time: `preload` checks the tasks on image folders and
    manifests as listed (`deferred_decoding`), a set is decoded when its first task runs and
    dropped after its last, and other sets above `HOLD_BYTES` are read again at their turn;
    a set a task only draws shots from (``TaskSpecBase.drawn``) stays listed, its draws
    (`shot_draws`) decoding what they take; a listed set every task reading it only encodes
    (``TaskSpecBase.encoded``) is decoded and encoded a batch at a time when its first task is
    checked (`stream_set`): ``streamed``.
    """

    cache: FeatureCache = field(default_factory=FeatureCache)
    progress: bool = True
    precision: str = "fp32"
    probe_plan: ProbePlan = field(default_factory=dict)
    classifier: Classifier | None = None
    datasets: dict[str, Any] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)
    where: str = "tasks"
    model_input: PreprocessConfig | None = None
    hold: bool = True
    # sets listed, not decoded, by `preload` without ``hold`` (given to a task only to draw)
    listed: dict[str, ListedImages] = field(default_factory=dict)
    listing: bool = False  # within such a `preload`
    draws: dict[str, ShotDraws] = field(default_factory=dict)  # of listed sets, by key
    # sets to stream (`preload` without ``hold``), by key: (extra probe, its layers)
    streamable: StreamPlan = field(default_factory=dict)
    streamed: dict[str, StreamedSet] = field(default_factory=dict)  # by key

    def for_new_weights(self) -> TaskContext:
        """A copy with an empty feature cache (for a model whose weights changed, e.g. during
        training or between soup ingredients) that keeps the loaded datasets (not streamed
        ones: their features were the old weights')."""
        datasets = {k: v for k, v in self.datasets.items() if k not in self.streamed}
        return dataclasses.replace(self, cache=FeatureCache(), datasets=datasets, streamed={})

    def drop_streamed(self) -> None:
        """Forget the streamed sets and the plan that streamed them (a run's end, failed or
        not): their placeholder images must never reach a later reader."""
        for key in self.streamed:
            self.datasets.pop(key, None)
        self.streamed.clear()
        self.streamable = {}

    def stream_listed(self, spec: dict, listed: ListedImages, model: DualEncoder,
                      probe: str | None = None) -> None:
        """Stream ``spec``'s set, listed already (``listed``: `list_source` with ``model``'s
        input), with ``probe``'s features when a task first reads it with ``model``: what
        `preload` plans for a one-off evaluation's sets, for a caller that lists and checks
        its sets itself (``cliplab adapt``'s scored sets). `drop_streamed` after the run."""
        self.model_input = getattr(model, "preprocess_config", None)  # (in the set's key)
        key = self._key(spec)
        self.listed[key] = listed
        self.streamable = {**self.streamable, key: (probe, DEFAULT_PROBE_LAYERS)}

    def is_streamed(self, spec: DataSpec) -> bool:
        """Whether ``spec``'s set is streamed here (its pixels not held: `stream_set`)."""
        return isinstance(spec, dict) and self._key(spec) in self.streamed

    def streamed_set(self, spec: DataSpec) -> StreamedSet | None:
        """``spec``'s streamed set (its samples and features: `stream_set`), else None."""
        return self.streamed.get(self._key(spec)) if isinstance(spec, dict) else None

    def preload(self, tasks: Sequence[TaskSpecBase], where: str | None = None,
                model: DualEncoder | None = None) -> None:
        """Load every dataset ``tasks`` will encode now and check each task against its data
        (and, given ``model``, against it: `check_task`), so a bad source, class or key fails
        before any work (e.g. before training whose evaluation would read it); errors name the
        task (``where[i] (name 'zs'): ...``; ``where`` omitted: the context's)."""
        if where is None:
            where = self.where
        else:
            self.where = where
        self.listing = not self.hold
        try:
            for i, task in enumerate(tasks):
                self.check_named(i, task, model)
                if not self.hold:  # large sets read whole are read again at their turn
                    self.release(tasks[i + 1:], keep_below=HOLD_BYTES)
        finally:
            self.listing = False
        if not self.hold:
            self.streamable = streaming_plan(tasks, self._key,
                                             getattr(self.classifier, "probe", None))

    def check_named(self, i: int, task: TaskSpecBase, model: DualEncoder | None = None
                    ) -> None:
        """`check_task`, its errors naming the task (``where[i] (name 'zs'): ...``)."""
        with self.naming(i, task):
            self.check_task(task, model)

    @contextlib.contextmanager
    def naming(self, i: int, task: TaskSpecBase) -> Iterator[None]:
        """Re-raise a `CliplabError` of the block naming the task (``where[i] (name 'zs'):
        ...``): for what only running the task finds, such as a class short of readable files
        for its shots."""
        try:
            yield
        except CliplabError as err:
            label = f" (name {task.name!r})" if task.name else ""
            raise type(err)(f"{self.where}[{i}]{label}: {err}") from None

    def release(self, later: Sequence[TaskSpecBase], keep_below: int = 0) -> None:
        """Drop the sets (and listings) no task of ``later`` reads, but for sets whose images
        take fewer than ``keep_below`` bytes."""
        needed = {self._key(spec) for task in later for spec in task.datasets()}
        for key in [k for k in self.datasets if k not in needed]:
            if _image_bytes(self.datasets[key]) >= keep_below or key in self.streamed:
                del self.datasets[key]
                self.streamed.pop(key, None)
        for key in [k for k in self.listed if k not in needed]:
            del self.listed[key]
            self.draws.pop(key, None)

    def check_task(self, task: TaskSpecBase, model: DualEncoder | None = None) -> None:
        """Load ``task``'s datasets (given ``model``, decoded to its input: ``model_input``),
        refuse an empty one, and run `TaskSpecBase.check_model` (given ``model``), then
        `TaskSpecBase.check`; errors do not name the task."""
        if model is not None:
            self.model_input = getattr(model, "preprocess_config", None)
        name = task.name or task.task
        for key, _ in task.data_keys():  # a bad option names its key: `test: unknown ...`
            # (a streamed set's progress bar is named as its task's encoding was)
            desc = f"encode {name}" if key == "data" else f"encode {name} {key}"
            self.dataset(task, key, where=key, model=model, desc=desc)
        empty = self.empty_data(task)
        if empty:
            raise DataError(f"{empty} holds no images")
        # the model's checks first: they read only the spec, and `check` warns (a probe's
        # leakage), which must not come before the error that stops the run
        if model is not None:
            task.check_model(model)
        task.check(self)

    def empty_data(self, task: TaskSpecBase) -> str | None:
        """The key (e.g. ``data``, ``train``) of the first dataset of ``task`` that holds no
        images (a ``limit: 0``, a filter that kept nothing), else None: no metric is defined
        on it."""
        for key, _ in task.data_keys():
            if len(listed_data(self.dataset(task, key))) == 0:
                return key
        return None

    @property
    def texts(self) -> TextFeatureCache:
        return self.cache.texts

    def load(self, spec: DataSpec, where: str | None = None, model: DualEncoder | None = None,
             desc: str | None = None) -> LabelledImages | ImageTextPairs | MultiLabelImages:
        """The dataset a spec names, loaded once per context (``where``: the spec's key,
        named by a loading error); given ``model``, one to stream (``streamable``) is streamed
        (`stream_set`, ``desc`` naming its progress bar): its readable samples, their images
        placeholders."""
        if not isinstance(spec, dict):
            return spec
        key = self._key(spec)
        if key in self.datasets:
            return self.datasets[key]
        if self.listing:
            return listed_data(self._listing(spec, where))
        if model is not None and key in self.streamable:
            listed = self._listing(spec, where)
            if not isinstance(listed, ListedImages):  # nothing deferred: read (and held)
                return listed
            probe, layers = self.streamable[key]
            # pairs or multi-label images (which the task refuses) are loaded as before
            streamed = stream_set(model, listed, self.cache, spec, self._input_key(),
                                  probe, layers, self.precision, self.progress, desc) \
                if isinstance(listed.data, LabelledImages) else None
            if streamed is not None:
                self.listed.pop(key, None)
                self.streamed[key] = streamed
                self.datasets[key] = streamed.data
                return streamed.data
        self.listed.pop(key, None)
        self.draws.pop(key, None)
        self.datasets[key] = load_source(spec, self.progress, where, self.model_input)
        return self.datasets[key]

    def dataset(self, task: TaskSpecBase, key: str, where: str | None = None,
                model: DualEncoder | None = None, desc: str | None = None) -> Any:
        """``task``'s set under ``key`` (`load`, given ``model`` and ``desc``); one it draws
        from (``task.drawn``) in a context that does not hold sets is listed (`ListedImages`),
        unless it is loaded already or has no files to defer."""
        spec = getattr(task, key)
        if self.hold or key not in task.drawn or not isinstance(spec, dict):
            return self.load(spec, where, model, desc)
        return self._listing(spec, where)

    def _listing(self, spec: dict, where: str | None) -> Any:
        """``spec``'s set listed with its decoders (`ListedImages`), once per context; as
        read (and held) when nothing in it is deferred (in memory, shards)."""
        key = self._key(spec)
        if key in self.datasets and key not in self.streamed:  # (placeholders: listed again)
            return self.datasets[key]
        if key not in self.listed:
            with deferred_decoding() as deferred:
                data = load_source(spec, self.progress, where, self.model_input)
            if not deferred:  # nothing to defer (held in memory, or shards): as read
                self.datasets[key] = data
                return data
            self.listed[key] = ListedImages(data, deferred)
        return self.listed[key]

    def shot_draws(self, task: TaskSpecBase, key: str) -> ShotDraws:
        """Draws from ``task``'s set ``key`` (`dataset`), one per set and context, so what
        they skip is reported with the task (`skipped`)."""
        data = self.dataset(task, key, where=key)
        if not isinstance(data, ListedImages):
            return ShotDraws(as_labelled(data, key), self.progress)
        name = self._key(getattr(task, key))
        if name not in self.draws:
            self.draws[name] = ShotDraws(data, self.progress)
        return self.draws[name]

    def _key(self, spec: DataSpec) -> str:
        """``spec``'s key in ``datasets``: its `data_key`, and the model input it is decoded to."""
        return data_key(spec) + self._input_key()

    def _input_key(self) -> str:
        """The model input image files are decoded to (`_key`'s end), empty if none."""
        fit = self.model_input
        return "" if fit is None else f"@{fit.image_size}/{fit.resize_mode}/{fit.interpolation}"

    def skipped(self, task: TaskSpecBase) -> tuple[SkipReport, int, list[str]]:
        """What the datasets of ``task`` skipped (merged, each set once), how many samples
        they held before skipping, and where the sets that skipped some came from (a set
        drawn from: what the listing and the draws skipped, and how many files were read)."""
        report, total, where, seen = SkipReport(), 0, [], set()
        for key, spec in task.data_keys():
            if data_key(spec) in seen:
                continue
            seen.add(data_key(spec))
            data = listed_data(self.dataset(task, key))
            draws = self.draws.get(self._key(spec)) if isinstance(spec, dict) else None
            own: SkipReport = getattr(data, "skipped", None) or SkipReport()  # the loading's
            skipped = draws.skipped if draws else own  # a draw's holds its listing's
            total += len(data) + own.lost_samples
            if skipped.total:
                report.counts.update(skipped.counts)
                for reason, keys in skipped.keys.items():
                    report.keys.setdefault(reason, []).extend(keys)
                where.append(data_origin(spec, data) + (draws.decoded_note() if draws else ""))
        return report, total, where

    def labelled(self, spec: DataSpec, where: str) -> LabelledImages:
        return as_labelled(self.load(spec), where)

    def pairs(self, spec: DataSpec) -> ImageTextPairs:
        return as_pairs(self.load(spec), "data")

    def image_features(self, model: DualEncoder, images: torch.Tensor, spec: DataSpec | None,
                       desc: str, probe: str | None = None, layers: int = 4) -> ImageFeatures:
        """Features of ``images`` from the cache; ``probe`` (or the plan's entry for ``spec``)
        names extra features to compute with them."""
        if probe is None and spec is not None:
            probe, layers = self.probe_plan.get(data_key(spec), (None, 4))
        streamed = self._streamed(spec, images)
        if streamed is not None:
            if streamed.tower != image_tower_fingerprint(model):
                raise DataError(f"{desc}: its set was streamed for another model (or weights); "
                                "evaluate this one in a new TaskContext")
            if FeatureCache.probe_tag(probe, layers) not in ("plain", streamed.tag):
                raise DataError(f"{desc}: {probe} features were not computed when its set was "
                                f"streamed (it was planned {streamed.tag})")
            return streamed.features
        return self.cache.features(model, images, probe, layers, self.progress, desc,
                                   self.precision)

    def _streamed(self, spec: DataSpec | None, images: torch.Tensor) -> StreamedSet | None:
        """The streamed set whose (placeholder) ``images`` these are, else None; an error for
        other images of a streamed set (a part of it: they would be its 1x1 placeholders)."""
        streamed = self.streamed.get(self._key(spec)) if isinstance(spec, dict) else None
        if streamed is None:
            return None
        if images is not streamed.data.images:
            raise DataError(f"{data_origin(spec, streamed.data)} was streamed (its pixels are "
                            "not held), but a part of it is asked to be encoded; report this")
        return streamed

    def image_digests(self, spec: DataSpec, data: LabelledImages
                      ) -> tuple[tuple[int, ...], Iterator[bytes]]:
        """The shape of one image of ``data`` (loaded from ``spec``) and each image's
        `image_digest`: a streamed set's as hashed while it was streamed."""
        streamed = self._streamed(spec, data.images)
        if streamed is not None:
            return streamed.shape, iter(streamed.digests)
        return tuple(data.images.shape[1:]), (image_digest(image) for image in data.images)

    def cached_features(self, model: DualEncoder, images: torch.Tensor, probe: str | None = None,
                        layers: int = 4) -> ImageFeatures | None:
        """The features of ``images`` (and ``probe``'s) the cache holds already, else None."""
        return self.cache.cached(model, images, probe, layers, self.precision)

    def classifier_for(self, data: LabelledImages) -> Classifier | None:
        """``classifier``; one that names the classes it scores (``in_class_order``) with its
        rows in ``data``'s class order, or None when ``data``'s are other classes (then the
        zero-shot text head scores)."""
        in_class_order = getattr(self.classifier, "in_class_order", None)
        return self.classifier if in_class_order is None else in_class_order(data.classnames)

    def scored_by(self, data: LabelledImages) -> dict:
        """``{"classifier": label}`` for the results of a task whose ``data`` a labelled
        classifier scored (e.g. a model's fine-tuned head), else ``{}``."""
        label = getattr(self.classifier_for(data), "label", None)
        return {"classifier": label} if label else {}

    def class_logits(self, model: DualEncoder, data: LabelledImages, spec: DataSpec,
                     desc: str) -> tuple[torch.Tensor, ImageFeatures]:
        """Logits ``[N, C]`` of ``data``'s images: from ``classifier`` if set, else the
        zero-shot head of the class prompts (cosine similarities); and the features used."""
        classifier = self.classifier_for(data)
        if classifier is not None:
            probe = classifier.probe
            feats = self.image_features(model, data.images, spec, desc, probe=probe) if probe \
                else self.image_features(model, data.images, spec, desc)
            logits = classifier.logits(feats, progress=self.progress).float()
            if logits.shape[1] != len(data.classnames):
                raise ConfigError(f"the classifier scores {logits.shape[1]} classes, the data "
                                  f"{len(data.classnames)} ({', '.join(data.classnames[:5])}"
                                  f"{', ...' if len(data.classnames) > 5 else ''})")
            return logits, feats
        feats = self.image_features(model, data.images, spec, desc)
        head = zeroshot_classifier(model, data.prompt_names, data.templates, self.texts,
                                   self.precision, self.progress)
        return zeroshot_logits(feats.embeddings, head), feats


def _image_bytes(data: Any) -> int:
    images = getattr(data, "images", None)
    return images.nelement() * images.element_size() if isinstance(images, torch.Tensor) else 0


def task_error(spec: TaskSpecBase, message: str) -> ConfigError:
    """A `ConfigError` naming the task: ``task 'zs': message``."""
    return ConfigError(f"task {spec.name or spec.task!r}: {message}")


def ints(values: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)
