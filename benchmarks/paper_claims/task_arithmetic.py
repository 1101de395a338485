"""Task arithmetic (Ilharco et al. 2023): a task vector τ = θ_fine-tuned − θ_base; adding λτ
to the base gains on its task, negating it (λ < 0) forgets the task while a control task keeps
≥ 95% of the base's accuracy.

Setting: the task is telling apart the three classes the competent base never saw in
pretraining (shirt / sneaker / bag, 3-way zero-shot, which the base does well above chance from
their descriptions); the control is the seven seen classes (7-way). τ comes from fine-tuning the
base (image tower, zero-shot head fixed, as the paper) on task images only, one per seed. Edits
are `cliplab.merge.task_arithmetic`'s ``task_vector`` / ``apply_task_vector``.

λ is chosen per seed on the validation pool, never on the test set: for addition the λ of
``ADD`` with the best validation task accuracy; for negation (the paper's rule) the λ of
``NEGATE`` with the lowest validation task accuracy among those keeping validation control
accuracy ≥ 95% of the base's (none: λ = 0, nothing forgotten).

Rule, fixed before any number was seen (``compare``: means differ by more than twice the pooled
std over seeds): reproduced if, on test, the task accuracy with +λτ is above the base's, with
−λτ below the base's, and the mean control accuracy with −λτ is ≥ 95% of the base's.
"""

from __future__ import annotations

from cliplab.merge.task_arithmetic import apply_task_vector, task_vector

from paper_claims.common import HELDOUT, SEEN, ClaimContext, entry, mean_std, test_set, \
    validation_pool
from paper_claims.finetunes import Scorer, compare, finetune, load, only_classes, state_of

CLAIM = "Task arithmetic: +τ gains on its task; −τ forgets it, control ≥ 95% (λ on validation)"
PAPER = "Ilharco et al. 2023 (Editing models with task arithmetic)"
BASE = ("competent base (quickstart LiT); task: its 3 unseen classes, control: the 7 seen; "
        "τ from a fine-tune on task images at lr 3e-4")
PAPER_NUMBERS = ("CLIP ViTs, 8 tasks: −τ cuts target accuracy steeply with ImageNet control "
                 "kept ≥ 95% of the base (λ chosen so); +τ recovers most of the fine-tuned gain")
LR, EPOCHS = 3e-4, 3
ADD = [0.25, 0.5, 0.75, 1.0]
NEGATE = [-0.25, -0.5, -0.75, -1.0, -1.5]
KEEP = 0.95


def run(ctx: ClaimContext) -> dict:
    train_size, val_size = (500, 500) if ctx.quick else (5000, 5000)
    sets = {}
    for split, spec in (("val", validation_pool(ctx, val_size)), ("test", test_set(ctx))):
        data = load(spec)
        sets[f"{split} task"] = only_classes(data, HELDOUT)
        sets[f"{split} control"] = only_classes(data, SEEN)
    score = Scorer(ctx.base, sets)
    base = state_of(ctx.base)
    val_names, test_names = ["val task", "val control"], ["test task", "test control"]
    val_base, test_base = score(base, val_names), score(base, test_names)
    arms = {k: [] for k in ("base_task", "base_control", "add_task", "add_control",
                            "neg_task", "neg_control")}
    chosen = []
    for seed in ctx.seeds:
        tau = task_vector(state_of(finetune(ctx, LR, EPOCHS, seed, train_size, HELDOUT)), base)
        val = {lam: score(apply_task_vector(base, tau, lam), val_names) for lam in ADD + NEGATE}
        lam_add = max(ADD, key=lambda lam: val[lam]["val task"])
        allowed = [lam for lam in NEGATE
                   if val[lam]["val control"] >= KEEP * val_base["val control"]]
        lam_neg = min(allowed, key=lambda lam: val[lam]["val task"]) if allowed else 0.0
        chosen.append({"seed": seed, "add": lam_add, "negate": lam_neg, "validation": {
            str(lam): {k: round(100 * v, 2) for k, v in m.items()} for lam, m in val.items()}})
        test_add = score(apply_task_vector(base, tau, lam_add), test_names)
        test_neg = score(apply_task_vector(base, tau, lam_neg), test_names)
        for arm, m in (("base", test_base), ("add", test_add), ("neg", test_neg)):
            arms[f"{arm}_task"].append(m["test task"])
            arms[f"{arm}_control"].append(m["test control"])

    pct = {k: [100 * v for v in vals] for k, vals in arms.items()}
    add_vs, neg_vs = compare(pct["add_task"], pct["base_task"]), \
        compare(pct["neg_task"], pct["base_task"])
    control_ratio = (sum(pct["neg_control"]) / len(pct["neg_control"])) / \
        (sum(pct["base_control"]) / len(pct["base_control"]))
    reproduced = add_vs == "above" and neg_vs == "below" and control_ratio >= KEEP
    note = (f"+τ task accuracy {add_vs} the base's; −τ task accuracy {neg_vs} it; control at "
            f"{100 * control_ratio:.1f}% of the base's")
    numbers = {"task: base": mean_std(arms["base_task"]), "+λτ": mean_std(arms["add_task"]),
               "−λτ": mean_std(arms["neg_task"]),
               "control: base": mean_std(arms["base_control"]),
               "+λτ ": mean_std(arms["add_control"]), "−λτ ": mean_std(arms["neg_control"]),
               "λ (on validation) +/−": [[c["add"], c["negate"]] for c in chosen]}
    result = entry(CLAIM, PAPER, reproduced, ctx.seeds, numbers, BASE,
                   PAPER_NUMBERS, note)
    result["details"] = {"task": HELDOUT, "control": SEEN, "lr": LR, "epochs": EPOCHS,
                         "train_size": train_size, "validation_size": val_size,
                         "control_ratio_at_negation": round(control_ratio, 4),
                         "validation_base": {k: round(100 * v, 2) for k, v in val_base.items()},
                         "per_seed": chosen}
    return result
