"""A cache of image features keyed by (image tower weights, dataset pixels, transform).

Every task of a suite asks the cache; the images of one (model, dataset, transform) are encoded
once and shared by zero-shot, probes and retrieval. The key changes, and the cache misses, when
any of the three (or the numeric precision) changes. With a folder the features persist as
safetensors files. ``FeatureCache.texts`` is the text-embedding cache the same tasks share.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cliplab.data.fingerprint import images_fingerprint
from cliplab.errors import ConfigError
from cliplab.evaluate.features import DEFAULT_PROBE_LAYERS, ImageFeatures, encode_images
from cliplab.evaluate.text_cache import TextFeatureCache
from cliplab.file_modes import rust_os_error, save_tensors
from cliplab.models.dual_encoder import DualEncoder
from cliplab.models.fingerprints import image_tower_fingerprint
from cliplab.models.finite import finite_embeddings
from cliplab.models.preprocess import to_uint8_batch
from cliplab.output_folder import atomic_path


class FeatureCache:
    """Image features by key, in memory and (if ``folder`` is given) on disk.

    An entry holds the embeddings, the pooled backbone and optionally one kind of probe
    features; a request that needs only the first two is served by any entry of its key.
    ``texts`` caches text embeddings (zero-shot prompts, retrieval captions) in memory.
    """

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder else None
        if self.folder is not None:
            check_cache_folder(self.folder)
        self.memory: dict[str, dict[str, ImageFeatures]] = {}
        # by key: what an entry of a listed set holds besides its features (`listed_features`)
        self.extras: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0
        self.texts = TextFeatureCache()

    @staticmethod
    def key(model: DualEncoder, images: torch.Tensor, precision: str = "fp32") -> str:
        suffix = "" if precision == "fp32" else f"_{precision}"  # fp32 keys as before
        return f"{image_tower_fingerprint(model)}-{images_fingerprint(images)}{suffix}"

    @staticmethod
    def probe_tag(probe: str | None, probe_layers: int) -> str:
        """What an entry's file name says of its extra probe: ``plain``, ``tokens``,
        ``layers4``."""
        if probe == "layers":
            return f"layers{probe_layers}"
        return "tokens" if probe == "tokens" else "plain"

    def _lookup(self, key: str, tag: str) -> ImageFeatures | None:
        entries = self.memory.get(key, {})
        if tag in entries:
            return entries[tag]
        if tag == "plain" and entries:
            return next(iter(entries.values()))
        if self.folder is None:
            return None
        files = [self.folder / f"{key}-{tag}.safetensors"]
        if tag == "plain":
            files += sorted(set(self.folder.glob(f"{key}-*.safetensors")) - set(files))
        for file in files:
            if file.is_file():
                tensors = read_entry(file)
                if tensors is None:
                    continue
                mark_used(file)
                kind = file.stem.rsplit("-", 1)[1]
                probe_kind = None if kind == "plain" else kind.rstrip("0123456789")
                # an entry written before embeddings were checked: the same model's, as broken
                feats = ImageFeatures(finite_embeddings(tensors["embeddings"], "image"),
                                      tensors["backbone"], tensors.get("probe"), probe_kind)
                self.memory.setdefault(key, {})[kind] = feats
                extras = {k: v for k, v in tensors.items() if k not in _FEATURES}
                if extras:
                    self.extras[key] = extras
                return feats
        return None

    def cached(self, model: DualEncoder, images: torch.Tensor, probe: str | None = None,
               probe_layers: int = DEFAULT_PROBE_LAYERS, precision: str = "fp32"
               ) -> ImageFeatures | None:
        """The features `features` would serve from memory or the folder (a hit), else None:
        nothing encoded, no miss counted."""
        images = to_uint8_batch(images)
        feats = self._lookup(self.key(model, images, precision),
                             self.probe_tag(probe, probe_layers))
        self.hits += feats is not None
        return feats

    def features(self, model: DualEncoder, images: torch.Tensor, probe: str | None = None,
                 probe_layers: int = DEFAULT_PROBE_LAYERS, progress: bool = True,
                 desc: str = "encode images", precision: str = "fp32") -> ImageFeatures:
        """The cached features of ``images`` under ``model``, computing them on a miss (an
        corrupt file of the folder is one: it is deleted and written again)."""
        images = to_uint8_batch(images)  # one image, a list of PIL images: a uint8 batch
        key, tag = self.key(model, images, precision), self.probe_tag(probe, probe_layers)
        feats = self._lookup(key, tag)
        if feats is not None:
            self.hits += 1
            return feats
        self.misses += 1
        feats = encode_images(model, images, progress=progress, desc=desc, probe=probe,
                              probe_layers=probe_layers, precision=precision)
        self._store(key, tag, feats)
        return feats

    def _store(self, key: str, tag: str, feats: ImageFeatures,
               extras: dict[str, torch.Tensor] | None = None) -> None:
        """Keep a computed entry in memory and, with a folder, on disk (``extras``: tensors
        stored beside the features, `listed_features`)."""
        self.memory.setdefault(key, {})[tag] = feats
        if extras:
            self.extras[key] = extras
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            tensors = {"embeddings": feats.embeddings, "backbone": feats.backbone,
                       **(extras or {})}
            if feats.probe is not None:
                tensors["probe"] = feats.probe
            write_entry(self.folder / f"{key}-{tag}.safetensors", tensors)

    def listed_features(self, tower: str, identity: str, probe: str | None,
                        probe_layers: int, precision: str,
                        encode: Callable[[], tuple[ImageFeatures, dict[str, torch.Tensor]]]
                        ) -> tuple[ImageFeatures, dict[str, torch.Tensor]]:
        """The features of a set streamed from its listing (`cliplab.evaluate.streamed`) and
        the tensors stored with them (e.g. which files were readable), computed by
        ``encode`` on a miss. Such a set has no pixel tensor: they are keyed by the image
        ``tower`` (`image_tower_fingerprint`) and the listing's ``identity`` (its files, their
        sizes and times, its labels and decoding)."""
        suffix = "" if precision == "fp32" else f"_{precision}"
        key = f"{tower}-listed{identity}{suffix}"
        tag = self.probe_tag(probe, probe_layers)
        feats = self._lookup(key, tag)
        if feats is not None and key in self.extras:
            self.hits += 1
            return feats, self.extras[key]
        self.misses += 1
        feats, extras = encode()
        self._store(key, tag, feats, extras)
        return feats, extras


_FEATURES = ("embeddings", "backbone", "probe")  # an entry's features; other tensors: extras

STALE_TEMP_SECONDS = 3600  # a writer's temp file untouched this long: its writer was killed


def write_entry(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a cache entry atomically through a temporary file of this writer's own (pid and
    a random part), so processes sharing a folder never write into one file. An entry that
    another process published meanwhile is kept: its key is ours, so are its features."""
    if file.exists():  # published while we encoded (or one we may not read, left as it is)
        return
    try:
        with atomic_path(file, f".{os.getpid()}-{secrets.token_hex(4)}.tmp") as tmp:
            save_tensors({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    except OSError:
        if not file.is_file():  # (Windows: the rename onto a file another process reads)
            raise
    remove_stale_temps(file.parent)


def remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files of cache writers that were killed mid-write (unique names
    are never written again), once untouched for ``STALE_TEMP_SECONDS``."""
    now = time.time()
    for tmp in folder.glob("*.safetensors*.tmp"):
        with contextlib.suppress(OSError):  # another process's sweep removed it first
            if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()


def check_cache_folder(folder: Path) -> None:
    """A one-line `ConfigError` unless ``folder`` is a folder or can be made one (nothing on
    its path is a file), so a bad ``--cache-dir`` fails before any encoding."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == folder else f"is inside {path}, a file"
                raise ConfigError(f"feature cache folder {folder} {what}; give a folder (made "
                                  "if missing)")
            return


def mark_used(file: Path) -> None:
    """Set a cache file's modification time to now: a folder's entries unused for a month are
    then the ones ``find DIR -mtime +30`` lists (the cache itself never prunes)."""
    try:
        os.utime(file)
    except OSError:  # a read-only cache folder still serves its entries
        pass


def read_entry(file: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file; None, with one warning on stderr, for a file that cannot
    be used. A corrupt one (truncated, garbage, lacking the embeddings) is deleted so that the
    features are encoded and written again; one the system will not let us read (no
    permission, an I/O error) is left as it is, and its features are encoded without it."""
    try:
        tensors = load_file(file)
    except (SafetensorError, ValueError, OSError) as err:
        if isinstance(err, OSError) or rust_os_error(err) is not None:
            return _unreadable(file, err)
        problem = f"cannot be read ({_first_line(err)})"
    else:
        if "embeddings" in tensors and "backbone" in tensors:
            return tensors
        problem = "holds no embeddings"
    try:
        file.unlink(missing_ok=True)
    except OSError as err:  # (a sticky-bit folder: another user's file)
        print(f"feature cache: {file} {problem}, and cannot be deleted ({_first_line(err)}); "
              "encoding again", file=sys.stderr)
        return None
    print(f"feature cache: {file} {problem}; deleting it and encoding again", file=sys.stderr)
    return None


def _unreadable(file: Path, err: Exception) -> None:
    """Warn of a cache file the system will not let us read (a group-shared folder: another
    user's file), which is not corrupt and so is left; None if it is gone (another process
    deleted it), a plain miss."""
    try:  # safetensors reports a refused open as "No such file", no errno: open names why
        with open(file, "rb"):
            pass
    except FileNotFoundError:
        return None
    except OSError as real:
        err = real
    print(f"feature cache: {file} cannot be read ({_first_line(err)}); encoding its features "
          "again and leaving the file", file=sys.stderr)
    return None


def _first_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).splitlines()[0] if str(err) else type(err).__name__
