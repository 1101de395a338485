"""The feature cache: one encode per (model, dataset, transform), invalidated by any change."""

import os

import pytest
import torch

from cliplab.evaluate import feature_cache as fc
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.models import build_model


def _model(seed=0):
    return build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                       embed_dim=16, seed=seed)


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (5, 16, 16, 3), generator=g, dtype=torch.uint8)


def count_encodes(monkeypatch):
    calls = []
    real = fc.encode_images

    def spy(*args, **kwargs):
        calls.append(kwargs.get("probe"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fc, "encode_images", spy)
    return calls


def test_same_inputs_encode_once_and_plain_requests_reuse_probe_entries(monkeypatch):
    calls = count_encodes(monkeypatch)
    cache, model, images = FeatureCache(), _model(), _images()
    a = cache.features(model, images, probe="tokens", progress=False)
    b = cache.features(model, images, progress=False)            # zero-shot needs no probe
    c = cache.features(model, images, probe="tokens", progress=False)
    assert calls == ["tokens"] and cache.hits == 2 and cache.misses == 1
    assert torch.equal(a.embeddings, b.embeddings) and c is a


def test_any_change_invalidates(monkeypatch):
    calls = count_encodes(monkeypatch)
    cache, model, images = FeatureCache(), _model(), _images()
    cache.features(model, images, progress=False)
    cache.features(model, _images(seed=1), progress=False)          # other pixels
    with torch.no_grad():
        model.model.visual_projection.weight.add_(0.01)               # other weights
    cache.features(model, images, progress=False)
    model.preprocess_config.mean = (0.4, 0.4, 0.4)                    # other transform
    other = cache.features(model, images, progress=False)
    cache.features(model, images, probe="layers", probe_layers=1, progress=False)  # new probe
    cache.features(model, images, probe="layers", probe_layers=2, progress=False)  # deeper
    cache.features(model, images, precision="bf16", progress=False)  # other precision
    assert len(calls) == 7 and cache.hits == 0
    first = cache.memory[next(iter(cache.memory))]["plain"]
    assert not torch.equal(other.backbone, first.backbone)  # the new mean really was applied


def test_a_config_fixed_in_place_is_another_key(tmp_path):
    """A model folder whose config.json changes (the activation an OpenCLIP conversion got
    wrong, fixed in place) embeds otherwise with the same weights: the disk cache misses and
    gives the new features, not the old ones."""
    import json

    from cliplab.models.dual_encoder import DualEncoder

    _model().save(tmp_path / "model")
    images, cache_dir = _images(), tmp_path / "cache"
    before = FeatureCache(cache_dir).features(DualEncoder.load(tmp_path / "model"), images,
                                              progress=False)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["vision_config"]["hidden_act"] == "quick_gelu"
    config["vision_config"]["hidden_act"] = "relu"
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    fixed = DualEncoder.load(tmp_path / "model")
    cached = FeatureCache(cache_dir)
    after = cached.features(fixed, images, progress=False)
    fresh = FeatureCache().features(fixed, images, progress=False)
    assert cached.misses == 1 and cached.hits == 0
    assert torch.equal(after.embeddings, fresh.embeddings)
    assert not torch.allclose(after.embeddings, before.embeddings, atol=1e-3)


def test_text_tower_changes_do_not_invalidate_image_features(monkeypatch):
    calls = count_encodes(monkeypatch)
    cache, model, images = FeatureCache(), _model(), _images()
    cache.features(model, images, progress=False)
    with torch.no_grad():
        model.model.text_projection.weight.add_(1.0)
    cache.features(model, images, progress=False)
    assert len(calls) == 1


def test_disk_cache_survives_a_new_instance(tmp_path, monkeypatch):
    calls = count_encodes(monkeypatch)
    model, images = _model(), _images()
    first = FeatureCache(tmp_path).features(model, images, probe="tokens", progress=False)
    again = FeatureCache(tmp_path)
    second = again.features(model, images, probe="tokens", progress=False)
    plain = FeatureCache(tmp_path).features(model, images, progress=False)
    assert len(calls) == 1 and again.hits == 1
    assert torch.equal(first.probe, second.probe) and torch.equal(first.embeddings, plain.embeddings)
    assert second.get("tokens").shape == first.get("tokens").shape
    assert not list(tmp_path.glob("*.tmp"))


def test_a_hit_on_disk_marks_its_file_used(tmp_path):
    """The cache is never pruned: a hit sets its file's modification time, so the files a
    month unused are those `find DIR -mtime +30` lists (README), not every file written then."""
    import os

    model, images = _model(), _images()
    FeatureCache(tmp_path).features(model, images, progress=False)
    (file,) = tmp_path.glob("*.safetensors")
    month_ago = file.stat().st_mtime - 31 * 86400
    os.utime(file, (month_ago, month_ago))
    FeatureCache(tmp_path).features(model, images, progress=False)
    assert file.stat().st_mtime > month_ago + 30 * 86400


def test_a_probe_on_disk_serves_plain_requests_only(tmp_path, monkeypatch):
    calls = count_encodes(monkeypatch)
    model, images = _model(), _images()
    FeatureCache(tmp_path).features(model, images, probe="tokens", progress=False)
    again = FeatureCache(tmp_path)
    again.features(model, images, progress=False)  # any entry holds the embeddings
    layers = again.features(model, images, probe="layers", probe_layers=1, progress=False)
    assert calls == ["tokens", "layers"] and layers.probe_kind == "layers"


def test_a_cache_file_without_embeddings_is_replaced_and_encoded_again(tmp_path, monkeypatch,
                                                                        capsys):
    """A readable safetensors entry lacking ``embeddings`` warns once, is re-encoded and rewritten."""
    from safetensors.torch import save_file

    calls = count_encodes(monkeypatch)
    model, images = _model(), _images()
    first = FeatureCache(tmp_path).features(model, images, progress=False)
    (file,) = tmp_path.glob("*.safetensors")
    save_file({"backbone": first.backbone.contiguous()}, str(file))
    capsys.readouterr()
    again = FeatureCache(tmp_path).features(model, images, progress=False)
    assert torch.equal(again.embeddings, first.embeddings) and len(calls) == 2
    assert capsys.readouterr().err == (f"feature cache: {file} holds no embeddings; deleting it "
                                       "and encoding again\n")
    third = FeatureCache(tmp_path)
    assert torch.equal(third.features(model, images, progress=False).embeddings,
                       first.embeddings)
    assert len(calls) == 2 and third.hits == 1 and capsys.readouterr().err == ""


def test_the_images_key_is_hashed_without_a_copy_of_the_set():
    import hashlib
    import tracemalloc

    from cliplab.data.fingerprint import images_fingerprint

    images = torch.randint(0, 256, (64, 64, 64, 3), dtype=torch.uint8)  # 786 KB
    tracemalloc.start()
    key = images_fingerprint(images)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < images.numel() // 10  # .tobytes() copied the whole set (a 10k eval died there)
    want = hashlib.sha256(str(tuple(images.shape)).encode())
    want.update(images.numpy().tobytes())
    assert key == want.hexdigest()[:16]  # the same key as before: persisted caches still hit


def test_a_change_in_the_vision_tower_body_invalidates(monkeypatch):
    """Guards the key hashing every ``vision_model.*`` weight, not only the projection: a
    fine-tuned image tower with an unchanged projection must not be served stale features."""
    calls = count_encodes(monkeypatch)
    cache, model, images = FeatureCache(), _model(), _images()
    first = cache.features(model, images, progress=False)
    g = torch.Generator().manual_seed(0)
    body = model.model.vision_model
    with torch.no_grad():  # not a constant: a layer norm follows and would cancel it
        body.embeddings.patch_embedding.weight.add_(
            torch.randn(body.embeddings.patch_embedding.weight.shape, generator=g))
    patched = cache.features(model, images, progress=False)
    with torch.no_grad():
        body.encoder.layers[0].mlp.fc1.weight.add_(
            torch.randn(body.encoder.layers[0].mlp.fc1.weight.shape, generator=g))
    layered = cache.features(model, images, progress=False)
    assert len(calls) == 3 and cache.hits == 0 and cache.misses == 3
    assert not torch.allclose(patched.embeddings, first.embeddings, atol=1e-4)
    assert not torch.allclose(layered.embeddings, patched.embeddings, atol=1e-4)
    fresh = FeatureCache().features(model, images, progress=False)
    assert torch.equal(layered.embeddings, fresh.embeddings)


def test_two_writers_of_one_entry_in_a_shared_folder_both_succeed(tmp_path, monkeypatch):
    """Two processes filling one entry of a shared --cache-dir: the second publishes between
    the first's write and rename. They shared ``ENTRY.tmp``, and the first failed with a
    FileNotFoundError after all its encoding; each now writes a temporary file of its own."""
    model, images = _model(), _images()
    real, temps = fc.save_tensors, []

    def slow_first_writer(tensors, path):
        real(tensors, path)
        temps.append(path)
        if len(temps) == 1:  # the other process writes the same entry before we rename
            FeatureCache(tmp_path).features(model, images, progress=False)

    monkeypatch.setattr(fc, "save_tensors", slow_first_writer)
    first = FeatureCache(tmp_path).features(model, images, progress=False)
    assert len(temps) == 2 and temps[0] != temps[1]
    (file,) = tmp_path.glob("*.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    again = FeatureCache(tmp_path)
    assert torch.equal(again.features(model, images, progress=False).embeddings,
                       first.embeddings) and again.hits == 1


def test_an_entry_published_while_encoding_is_kept(tmp_path, monkeypatch):
    """The other writer finished first: its entry (the same key, the same features) stays."""
    model, images = _model(), _images()
    real, writes = fc.encode_images, []

    def other_process_finishes_first(*args, **kwargs):
        if not writes:
            writes.append(1)
            FeatureCache(tmp_path).features(model, images, progress=False)
        return real(*args, **kwargs)

    monkeypatch.setattr(fc, "encode_images", other_process_finishes_first)
    monkeypatch.setattr(fc, "save_tensors", lambda t, p, real=fc.save_tensors: (
        writes.append(p), real(t, p)))
    FeatureCache(tmp_path).features(model, images, progress=False)
    assert len(writes) == 2  # the other's one write; ours was skipped
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and not list(tmp_path.glob("*.tmp"))


def test_temp_files_of_killed_writers_are_removed_once_stale(tmp_path):
    """A writer killed mid-write leaves its own temporary file, never written again: the next
    write removes those untouched for an hour (and the ``ENTRY.tmp`` older versions left)."""
    import os

    stale = [tmp_path / "a-b-plain.safetensors.123-0badf00d.tmp",
             tmp_path / "c-d-tokens.safetensors.tmp"]
    fresh = tmp_path / "e-f-plain.safetensors.456-12345678.tmp"
    other = tmp_path / "notes.tmp"  # not a cache writer's
    for path in (*stale, fresh, other):
        path.write_bytes(b"half")
    for path in (*stale, other):
        old = path.stat().st_mtime - 2 * fc.STALE_TEMP_SECONDS
        os.utime(path, (old, old))
    FeatureCache(tmp_path).features(_model(), _images(), progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tmp")) == sorted([fresh.name, other.name])


def _entry_written_then_unreadable(tmp_path, monkeypatch, error):
    model, images = _model(), _images()
    first = FeatureCache(tmp_path).features(model, images, progress=False)
    (file,) = tmp_path.glob("*.safetensors")
    content = file.read_bytes()

    def refused(path, *args, **kwargs):
        raise error(path)

    monkeypatch.setattr(fc, "load_file", refused)
    return model, images, first, file, content


def test_a_cache_file_without_read_permission_is_left_and_encoded_again(tmp_path, monkeypatch,
                                                                       capsys):
    """A group-shared cache: another user's entry this one may not read. It was deleted as if
    corrupt (and rewritten); it is left, and the features are encoded for this run."""
    import errno

    model, images, first, file, content = _entry_written_then_unreadable(
        tmp_path, monkeypatch, lambda p: PermissionError(errno.EACCES, "Permission denied", p))
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(file))))
    capsys.readouterr()
    cache = FeatureCache(tmp_path)
    again = cache.features(model, images, progress=False)
    monkeypatch.undo()
    assert torch.equal(again.embeddings, first.embeddings) and cache.misses == 1
    assert file.read_bytes() == content and not list(tmp_path.glob("*.tmp"))
    assert capsys.readouterr().err == (f"feature cache: {file} cannot be read (Permission "
                                       "denied); encoding its features again and leaving the "
                                       "file\n")


def test_a_cache_file_safetensors_cannot_open_is_not_deleted(tmp_path, monkeypatch, capsys):
    """safetensors reports a refused open (EACCES, say) as FileNotFoundError without errno
    for a file that exists: an OS error, not corruption, so the file stays."""
    model, images, first, file, content = _entry_written_then_unreadable(
        tmp_path, monkeypatch, lambda p: FileNotFoundError(f"No such file or directory: {p}"))
    capsys.readouterr()
    again = FeatureCache(tmp_path).features(model, images, progress=False)
    assert torch.equal(again.embeddings, first.embeddings) and file.read_bytes() == content
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "; encoding its features again and leaving the file" in err[0]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads any file; Windows has no chmod 000")
def test_a_real_unreadable_cache_file_is_left(tmp_path, capsys):
    model, images = _model(), _images()
    first = FeatureCache(tmp_path).features(model, images, progress=False)
    (file,) = tmp_path.glob("*.safetensors")
    file.chmod(0)
    try:
        again = FeatureCache(tmp_path).features(model, images, progress=False)
        assert file.exists() and torch.equal(again.embeddings, first.embeddings)
        assert "cannot be read (Permission denied); encoding" in capsys.readouterr().err
    finally:
        file.chmod(0o644)


def test_a_corrupt_cache_file_that_cannot_be_deleted_is_a_warning(tmp_path, monkeypatch,
                                                                   capsys):
    """A sticky-bit shared folder: another user's corrupt entry cannot be deleted. The
    PermissionError of the unlink ended the run; the features are encoded without it."""
    import errno
    from pathlib import Path

    model, images = _model(), _images()
    first = FeatureCache(tmp_path).features(model, images, progress=False)
    (file,) = tmp_path.glob("*.safetensors")
    file.write_bytes(file.read_bytes()[:40])  # truncated

    def refused(self, missing_ok=False):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "unlink", refused)
    capsys.readouterr()
    again = FeatureCache(tmp_path).features(model, images, progress=False)
    assert torch.equal(again.embeddings, first.embeddings) and file.stat().st_size == 40
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith(f"feature cache: {file} cannot be read (")
    assert err.endswith(", and cannot be deleted (Operation not permitted); encoding again")
