"""Model soups (Wortsman et al. 2022): averaging the weights of fine-tunes of one pretrained
model. The greedy soup (ingredients sorted by held-out accuracy, each kept only if the soup's
held-out accuracy does not drop) is at least as good as the best single fine-tune; the uniform
soup of all ingredients falls below it when the ingredients' hyperparameters differ widely.

Setting: per seed, the competent base fine-tuned once at each learning rate of ``LRS`` (all ten
classes, image tower, zero-shot head fixed; the seed draws the training images and the data
order), merged with `cliplab.merge.soup`. Greedy order and acceptance use the validation pool
only; "best single" is the ingredient best on validation (what one would ship without a soup;
the greedy soup starts from it). The test set is only reported.

Rule, fixed before any number was seen (``compare``: means differ by more than twice the pooled
std over seeds): reproduced if the greedy soup is not below the best single ingredient on test
(above, or a tie, which the table says) and the uniform soup is below it.
"""

from __future__ import annotations

from cliplab.merge.soup import greedy_soup, uniform_soup

from paper_claims.common import ClaimContext, entry, mean_std, test_set, validation_pool
from paper_claims.finetunes import Scorer, compare, finetune, load, state_of
from paper_claims.wise_ft import AUGMENT, EPOCHS, sizes

CLAIM = "Greedy soup ≥ best single fine-tune on test; uniform soup below it (lrs differ)"
PAPER = "Wortsman et al. 2022 (Model soups)"
BASE = ("competent base (quickstart LiT), fine-tuned on all 10 classes at lr 3e-4 / 1e-3 / 3e-3 "
        "(WiSE-FT's recipe otherwise)")
PAPER_NUMBERS = ("ImageNet, ViT-G/14: greedy soup 90.94 vs best single 90.78; uniform soup "
                 "below the best when hyperparameters vary widely")
LRS = [3e-4, 1e-3, 3e-3]  # the soup's own fine-tunes (WiSE-FT's are of another base)


def run(ctx: ClaimContext) -> dict:
    train_size, val_size = sizes(ctx.quick)
    score = Scorer(ctx.base, {"val": load(validation_pool(ctx, val_size)),
                              "test": load(test_set(ctx))})

    def on(split):
        return lambda state: score(state, [split])[split]

    arms = {"best": [], "greedy": [], "uniform": [], "oracle": []}
    decisions = []
    for seed in ctx.seeds:
        names = [f"lr {lr:g}" for lr in LRS]
        states = [state_of(finetune(ctx, lr, EPOCHS, seed, train_size, augment=AUGMENT)) for lr in LRS]
        soup = greedy_soup(states, on("val"), names)
        tests = [on("test")(s) for s in states]
        arms["best"].append(tests[soup.kept[0]])
        arms["oracle"].append(max(tests))
        arms["greedy"].append(on("test")(soup.state))
        arms["uniform"].append(on("test")(uniform_soup(states)))
        decisions.append({"seed": seed, "validation": dict(zip(names, soup.scores)),
                          "test": dict(zip(names, tests)), "greedy_steps": soup.steps,
                          "kept": [names[i] for i in soup.kept]})

    pct = {k: [100 * v for v in vals] for k, vals in arms.items()}
    greedy_vs, uniform_vs = compare(pct["greedy"], pct["best"]), \
        compare(pct["uniform"], pct["best"])
    reproduced = greedy_vs != "below" and uniform_vs == "below"
    note = (f"greedy soup {greedy_vs} the best single ingredient" +
            ("" if greedy_vs == "above" else " (inside the noise)" if greedy_vs == "tie" else "")
            + f"; uniform soup {uniform_vs} it")
    numbers = {"best single (by validation)": mean_std(arms["best"]),
               "greedy soup": mean_std(arms["greedy"]),
               "uniform soup": mean_std(arms["uniform"]),
               "best single (by test, oracle)": mean_std(arms["oracle"]),
               "greedy vs best single": greedy_vs,
               "ingredients kept": [len(d["kept"]) for d in decisions]}
    result = entry(CLAIM, PAPER, reproduced, ctx.seeds, numbers, BASE, PAPER_NUMBERS, note)
    result["details"] = {"lrs": LRS, "epochs": EPOCHS, "augment": AUGMENT,
                         "train_size": train_size,
                         "validation_size": val_size, "per_seed": decisions}
    return result
