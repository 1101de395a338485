"""Adaptation methods: each a module with ``run(model_path, cfg, out, progress) -> dict``.

``METHODS`` maps a method name (``cliplab adapt --method NAME``) to its module.
"""

METHODS = {
    "lora": "cliplab.adapt.lora",
    "finetune": "cliplab.adapt.finetune",
    "wise-ft": "cliplab.adapt.wise_ft",
}
