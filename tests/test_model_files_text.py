"""Text handling a model folder decides: the cleaning every tokenize applies (OpenCLIP's), the
context length (capped at the text tower's positions, written where plain transformers reads
it) and the text settings of ``cliplab.json``, whose errors name that file."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from cliplab.errors import ModelError
from cliplab.models import DualEncoder, build_model
from cliplab.models.convert.clip_bpe import clip_bpe_tokenizer
from cliplab.models.presets import minilm_path
from tests.tiny_models import bare_siglip, small_model

DIRTY = ["tom &amp; jerry", "caf&eacute;", "a  red\tcircle\n", " two &amp;amp; three  "]
CLEAN = ["tom & jerry", "café", "a red circle", "two & three"]


def test_clean_text_is_openclips_basic_and_whitespace_clean():
    from cliplab.models.tokenizer import clean_text

    assert [clean_text(t) for t in DIRTY] == CLEAN
    assert clean_text("cafÃ©") == "café"  # ftfy.fix_text repairs mojibake
    assert clean_text("\u201cquoted\u201d") == '"quoted"'  # ...and uncurls quotes
    assert clean_text(" \n ") == ""
    # beside a tag ftfy leaves entities alone: both unescapes are cliplab's (OpenCLIP's)
    assert clean_text("<b> &amp;amp;") == "<b> &"


@pytest.mark.parametrize("tokenizer", ["clip-bpe", "minilm", "byte-level"])
def test_dirty_texts_get_the_ids_of_their_clean_form(tokenizer):
    """CLIP's BPE (OpenCLIP's ids), a HF BERT tokenizer, and the byte-level one, which keeps
    every whitespace character as a token."""
    model = small_model(context_length=48)
    if tokenizer == "clip-bpe":
        model.tokenizer = clip_bpe_tokenizer(48)
    elif tokenizer == "minilm":
        model.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    for dirty, clean in zip(DIRTY, CLEAN):
        assert model.tokenize([dirty])["input_ids"].tolist() == \
            model.tokenize([clean])["input_ids"].tolist(), (tokenizer, dirty)


def test_dirty_texts_embed_as_their_clean_form():
    model = small_model()
    torch.testing.assert_close(model.encode_texts(DIRTY), model.encode_texts(CLEAN))


def test_a_lit_folder_truncates_in_plain_transformers_where_cliplab_does(tmp_path):
    lit = build_model("lit-minilm", image_size=16, patch_size=8, width=32, layers=1, heads=2)
    folder = lit.save(tmp_path / "lit")
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 32
    text = "a photo of a " + "very " * 60 + "nice shirt"
    plain = AutoTokenizer.from_pretrained(folder)([text], truncation=True)["input_ids"]
    assert len(plain[0]) == 32 == lit.tokenize([text])["input_ids"].shape[1]


@pytest.mark.parametrize("preset", ["tiny-clip", "tiny-siglip"])
def test_a_byte_level_folder_spaces_texts_in_plain_transformers_as_cliplab_does(preset,
                                                                                tmp_path):
    """The saved tokenizer kept runs of whitespace, which cliplab collapses before tokenizing:
    plain transformers gave `cats  and   dogs` other ids (embeddings 0.03 apart)."""
    model = build_model(preset, image_size=16, patch_size=8, width=32, layers=1, heads=2,
                        context_length=32)
    folder = model.save(tmp_path / "m")
    texts = ["cats  and   dogs", "  A Cat\t\non a mat ", "plain text"]
    plain = AutoTokenizer.from_pretrained(folder)(texts, truncation=True)["input_ids"]
    ours = [[i for i in row if i != 0] for row in model.tokenize(texts)["input_ids"].tolist()]
    assert plain == ours


def _without_context_records(folder) -> None:
    """As a plain HF folder whose tokenizer_config.json has no model_max_length."""
    (folder / "cliplab.json").unlink()
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text())
    config.pop("model_max_length", None)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_an_inferred_context_length_stops_at_the_text_positions(kind, tmp_path):
    model = small_model(context_length=20) if kind == "clip" else bare_siglip(16)
    folder = model.save(tmp_path / kind)
    _without_context_records(folder)
    loaded = DualEncoder.load(folder)
    positions = loaded.model.config.text_config.max_position_embeddings
    assert loaded.context_length == positions == (20 if kind == "clip" else 16)
    assert loaded.encode_texts(["a " * 60]).shape == (1, loaded.embed_dim)


def _edit_meta(folder, **values) -> None:
    meta = json.loads((folder / "cliplab.json").read_text())
    meta.update(values)
    (folder / "cliplab.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("values, says", [
    ({"context_length": 64}, "context_length 64 is more than the text tower's 20 positions"),
    ({"context_length": "20"}, "context_length must be a positive whole number"),
    ({"text_pooling": "cls"}, "text_pooling must be 'model' or 'mean', not 'cls'"),
])
def test_bad_text_settings_in_cliplab_json_name_the_file(values, says, tmp_path):
    folder = small_model(context_length=20).save(tmp_path / "m")
    _edit_meta(folder, **values)
    with pytest.raises(ModelError) as err:
        DualEncoder.load(folder)
    message = str(err.value)
    assert "\n" not in message and says in message
    assert message.startswith(str(folder / "cliplab.json") + ": ")


def test_an_onnx_export_cleans_texts_as_its_pytorch_model(tmp_path):
    """The ONNX encoder tokenizes on its own (the graphs hold no tokenizer): dirty texts embed
    as their clean forms there too, as in the PyTorch model."""
    from cliplab.models.onnx_export import export_onnx
    from cliplab.models.resolve import load_model
    from tests.serve_helpers import save_tiny_model

    model = DualEncoder.load(save_tiny_model(tmp_path / "torch"))
    onnx = load_model(str(export_onnx(model, tmp_path / "onnx")))
    assert onnx.tokenize(DIRTY)["input_ids"].tolist() == \
        onnx.tokenize(CLEAN)["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(onnx.encode_text(**onnx.tokenize(DIRTY)),
                                   model.encode_text(**model.tokenize(CLEAN)), atol=1e-5, rtol=0)


def test_coop_prompts_are_built_from_cleaned_class_names():
    """CoOp tokenizes class names itself (to place its context slots): a name with an HTML
    entity or doubled spaces gets the ids of its clean form, as every other path gives it."""
    from cliplab.adapt.coop import prompt_tokens

    model = small_model(context_length=48)
    for init in ("a photo of a", ""):
        dirty = prompt_tokens(model, ["t-shirt  &amp; top", "sandal"], init, 4)
        clean = prompt_tokens(model, ["t-shirt & top", "sandal"], init, 4)
        assert dirty[0].tolist() == clean[0].tolist() and dirty[2:] == clean[2:]


def test_the_plain_text_shortcut_cleans_as_ftfy_and_html_do():
    """`clean_text` skips ftfy for printable ASCII without '&' (most captions): on random
    strings over ASCII (control characters too), entities and non-ASCII pieces it gives
    exactly the full cleaning's result."""
    import html
    import random

    import ftfy

    from cliplab.models.tokenizer import clean_text

    pieces = [chr(i) for i in range(128)] + ["&amp;", "&lt;", "\u201c", "é", "Ã©", "\u00a0",
                                              "  ", "\r\n"]
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert clean_text(text) == " ".join(
            html.unescape(html.unescape(ftfy.fix_text(text))).split()), repr(text)


def test_captions_that_clean_alike_are_one_caption_in_training():
    """Two captions the tokenizer turns into the same tokens are one positive key, in memory
    (the caption table) and when streamed (caption keys)."""
    from cliplab.data.types import ImageTextPairs
    from cliplab.train.captions import CaptionTable
    from cliplab.train.stream_batches import StreamBatches

    captions = [["tom &amp; jerry"], ["tom & jerry"], ["tom  &  jerry "], ["a cat"]]
    table = CaptionTable(ImageTextPairs(torch.zeros(4, 8, 8, 3, dtype=torch.uint8), captions))
    assert table.flat.tolist() == [0, 0, 0, 1] and table.texts == ["tom & jerry", "a cat"]
    batch = {"group": torch.full((4,), -1), "caption": [c[0] for c in captions]}
    keys = StreamBatches.keys(batch, use_groups=True).tolist()
    assert keys[0] == keys[1] == keys[2] != keys[3]
