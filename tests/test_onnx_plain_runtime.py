"""An ONNX export run without cliplab, as README shows it (onnxruntime, tokenizers and ftfy):
every kind of model takes the same text inputs, and the export records cliplab's text cleaning,
so a deployer's embeddings are cliplab's."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import ftfy
import numpy as np
import onnxruntime as ort
import pytest
from transformers import AutoTokenizer

from cliplab.models.onnx_export import export_onnx
from cliplab.models.presets import build_model
from cliplab.models.tokenizer import clean_text

README = Path(__file__).resolve().parents[1] / "README.md"
FOLDER = '"runs/shapes-onnx"'  # the export folder README's example names


def _readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    [block] = [b for b in blocks if "text_encoder.onnx" in b]
    assert FOLDER in block
    return block


@pytest.mark.parametrize("preset", ["tiny-clip", "tiny-siglip"])
def test_readme_example_gives_cliplabs_embeddings(tmp_path, preset):
    """SigLIP's text graph had no attention_mask (the exporter drops an input the tower never
    reads): feeding what the tokenizer returns ended in onnxruntime's "Invalid input name"."""
    model = build_model(preset, image_size=16)
    out = export_onnx(model, tmp_path / preset)
    scope: dict = {}
    code = _readme_example().replace(FOLDER, repr(str(out)))
    exec(compile(code, str(README), "exec"), scope)  # README's own example, as a user runs it
    want = model.encode_texts(scope["captions"]).numpy()
    assert np.abs(scope["embeddings"] - want).max() <= 1e-4
    # the example's captions need the cleaning: without it their ids differ
    raw = scope["tokenizer"].encode_batch(scope["captions"])
    assert [t.ids for t in raw] != [t.ids for t in scope["tokens"]]


TRICKY = ["fish &amp; chips", "fish &amp;amp; chips", "café “quoted”", "ｆｕｌｌ  width ",
          "mojibake cafÃ©", " a\t\nb ", "plain ascii"]


@pytest.mark.parametrize("preset, quantize", [("tiny-clip", None), ("tiny-siglip", "int8")])
def test_the_record_says_what_to_feed_and_how_cliplab_cleans(tmp_path, preset, quantize):
    """onnx_export.json said nothing of the cleaning cliplab applies before tokenizer.json
    (HTML entities, curly quotes, full-width text got other ids outside cliplab), nor which
    inputs the text graph takes."""
    out = export_onnx(build_model(preset, image_size=16), tmp_path / "e", quantize=quantize)
    record = json.loads((out / "onnx_export.json").read_text(encoding="utf-8"))
    assert record["text_inputs"] == ["input_ids", "attention_mask"]
    session = ort.InferenceSession(str(out / "text_encoder.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == record["text_inputs"]
    expression = record["text_cleaning"]["python"]
    for text in TRICKY:
        assert eval(expression, {"html": html, "ftfy": ftfy, "text": text}) == clean_text(text)
    # transformers' tokenizer of the export returns just the graph's inputs
    tokenizer = AutoTokenizer.from_pretrained(out)
    feeds = dict(tokenizer(["a red circle", "x"], padding=True, return_tensors="np"))
    assert sorted(feeds) == sorted(record["text_inputs"])
    session.run(None, {k: v.astype(np.int64) for k, v in feeds.items()})


def test_lit_minilm_export_tokenizer_returns_no_token_type_ids(tmp_path):
    """BERT's tokenizer returned token_type_ids too, which the graph does not take: feeding
    `AutoTokenizer`'s output ended in onnxruntime's "Invalid input name"."""
    out = export_onnx(build_model("lit-minilm", layers=1, image_size=16), tmp_path / "lit")
    feeds = dict(AutoTokenizer.from_pretrained(out)(["a red circle"], return_tensors="np"))
    assert sorted(feeds) == ["attention_mask", "input_ids"]
    session = ort.InferenceSession(str(out / "text_encoder.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert session.run(None, feeds)[0].shape[0] == 1
