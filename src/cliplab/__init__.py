"""cliplab: one toolkit for the whole life of CLIP-style contrastive image-text models.

The command line is ``cliplab COMMAND --help``. From Python, import what you need from its
module (``import cliplab`` itself loads neither torch nor transformers):

Models
    ``cliplab.models.resolve.load_model(spec)``  a preset, model/run/checkpoint folder or Hub id
    ``cliplab.models.DualEncoder``  ``.encode_texts(texts)``, ``.encode_image(pixels)``,
    ``.save(dir)``, ``DualEncoder.load(dir)``; ``cliplab.models.build_model(preset, ...)``
    ``cliplab.models.embed.embed_images(model, pil_images)`` / ``embed_texts(model, texts)``
Data
    ``cliplab.data.sources.load_source({"source": NAME, ...})``; the dataset kinds
    ``cliplab.data.LabelledImages`` and ``cliplab.data.ImageTextPairs``;
    ``cliplab.data.fashion_mnist.load_fashion_mnist(split)``;
    ``cliplab.data.shards.ShardLoader`` / ``ShardStream``
Curation and training
    ``cliplab.curate.pipeline.run_curation(config)``
    ``cliplab.train.pretrain.run_pretrain(config)``;
    ``cliplab.train.trainer.Trainer(model, config)``
Evaluation
    ``cliplab.evaluate.features.encode_images(model, images)``
    ``cliplab.evaluate.zeroshot.zeroshot_classifier(model, classnames, templates)``
    ``cliplab.evaluate.zeroshot.zeroshot_metrics(image_embeddings, labels, classifier)``
    ``cliplab.evaluate.suite.run_suite(model, suite, context)`` / ``run_task(model, spec, context)``
    with ``cliplab.evaluate.tasks.TaskContext`` and ``LinearHead``
Adaptation
    ``cliplab.adapt.run.run_adapt(config)``; ``cliplab.adapt.get_method(name).fit(model, train,
    options, cliplab.adapt.AdaptContext(...))``; ``cliplab.adapt.load_adapter(folder, model)``;
    ``cliplab.adapt.lora.load_lora(folder)``
Merging
    ``cliplab.merge.run.run_merge(config)`` (model folders in, a model folder out);
    on state dicts: ``cliplab.merge.uniform_soup``, ``greedy_soup``, ``model_stock``,
    ``task_vector``, ``apply_task_vector``, ``ties_merge``, ``dare_merge``
    (``cliplab.merge.checkpoints.load_ingredient(folder).state`` loads a model, checkpoint or
    run folder's state dict)
Export
    ``cliplab.models.onnx_export.export_onnx(model, out)``
Search and serving
    ``cliplab.serve.build.build_index(config)``; ``cliplab.serve.index.SearchIndex(folder)``
    ``.search(queries, k, offset)``; ``cliplab.serve.run.serve(index_folder)``

Functions that take a ``config`` accept the stage's schema object or a plain dict of its keys.
Every error cliplab raises on purpose is a `cliplab.errors.CliplabError` (`ConfigError`,
`DataError`, `InputError` for a Python argument of the wrong kind or shape, `ModelError`) with
a one-line message saying what is wrong and what to do. What it warns of is a
`cliplab.errors.CliplabWarning` (Python's `warnings`: recorded or silenced as any other).
"""

from cliplab.errors import (CliplabError, CliplabWarning, ConfigError, DataError, InputError,
                            ModelError)
from cliplab.provenance import __version__

__all__ = ["CliplabError", "CliplabWarning", "ConfigError", "DataError", "InputError",
           "ModelError", "__version__"]
