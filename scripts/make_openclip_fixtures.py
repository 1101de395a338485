"""Small real OpenCLIP checkpoints and the embeddings OpenCLIP computes for them (test fixtures),
and a check that OpenCLIP itself loads the folders cliplab exports.

Two steps, each in its own environment:

1. ``make`` runs where ``import open_clip`` works (the environment ``benchmarks/openclip_env.py``
   builds) and writes ``tests/fixtures/openclip/``:

   - ``hub-gelu/``: an OpenCLIP Hub folder (``open_clip_config.json`` + ``open_clip_model.safetensors``
     + tokenizer files), odd widths, GELU, text pooled at the end token (``pool_type: eos``),
     squash/bicubic preprocessing;
   - ``ddp-quickgelu/``: a training checkpoint ``epoch_3.pt`` saved under DDP (``module.`` keys,
     ``{"epoch", "name", "state_dict"}``) with its model config ``tiny-quickgelu.json``
     (``quick_gelu: true``, argmax pooling), the tokenizer in ``tokenizer/``;
   - ``expected.safetensors`` in each: uint8 images, token ids and OpenCLIP's normalised image and
     text embeddings; ``captions.json``;
   - ``clip_bpe_ids.json``: OpenCLIP's default ``SimpleTokenizer`` ids of a few captions.

       $(python benchmarks/openclip_env.py) scripts/make_openclip_fixtures.py make

2. ``check-export`` runs in cliplab's environment: it imports every fixture with cliplab, exports
   it back with ``export_openclip`` (and a fresh ``tiny-clip`` preset too), then runs step 3 in the
   OpenCLIP environment and prints the largest differences:

       PYTHONPATH=src python scripts/make_openclip_fixtures.py check-export

3. ``verify DIR...`` (called by 2, in the OpenCLIP environment): loads each exported folder with
   ``open_clip.create_model_from_pretrained("local-dir:DIR")`` and its tokenizer, embeds the
   images and captions saved beside it and compares them with cliplab's embeddings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "openclip"
CAPTIONS = ["a photo of a cat", "Two red squares, left of a blue circle.", "x",
            "an OpenCLIP checkpoint converted by cliplab"]
BPE_CAPTIONS = CAPTIONS + ["A dog's   ball, the 3rd one!", "naïve café déjà vu"]


# -- step 1: in the OpenCLIP environment ---------------------------------------------------------
def _byte_tokenizer(folder: Path, eos_last: bool, context_length: int) -> None:
    """A byte-level tokenizer saved as a plain HF folder: specials first (eos id 3) or, with
    ``eos_last``, start/end tokens after the 256 bytes (the end token the largest id, as CLIP's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    if eos_last:
        vocab = {ch: i for i, ch in enumerate(chars)}
        vocab.update({"<start>": 256, "<end>": 257})
        bos, eos, pad, unk = "<start>", "<end>", "<end>", "<end>"
    else:
        vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, "<eos>": 3}
        vocab.update({ch: 4 + i for i, ch in enumerate(chars)})
        bos, eos, pad, unk = "<bos>", "<eos>", "<pad>", "<unk>"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                            unk_token=unk, model_max_length=context_length).save_pretrained(folder)


def _perturb(model, seed: int) -> None:
    """OpenCLIP initialises biases to 0 and norms to 1: move every tensor so a swapped or
    dropped one changes the embeddings."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        model.logit_scale.fill_(2.5)


def _expected(model, tokenizer, images, out: Path, preprocess) -> None:
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    pixels = torch.stack([preprocess(Image.fromarray(im.numpy())) for im in images])
    ids = tokenizer(CAPTIONS)
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(ids, normalize=True)
    save_file({"images": images.contiguous(), "input_ids": ids.contiguous(),
               "image_embeddings": img.contiguous(), "text_embeddings": txt.contiguous()},
              str(out / "expected.safetensors"))
    (out / "captions.json").write_text(json.dumps(CAPTIONS, indent=1) + "\n")


def make(out: Path) -> None:
    import os

    import open_clip
    import torch
    from open_clip.tokenizer import SimpleTokenizer
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)

    # 1) Hub folder, GELU, pool at the end token (id 3), squash + bicubic
    hub = out / "hub-gelu"
    hub.mkdir(exist_ok=True)
    _byte_tokenizer(hub, eos_last=False, context_length=24)
    model_cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 40, "head_width": 20,
                       "layers": 2, "mlp_ratio": 3.5},
        "text_cfg": {"context_length": 24, "vocab_size": 260, "width": 36, "heads": 3,
                     "layers": 2, "mlp_ratio": 3.0, "pool_type": "eos", "eos_id": 3,
                     "hf_tokenizer_name": "local"},
    }
    preprocess_cfg = {"size": 32, "mean": [0.45, 0.46, 0.41], "std": [0.27, 0.26, 0.28],
                      "interpolation": "bicubic", "resize_mode": "squash"}
    (hub / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n")
    model = open_clip.model.CLIP(**model_cfg)
    _perturb(model, 1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(hub / "open_clip_model.safetensors"))
    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{hub}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{hub}")
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=gen)
    _expected(model, tokenizer, images, hub, preprocess)

    # 2) DDP training checkpoint + model config JSON, quick-GELU, argmax pooling
    ddp = out / "ddp-quickgelu"
    ddp.mkdir(exist_ok=True)
    _byte_tokenizer(ddp / "tokenizer", eos_last=True, context_length=20)
    cfg = {
        "embed_dim": 20, "quick_gelu": True,
        "vision_cfg": {"image_size": 36, "patch_size": 12, "width": 48, "head_width": 16,
                       "layers": 3},
        "text_cfg": {"context_length": 20, "vocab_size": 258, "width": 32, "heads": 4,
                     "layers": 2, "hf_tokenizer_name": "tokenizer"},
    }
    (ddp / "tiny-quickgelu.json").write_text(json.dumps(cfg, indent=2) + "\n")
    open_clip.add_model_config(ddp / "tiny-quickgelu.json")
    cwd = os.getcwd()
    os.chdir(ddp)  # hf_tokenizer_name "tokenizer" is relative to the checkpoint's folder
    try:
        model = open_clip.create_model("tiny-quickgelu")
        _perturb(model, 2)
        state = {"module." + k: v for k, v in model.state_dict().items()}
        torch.save({"epoch": 3, "name": "tiny-quickgelu", "state_dict": state}, "epoch_3.pt")
        model, _, preprocess = open_clip.create_model_and_transforms(
            "tiny-quickgelu", pretrained=str(ddp / "epoch_3.pt"))
        model.eval()
        tokenizer = open_clip.get_tokenizer("tiny-quickgelu")
        images = torch.randint(0, 256, (3, 36, 36, 3), dtype=torch.uint8, generator=gen)
        _expected(model, tokenizer, images, ddp, preprocess)
    finally:
        os.chdir(cwd)

    # 3) OpenCLIP's default tokenizer (CLIP's BPE): ids cliplab's tokenizer must reproduce
    simple = SimpleTokenizer()
    ids = {c: [t for t in simple([c])[0].tolist() if t != 0] for c in BPE_CAPTIONS}
    (out / "clip_bpe_ids.json").write_text(json.dumps(ids, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out} (open_clip {open_clip.__version__}, torch {torch.__version__})")


# -- step 2: in cliplab's environment -------------------------------------------------------------
def check_export() -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from openclip_env import openclip_python
    from safetensors.torch import load_file, save_file

    from cliplab.models.convert import export_openclip, load_openclip
    from cliplab.models.presets import build_model

    python = openclip_python()
    if python is None:
        return 1
    sources = {"hub-gelu": FIXTURES / "hub-gelu",
               "ddp-quickgelu": FIXTURES / "ddp-quickgelu" / "epoch_3.pt"}
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for name, src in [*sources.items(), ("tiny-clip", None)]:
            model = load_openclip(src) if src else build_model("tiny-clip", image_size=32)
            folder = Path(tmp) / name
            export_openclip(model, folder)
            if src:
                expected = load_file(str(src.parent / "expected.safetensors")
                                     if src.is_file() else str(src / "expected.safetensors"))
                images = expected["images"]
            else:
                images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
            with torch.no_grad():
                img = model.encode_image(model.preprocess(images))
                txt = model.encode_texts(CAPTIONS)
            save_file({"images": images, "image_embeddings": img, "text_embeddings": txt},
                      str(folder / "cliplab_embeddings.safetensors"))
            folders.append(str(folder))
        return subprocess.run([str(python), __file__, "verify", *folders]).returncode


# -- step 3: in the OpenCLIP environment -----------------------------------------------------------
def verify(folders: list[str]) -> int:
    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    worst = 0.0
    for folder in folders:
        model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
        model.eval()
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        ours = load_file(str(Path(folder) / "cliplab_embeddings.safetensors"))
        pixels = torch.stack([preprocess(Image.fromarray(im.numpy())) for im in ours["images"]])
        with torch.no_grad():
            img = model.encode_image(pixels, normalize=True)
            txt = model.encode_text(tokenizer(CAPTIONS), normalize=True)
        d_img = (img - ours["image_embeddings"]).abs().max().item()
        d_txt = (txt - ours["text_embeddings"]).abs().max().item()
        worst = max(worst, d_img, d_txt)
        print(json.dumps({"folder": Path(folder).name, "open_clip": open_clip.__version__,
                          "max_abs_diff_image": d_img, "max_abs_diff_text": d_txt}))
    print("OK" if worst <= 1e-4 else "MISMATCH", f"(largest difference {worst:.2e})")
    return 0 if worst <= 1e-4 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("make")
    p.add_argument("--out", type=Path, default=FIXTURES)
    sub.add_parser("check-export")
    p = sub.add_parser("verify")
    p.add_argument("folders", nargs="+")
    args = parser.parse_args()
    if args.step == "make":
        make(args.out)
        return 0
    if args.step == "check-export":
        return check_export()
    return verify(args.folders)


if __name__ == "__main__":
    sys.exit(main())
