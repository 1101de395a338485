"""Read throughput of WebDataset shards: cliplab's ``ShardLoader`` against a plain
``webdataset`` pipeline doing the same work (shard shuffle, 1000-sample buffer, PNG/JPEG decode
to uint8, batches), both through a DataLoader with the same number of workers.

Writes ``--n`` Fashion-MNIST training images as shards into a temp folder (``cliplab data
shard``'s writer), then reads one epoch with each. Prints one JSON line with samples/s and
``ratio`` (cliplab / webdataset; the price of positions, skip reports and exactly-once).

    .venv/bin/python benchmarks/shard_stream.py [--n 20000] [--workers 2] [--format jpg]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from cliplab.data.shards import ShardLoader, ShardStream, write_shards
from cliplab.data.sources import load_source


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
    stream = ShardStream(folder, seed=0, shuffle_buffer=1000, rank=0, world_size=1, caption="first")
    return sum(len(b["key"]) for b in ShardLoader(stream, batch_size, num_workers=workers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg")
    args = parser.parse_args()
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
    main()
