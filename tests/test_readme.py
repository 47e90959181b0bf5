"""The README's first commands and configuration table stay true to the project."""

from __future__ import annotations

from pathlib import Path

from headwater.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands():
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("make ")]
    assert [ln.split()[1] for ln in lines[:2]] == ["demo", "test"]
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_setting_is_documented():
    readme = (ROOT / "README.md").read_text()
    missing = [n for n in Settings.model_fields if f"`HEADWATER_{n.upper()}`" not in readme]
    assert not missing, f"settings missing from the README's table: {missing}"
