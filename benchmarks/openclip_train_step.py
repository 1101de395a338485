"""OpenCLIP's side of benchmarks/train_throughput.py; runs inside the OpenCLIP environment.

Reads the architecture as JSON from argv[1], trains OpenCLIP's `CLIP` with its `ClipLoss` and
AdamW on random inputs (as its training loop does after the data loader), prints one JSON line.
Needs ``open_clip``, which lives in a separate environment: ``python benchmarks/openclip_env.py``
builds it (once) and prints its interpreter, which is the one to run this script with.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import make_parser  # noqa: E402  stdlib only: fine in the OpenCLIP environment

KEYS = ("threads", "embed_dim", "layers", "width", "heads", "patch_size", "image_size",
        "context_length", "vocab_size", "text_width", "text_layers", "batch_size", "precision",
        "warmup", "steps")


def architecture(text: str) -> dict:
    """The JSON object of argv[1], with every key `main` reads."""
    try:
        a = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err})") from None
    missing = [k for k in KEYS if not isinstance(a, dict) or k not in a]
    if missing:
        raise argparse.ArgumentTypeError(f"a JSON object lacking {', '.join(missing)}")
    return a


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("arch", type=architecture,
                        help="architecture and run settings as one JSON object (the keys "
                        "train_throughput.py passes: " + ", ".join(KEYS) + ")")
    a = parser.parse_args().arch
    try:
        import torch
        from open_clip.loss import ClipLoss
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    except ImportError as err:
        sys.exit(f"{Path(__file__).name}: {err}; run it with the OpenCLIP environment's python "
                 "(`python benchmarks/openclip_env.py` builds it and prints the path)")
    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    model = CLIP(embed_dim=a["embed_dim"],
                 vision_cfg=CLIPVisionCfg(layers=a["layers"], width=a["width"],
                                          head_width=a["width"] // a["heads"],
                                          patch_size=a["patch_size"], image_size=a["image_size"]),
                 text_cfg=CLIPTextCfg(context_length=a["context_length"],
                                      vocab_size=a["vocab_size"], width=a["text_width"],
                                      heads=a["heads"], layers=a["text_layers"]))
    model.train()
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    b = a["batch_size"]
    images = torch.randn(b, 3, a["image_size"], a["image_size"])
    texts = torch.randint(1, a["vocab_size"], (b, a["context_length"]))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a["precision"] == "bf16")
    times = []
    for _ in range(a["warmup"] + a["steps"]):
        t0 = time.perf_counter()
        with autocast:
            img, txt, scale = model(images, texts)[:3]
            loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    measured = times[a["warmup"]:]
    print(json.dumps({"images_per_s": b * len(measured) / sum(measured),
                      "params": sum(p.numel() for p in model.parameters()),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
