"""WebDataset tar shards, one concept in one place.

- ``layout``: file names, ``index.json``, stats, finding shards and their sample counts;
- ``samples``: a shard's samples as their parts, and what the parts mean;
- ``write``: a dataset → shards (``write_shards``);
- ``stream``: shards → samples, split over ranks and workers, shuffled, resumable (``ShardStream``);
- ``loader``: a stream → batches through DataLoader workers, position kept (``ShardLoader``);
- ``read``: a shard folder read whole into memory (the ``shards`` source, ``load_shards``);
- ``job``: the ``cliplab data shard`` command (import it from its module; it loads sources).
"""

from cliplab.data.shards.layout import INDEX_FILE, expand_shards, read_index
from cliplab.data.shards.loader import ShardLoader, collate_samples
from cliplab.data.shards.read import load_shards
from cliplab.data.shards.stream import ShardStream
from cliplab.data.shards.write import check_out_folder, write_shards

__all__ = ["INDEX_FILE", "ShardLoader", "ShardStream", "check_out_folder", "collate_samples",
           "expand_shards", "load_shards", "read_index", "write_shards"]
