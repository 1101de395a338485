"""``dfn``: Data Filtering Networks (Fang et al. 2023) in miniature.

``prepare`` trains a filtering network with cliplab's own `Trainer` (the contrastive objective
of `cliplab pretrain`): it starts from ``model`` (e.g. preset ``tiny-clip`` with options) and
learns from ``trusted``, a data source spec of pairs known to be clean (any source
``cliplab.data.sources`` reads: a manifest, shards, ``shapes``...), with the ``train:`` options
of `cliplab.train.config.TrainConfig` (steps, batch_size, lr, ...). The network is a run folder
in the step's work folder (``filter-network/``, with ``metrics.jsonl`` and its checkpoint); a
resumed curation reuses it while ``model``, ``trusted`` and ``train`` are unchanged (and
resumes a training killed after a ``save_every`` checkpoint), and trains afresh otherwise.
The network trains with ``train.seed`` when given, else the pipeline's ``seed`` (as ``balance``
draws with its own ``seed`` or the pipeline's).

Each pool pair is then scored by the cosine of the network's image and caption embeddings, and
``keep_top`` (a fraction) or ``threshold`` (a cosine) keeps the best, as ``clip_score`` does
(`cliplab.curate.score_filter`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from cliplab.config import refuse_unused
from cliplab.curate.score_filter import check_keep_options, keep_by_score
from cliplab.curate.steps.base import Decision, PoolBatch, PoolItems, StepContext, StepSpecBase
from cliplab.data.sources import as_pairs, load_source, with_paths_resolved
from cliplab.errors import ConfigError
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.embed import embed_images, embed_texts
from cliplab.models.preprocess import PreprocessConfig
from cliplab.models.resolve import load_model, model_folder
from cliplab.models.spec import ModelField
from cliplab.output_folder import spec_paths
from cliplab.provenance import stamp, without_provenance
from cliplab.runs import RunDir
from cliplab.train.config import TrainConfig, train_over_defaults
from cliplab.train.trainer import Trainer

NETWORK = "filter-network"  # the run folder of the trained network, in the step's work folder
TRAINED_ON = "trained_on.json"  # what the network was trained from (reused only if unchanged)
# a small network's defaults, under the keys a config gives (augmentations would falsify
# captions that name positions, as in `shapes`)
TRAIN_DEFAULTS = {"steps": 200, "batch_size": 64, "augment": False}


class Spec(StepSpecBase):
    """``{step: dfn, model, trusted: {data spec}, train: {steps, batch_size, lr, ...},
    keep_top | threshold}``."""

    step: Literal["dfn"]
    model: ModelField
    trusted: dict[str, Any]
    train: TrainConfig = TrainConfig(**TRAIN_DEFAULTS)
    keep_top: float | None = Field(None, gt=0, le=1)    # fraction of pairs kept, best first
    threshold: float | None = Field(None, ge=-1, le=1)  # keep pairs scoring at least this
    batch_size: int = Field(64, ge=1)  # of scoring

    @field_validator("train", mode="before")
    @classmethod
    def _small_defaults(cls, value: Any) -> Any:
        return train_over_defaults(TRAIN_DEFAULTS, value) if isinstance(value, dict) else value

    @field_validator("trusted")
    @classmethod
    def _trusted_paths_resolved(cls, value: dict[str, Any]) -> dict[str, Any]:
        return with_paths_resolved(value)  # as the step's spec names its files (`resolved_path`)

    @model_validator(mode="after")
    def _valid(self) -> "Spec":
        check_keep_options(self.keep_top, self.threshold)
        if "source" not in self.trusted:
            raise ValueError("trusted needs 'source: NAME' (a data source of trusted pairs)")
        refuse_unused(self.train, ["fsdp", "dist_timeout_s", "eval_every"], "in a dfn step (it "
                      "trains in one process, with no evaluation)", prefix="train.")
        return self

    def input_paths(self) -> list[str]:
        return spec_paths(self.trusted)


class DataFilteringNetwork:
    """Trains a filtering network on trusted pairs, keeps the pool pairs it scores best."""

    Spec = Spec
    needs_images = True  # map embeds the images

    def __init__(self, spec: Spec):
        self.spec = spec
        self.model: DualEncoder | None = None
        self.network: Path | None = None  # the trained model folder
        self.train_metrics: dict = {}
        self.device = "cpu"  # where the network runs (a device name)
        # map only embeds the images: files come fitted to the network's input (set by prepare,
        # kept when pickled for workers, which load the network only to map)
        self.image_input: PreprocessConfig | None = None

    def prepare(self, context: StepContext) -> None:
        """Train the network (or reuse the one a previous run of this step trained)."""
        self.device = context.device
        run_path = Path(context.work) / NETWORK
        if "seed" not in self.spec.train.model_fields_set:  # else the step's own train.seed
            train = self.spec.train.model_copy(update={"seed": context.seed})
            self.spec = self.spec.model_copy(update={"train": train})
        trained_on = {k: v for k, v in self.spec.to_dict().items()
                      if k in ("model", "trusted", "train")}
        trained_on["train"] = {k: v for k, v in trained_on["train"].items() if k != "progress"}
        record = run_path / TRAINED_ON
        saved = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
        if isinstance(saved, dict) and isinstance(saved.get("trusted"), dict):
            # a record from before trusted's paths were resolved when the spec was loaded
            saved["trusted"] = with_paths_resolved(saved["trusted"])
        same = saved == trained_on
        if not same and run_path.exists():
            shutil.rmtree(run_path)  # trained from other inputs: our own artefact, rebuilt
        if same and (run_path / "results.json").is_file():
            self.network = model_folder(run_path)
            self.train_metrics = without_provenance(json.loads(
                (run_path / "results.json").read_text(encoding="utf-8")))
        else:
            self._train(run_path, trained_on, context.progress)
        self.model = self.model or DualEncoder.load(self.network, self.device)
        self.image_input = self.model.preprocess_config

    def _train(self, run_path: Path, trained_on: dict, progress: bool) -> None:
        pairs = as_pairs(load_source(self.spec.trusted), "dfn: trusted")
        if len(pairs) < self.spec.train.batch_size:
            raise ConfigError(f"dfn: trusted holds {len(pairs)} pairs, fewer than "
                              f"train.batch_size={self.spec.train.batch_size}")
        run = RunDir(run_path)
        run.write_json(TRAINED_ON, trained_on)
        model = load_model(self.spec.model)
        settings = {"progress": progress}
        if "device" not in self.spec.train.model_fields_set:  # else the step's train.device
            settings["device"] = str(self.device)
        trainer = Trainer(model, self.spec.train.model_copy(update=settings), run)
        resume = "latest" if run.latest_checkpoint() is not None else None
        last = trainer.fit(pairs, resume=resume)
        run.close()
        self.train_metrics = {"trusted_pairs": len(pairs), **last}
        # marks the network complete; the step's report keeps the metrics alone, as on reuse
        run.write_json("results.json", stamp(dict(self.train_metrics)))
        self.network = model_folder(run_path)
        self.model = model.eval()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model": None}  # a worker loads the network from its folder

    def map(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        """The cosine of each pair's image and caption under the filtering network."""
        if self.model is None:
            assert self.network is not None, "prepare() first"
            self.model = DualEncoder.load(self.network, self.device)
        images = embed_images(self.model, batch.images, self.spec.batch_size)
        texts = embed_texts(self.model, batch.captions, self.spec.batch_size)
        return {"dfn_score": (images * texts).sum(axis=1).astype(np.float32)}

    def decide(self, items: PoolItems, columns: dict[str, np.ndarray]) -> Decision:
        """Keep the top fraction or the pairs at or above the threshold."""
        assert self.network is not None, "prepare() first"
        return keep_by_score(columns["dfn_score"], self.spec.keep_top, self.spec.threshold,
                             "dfn score", report={"files": {"dfn_model": str(self.network)},
                                                  "train": self.train_metrics})
