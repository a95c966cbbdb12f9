"""The documentation stays true as the code moves: README is a front door of at most 150 lines that maps every
page of docs/, every link and image resolves, every file path a page names exists, every ``python -m`` module it
tells people to run exists, and every strategy field and preset is documented."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.unit

PAGES = sorted((ROOT / "docs").glob("*.md"))
README = ROOT / "README.md"


def test_readme_is_a_front_door_with_a_map_of_the_manual():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert {p.name for p in PAGES} <= set(re.findall(r"\(docs/([\w-]+\.md)\)", text))  # every page is on the map
    assert "make bench" in text and "make report" in text  # the two quickstart commands


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_links_images_and_paths_resolve(page):
    text = page.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)#:\s]+)\)", text):  # relative links and images
        if not (page.parent / target).exists():
            missing.append(target)
    rooms = "bench|models|strategies|reports|tests|docs|results"
    for path in set(re.findall(rf"`((?:{rooms})/[\w/.-]+\.(?:py|yaml|sh|md|j2))`", text)):
        if not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{page.name} names what does not exist: {missing}"


def test_every_module_people_are_told_to_run_exists():
    modules = {m for p in [README, *PAGES] for m in re.findall(r"python -m ([a-z_][\w.]*)", p.read_text())}
    assert {"bench.plan", "bench.tune", "bench.gate", "reports"} <= modules
    assert not [m for m in modules - {"pytest"} if importlib.util.find_spec(m) is None]


def test_every_strategy_field_and_preset_is_documented():
    from strategies import StrategyConfig

    text = (ROOT / "docs" / "strategies.md").read_text()
    fields = [f for f in StrategyConfig.__dataclass_fields__ if f"`strategy.{f}`" not in text]
    presets = [p.stem for p in (ROOT / "bench" / "conf" / "strategy").glob("*.yaml") if p.stem not in text]
    assert not fields and not presets
