"""Read throughput of WebDataset shards: cliplab's ``ShardLoader`` against a plain
``webdataset`` pipeline doing the same work (shard shuffle, 1000-sample buffer, PNG/JPEG decode
to uint8, batches), both through a DataLoader with the same number of workers.

Writes ``--n`` Fashion-MNIST training images as shards into a temp folder (``cliplab data
shard``'s writer), reads one untimed epoch with each (the page cache), then ``--repeats`` timed
epochs with each, the two readers taking turns and swapping order every repeat (a shared
machine's drift touches both alike). Prints one JSON line with each reader's median samples/s
and its runs, and ``ratio`` (cliplab / webdataset, of the medians; the price of positions, skip
reports and exactly-once) with ``ratio_runs`` per repeat: a ratio whose runs straddle 1 is a
tie.

    .venv/bin/python benchmarks/shard_stream.py [--n 20000] [--workers 2] [--format jpg]
        [--repeats 5]
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import make_parser, non_negative_int, positive_int  # noqa: E402
from cli_args import run_main  # noqa: E402


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

    urls = sorted(str(p) for p in Path(folder).glob("*.tar"))
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker, seed=0)
               .shuffle(1000, initial=1000).map(_decode).batched(batch_size, collation_fn=_collate))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return sum(len(b["key"]) for b in loader)


def cliplab_stream(folder: str, batch_size: int, workers: int) -> int:
    from cliplab.data.shards import ShardLoader, ShardStream  # imported by main already

    stream = ShardStream(folder, seed=0, shuffle_buffer=1000, rank=0, world_size=1, caption="first")
    return sum(len(b["key"]) for b in ShardLoader(stream, batch_size, num_workers=workers))


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--n", type=positive_int, default=20000,
                        help="Fashion-MNIST training images written as shards")
    parser.add_argument("--workers", type=non_negative_int, default=2,
                        help="DataLoader workers of both readers (0: in the main process)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="samples per batch")
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg",
                        help="image format in the shards")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed epochs per reader, alternating (median and runs reported)")
    args = parser.parse_args(argv)

    from cliplab.data.shards import write_shards
    from cliplab.data.sources import load_source

    data = load_source({"source": "fashion-mnist", "split": "train", "limit": args.n})
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_shards(data, folder, samples_per_shard=1000, image_format=args.format, progress=False)
        write_s = time.perf_counter() - start
        result = {"n": args.n, "workers": args.workers, "format": args.format,
                  "repeats": args.repeats, "write_samples_per_s": round(args.n / write_s)}
        readers = {"webdataset": plain_webdataset, "cliplab": cliplab_stream}
        rates: dict[str, list[float]] = {name: [] for name in readers}
        for name, fn in readers.items():
            result[f"{name}_count"] = fn(folder, args.batch_size, args.workers)  # page cache
        for i in range(args.repeats):
            for name in (readers if i % 2 == 0 else reversed(readers)):
                start = time.perf_counter()
                count = readers[name](folder, args.batch_size, args.workers)
                rates[name].append(count / (time.perf_counter() - start))
        for name, runs in rates.items():
            result[f"{name}_samples_per_s"] = round(statistics.median(runs))
            result[f"{name}_runs"] = [round(r) for r in runs]
        result["ratio"] = round(statistics.median(rates["cliplab"])
                                / statistics.median(rates["webdataset"]), 2)
        result["ratio_runs"] = [round(c / w, 2)
                                for c, w in zip(rates["cliplab"], rates["webdataset"])]
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
