"""Read throughput of WebDataset shards: cliplab's ``ShardLoader`` against a plain
``webdataset`` pipeline doing the same work (shard shuffle, 1000-sample buffer, PNG/JPEG decode
to uint8, batches), both through a DataLoader with the same number of workers.

Writes ``--n`` Fashion-MNIST training images as shards into a temp folder (``cliplab data
shard``'s writer), then reads one epoch with each. Prints one JSON line with samples/s and
``ratio`` (cliplab / webdataset; the price of positions, skip reports and exactly-once).

    .venv/bin/python benchmarks/shard_stream.py [--n 20000] [--workers 2] [--format jpg]
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import make_parser, non_negative_int, positive_int  # noqa: E402
from cli_args import require, run_main  # noqa: E402


def _decode(sample: dict) -> dict:
    ext = "png" if "png" in sample else "jpg"
    with Image.open(io.BytesIO(sample[ext])) as im:
        array = np.array(im.convert("L"), dtype=np.uint8)
    meta = json.loads(sample["json"])
    return {"image": torch.from_numpy(array[..., None]), "caption": meta["captions"][0],
            "key": sample["__key__"], "group": meta["group"]}


def _collate(samples: list[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]),
            "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}


def plain_webdataset(folder: str, batch_size: int, workers: int) -> int:
    import webdataset as wds

    urls = sorted(str(p) for p in __import__("pathlib").Path(folder).glob("*.tar"))
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker, seed=0)
               .shuffle(1000, initial=1000).map(_decode).batched(batch_size, collation_fn=_collate))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return sum(len(b["key"]) for b in loader)


def cliplab_stream(folder: str, batch_size: int, workers: int) -> int:
    from cliplab.data.shards import ShardLoader, ShardStream  # imported by main already

    stream = ShardStream(folder, seed=0, shuffle_buffer=1000, rank=0, world_size=1, caption="first")
    return sum(len(b["key"]) for b in ShardLoader(stream, batch_size, num_workers=workers))


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--n", type=positive_int, default=20000,
                        help="Fashion-MNIST training images written as shards")
    parser.add_argument("--workers", type=non_negative_int, default=2,
                        help="DataLoader workers of both readers (0: in the main process)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="samples per batch")
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg",
                        help="image format in the shards")
    args = parser.parse_args()
    require(parser, "webdataset")  # the reader compared with: said before the shards are written

    from cliplab.data.shards import write_shards
    from cliplab.data.sources import load_source

    data = load_source({"source": "fashion-mnist", "split": "train", "limit": args.n})
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_shards(data, folder, samples_per_shard=1000, image_format=args.format, progress=False)
        write_s = time.perf_counter() - start
        result = {"n": args.n, "workers": args.workers, "format": args.format,
                  "write_samples_per_s": round(args.n / write_s)}
        for name, fn in (("webdataset", plain_webdataset), ("cliplab", cliplab_stream)):
            fn(folder, args.batch_size, args.workers)  # warm the page cache
            start = time.perf_counter()
            count = fn(folder, args.batch_size, args.workers)
            result[f"{name}_samples_per_s"] = round(count / (time.perf_counter() - start))
            result[f"{name}_count"] = count
        result["ratio"] = round(result["cliplab_samples_per_s"] / result["webdataset_samples_per_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
