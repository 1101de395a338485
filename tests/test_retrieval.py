"""Retrieval recall@k against hand-computed values on constructed similarities."""

import pytest
import torch

from cliplab.data.types import ImageTextPairs
from cliplab.evaluate.features import encode_images
from cliplab.evaluate.retrieval import retrieval, retrieval_metrics


def test_recall_at_k_by_hand():
    # 3 images on the axes; 4 captions: image 0 has two captions, images 1 and 2 one each.
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0.0, 0.0],    # caption of image 0: image 0 ranks 1st
                          [0.0, 0.9, 0.1],    # caption of image 0: images 1, 2, 0 -> 3rd
                          [0.0, 1.0, 0.0],    # caption of image 1: 1st
                          [0.2, 0.0, 0.15]])  # caption of image 2: images 0, 2 -> 2nd
    owner = torch.tensor([0, 0, 1, 2])
    m = retrieval_metrics(images, texts, owner, ks=(1, 2, 3))
    assert m["image_retrieval_recall@1"] == 0.5
    assert m["image_retrieval_recall@2"] == 0.75
    assert m["image_retrieval_recall@3"] == 1.0
    # image -> text: image 0's best caption is caption 0 (its own), image 1's is caption 2
    # (1.0 > 0.9), image 2's is caption 3 (0.15 > 0.1): all hits at k = 1
    assert m["text_retrieval_recall@1"] == 1.0


def test_image_to_text_counts_any_of_several_captions():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.2, 1.0],   # caption 0, of image 0, but closer to image 1
                          [1.0, 0.0],   # caption 1, of image 0
                          [0.0, 0.8]])  # caption 2, of image 1
    owner = torch.tensor([0, 0, 1])
    m = retrieval_metrics(images, texts, owner, ks=(1, 2))
    # image 0's top caption is its second one (a hit); image 1's top is caption 0 (a miss),
    # its own caption 2 comes second
    assert m["text_retrieval_recall@1"] == 0.5
    assert m["text_retrieval_recall@2"] == 1.0
    # text -> image: caption 0 finds image 1 first (miss), captions 1 and 2 hit
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 3)


def test_retrieval_task_on_a_model(tiny_model):
    g = torch.Generator().manual_seed(0)
    pairs = ImageTextPairs(torch.randint(0, 256, (6, 16, 16, 3), generator=g, dtype=torch.uint8),
                           [["a cat", "one cat"], ["a dog"], ["a car"], ["a bus"], ["a hat"],
                            ["a cup", "the cup"]])
    m = retrieval(tiny_model, pairs, ks=(1, 2, 8), progress=False)  # 6 images, 8 captions
    assert m["image_retrieval_recall@8"] == 1.0 and m["text_retrieval_recall@8"] == 1.0
    # by hand from the model's own embeddings: the rank of each caption's image among the
    # images, and of each image's best caption among the captions
    texts = [c for caps in pairs.captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(pairs.captions) for _ in caps])
    images = encode_images(tiny_model.eval(), pairs.images, progress=False).embeddings
    sims = tiny_model.encode_texts(texts).float() @ images.T  # [8 captions, 6 images]
    image_rank = (sims > sims[torch.arange(8), owner][:, None]).sum(1) + 1
    text_rank = torch.stack([(sims[:, i] > sims[owner == i, i].max()).sum() + 1
                             for i in range(6)])
    for k in (1, 2):
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(
            (image_rank <= k).float().mean().item()), k
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(
            (text_rank <= k).float().mean().item()), k


def _full_matrix_recalls(image_emb, text_emb, owner, rows, ks):
    """Recall@k from the whole [T, N] similarity matrix at once (the reference)."""
    sims = (text_emb @ image_emb.t())[rows]  # [T, N]
    out = {}
    for k in ks:
        t2i = sims.topk(min(k, sims.shape[1]), dim=1).indices
        out[f"image_retrieval_recall@{k}"] = (t2i == owner[:, None]).any(1).float().mean().item()
        i2t = sims.t().topk(min(k, sims.shape[0]), dim=1).indices
        own = torch.arange(sims.shape[1])[:, None]
        out[f"text_retrieval_recall@{k}"] = (owner[i2t] == own).any(1).float().mean().item()
    return out


@pytest.mark.parametrize("chunk", [1, 3, 7, 512])
def test_recalls_in_chunks_equal_the_whole_similarity_matrix(chunk):
    # blocks of captions and of images never hold the whole [U, N] matrix (a 50k x 50k set was
    # 20 GB), and give the whole matrix's numbers, ties of repeated captions and images included
    g = torch.Generator().manual_seed(3)
    image_emb = torch.nn.functional.normalize(torch.randn(23, 8, generator=g), dim=-1)
    image_emb[5] = image_emb[2]  # a repeated image
    text_emb = torch.nn.functional.normalize(
        image_emb[torch.randint(0, 23, (17,), generator=g)] + torch.randn(17, 8, generator=g),
        dim=-1)
    rows = torch.randint(0, 17, (40,), generator=g)  # captions repeat distinct texts
    owner = torch.randint(0, 23, (40,), generator=g)
    ks = (1, 2, 5, 30)
    got = retrieval_metrics(image_emb, text_emb, owner, ks, text_rows=rows, chunk=chunk)
    assert got == _full_matrix_recalls(image_emb, text_emb, owner, rows, ks)
    assert 0 < got["image_retrieval_recall@5"] < 1 and 0 < got["text_retrieval_recall@5"] < 1


class _Recorded(torch.Tensor):
    """A tensor that records the size of every tensor an operation on it makes."""

    sizes: list[int] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if isinstance(out, torch.Tensor):
            cls.sizes.append(out.numel())
        return out


def test_recalls_never_hold_the_whole_similarity_matrix():
    g = torch.Generator().manual_seed(4)
    n, u = 60, 50
    image_emb = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    text_emb = torch.nn.functional.normalize(torch.randn(u, 8, generator=g), dim=-1)
    _Recorded.sizes = []
    retrieval_metrics(image_emb.as_subclass(_Recorded), text_emb.as_subclass(_Recorded),
                      torch.arange(u) % n, (1, 5), chunk=4)
    # blocks of 4 rows (and views of the [N, 8] embeddings themselves), never the [U, N] matrix
    assert max(_Recorded.sizes) <= 8 * max(n, u) < n * u
