"""README's links inside itself (its contents list) lead to a heading: renaming a section
without its link broke the link silently."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces made ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor_drops_punctuation_as_github_does():
    assert github_anchor("Adapting a model (`cliplab adapt`)") == "adapting-a-model-cliplab-adapt"
    assert github_anchor("Fine-tuning: LoRA, WiSE-FT") == "fine-tuning-lora-wise-ft"
    assert github_anchor("Coming from CLIP_benchmark") == "coming-from-clip_benchmark"


def test_every_link_inside_the_readme_names_one_of_its_headings():
    text = README.read_text(encoding="utf-8")
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # a `#` in a code block is no heading
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", prose, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", prose)
    assert links, "README has a contents list"
    assert sorted(set(links) - anchors) == []
    sections = {github_anchor(h) for h in re.findall(r"^## (.+)$", prose, flags=re.M)}
    assert sorted(sections - set(links)) == [], "every section is in the contents list"
