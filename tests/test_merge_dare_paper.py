"""DARE's qualitative claim (Yu et al. 2024, "Language Models are Super Mario") on small real
data: dropping 90% of a fine-tune's task vector and rescaling the rest by 1/(1−p) keeps nearly
all of the fine-tune's gain over its base, while dropping the same entries without the rescale
loses much of it.

The base is the shortened quickstart's LiT model (`tiny_lit_run`: pretrained on Fashion-MNIST,
never shown a digit; zero-shot on sklearn's 540 test digits near chance). The fine-tune trains
its image tower on the 1 257 training digits with the zero-shot head fixed (as task
arithmetic's fine-tunes do, so zero-shot accuracy *is* its accuracy): AdamW at 3e-4 for 5
epochs. p = 0.9 (the paper's headline rate) and the two bars below were fixed before any number
on this base was seen; the recipe was then picked among three tried with seed 0 for a gain well
above the noise of 540 test images and for speed: the project's default (1e-4, 2 epochs) gains
only 7 points (one standard error of a difference is about 2), 1e-4 for 10 epochs takes a
minute. All three passed both bars with seed 0 (DARE kept 82%, 109% and 98% of the gain; no
rescale 0%, 1%, 2%). Measured with this recipe (zero-shot top-1 on the test digits; the seed
is the fine-tune's and the masks'):

====  =====  =========  ============  ====================  =====================
seed  base   fine-tune  DARE p = 0.9  drop 90%, no rescale  gain kept: DARE / not
====  =====  =========  ============  ====================  =====================
0     6.9%   23.9%      23.5%         7.2%                  98% / 2%
1     6.9%   27.0%      25.0%         7.4%                  90% / 3%
2     6.9%   26.3%      24.1%         7.6%                  89% / 4%
====  =====  =========  ============  ====================  =====================

At this scale the claim needs a pretrained base: fine-tunes of a random-init tiny-clip (widths
32-128 on digits, zero-shot from ~10% to 37-89%) kept only 5%-60% of their gain under DARE
p = 0.9 (measured while writing this test, seed 0), in line with the paper's caveat that DARE
relies on the small deltas of fine-tuning a capable model (larger models tolerate larger p).
"""

import json

import pytest
import torch

from cliplab.adapt import AdaptContext, get_method
from cliplab.data.sources import as_labelled, load_source
from cliplab.evaluate.feature_cache import FeatureCache
from cliplab.evaluate.suite import run_task
from cliplab.evaluate.tasks import TaskContext
from cliplab.merge import dare_merge, drop_and_rescale, task_vector
from cliplab.merge.task_arithmetic import apply_task_vector
from cliplab.models import DualEncoder

P = 0.9
KEEPS_NEARLY_ALL = 0.8  # DARE keeps at least this share of the fine-tune's gain
LOSES_MUCH = 0.5  # dropping without the rescale keeps at most this share


def _digits(split: str):
    spec = {"source": "digits", "split": split, "image_size": 28}
    return as_labelled(load_source(spec), f"digits-{split}")


def _finetuned(model: DualEncoder, base_dir: str, seed: int) -> dict[str, torch.Tensor]:
    """``model``'s weights after fine-tuning its image tower (head fixed) on the train digits."""
    options = {"train_head": False, "train": {"lr": 3e-4, "epochs": 5, "seed": seed,
                                              "progress": False}}
    torch.manual_seed(seed)
    get_method("finetune").fit(model, _digits("train"), options,
                               AdaptContext(cache=FeatureCache(), seed=seed, progress=False,
                                            model_name=base_dir))
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


# slow: ~6 s a seed, but its base (`tiny_lit_run`, ~50 s) is built only for slow tests
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])  # the table's rows
def test_dare_keeps_the_gain_that_dropping_without_rescale_loses(tiny_lit_run, seed):
    base_dir = json.loads((tiny_lit_run / "results.json").read_text(encoding="utf-8"))["model_dir"]
    model = DualEncoder.load(base_dir)
    base = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    finetuned = _finetuned(model, base_dir, seed)
    test, context = _digits("test"), TaskContext(cache=FeatureCache(), progress=False)

    def accuracy(state: dict[str, torch.Tensor]) -> float:
        model.model.load_state_dict(state, strict=True)
        return float(run_task(model, {"task": "zeroshot", "data": test}, context)["acc1"])

    dare = dare_merge(base, [finetuned], drop_rate=P, seed=seed)
    # the same entries dropped (one model: its masks are the seed's first draws), none rescaled
    dropped = drop_and_rescale(task_vector(finetuned, base), P,
                               torch.Generator().manual_seed(seed), rescale=False)
    plain = apply_task_vector(base, dropped)
    acc = {name: accuracy(state) for name, state in
           (("base", base), ("fine-tune", finetuned), ("dare", dare), ("plain", plain))}
    gain = acc["fine-tune"] - acc["base"]
    assert gain > 0.1, acc  # the fine-tune learned digits, far past the test set's noise
    assert acc["dare"] - acc["base"] >= KEEPS_NEARLY_ALL * gain, acc
    assert acc["plain"] - acc["base"] <= LOSES_MUCH * gain, acc
