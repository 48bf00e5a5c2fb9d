"""The README's quick start runs as written (its offline part), and every docs page it links exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_start_runs(capsys):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, re.S).group(1)
    offline = block.split("# Real checkpoints")[0]
    exec(compile(offline, "README.md quick start", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert "The answer is" in printed[0]
    assert int(printed[2]) < 64 and int(printed[3]) < 64  # threshold and guide: fewer forwards than tokens
    assert "The answer is" in printed[4]  # the block diffusion model


def test_readme_links_point_at_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and all((ROOT / link).is_file() for link in links), links
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted({Path(link).name for link in links}):
        assert page in nav, f"{page} is not in mkdocs.yml's nav"


def test_the_worked_example_of_a_cache_rule_runs(capsys):
    """docs/engine.md's "a new cache rule in 13 lines" decodes as written."""
    engine = (ROOT / "docs" / "engine.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", engine, re.S) if "class EveryOther" in b)
    rule = block[block.index("class EveryOther") : block.index("\n\n\npipe =")]
    assert len(rule.splitlines()) == 13
    exec(compile(block, "docs/engine.md", "exec"), {})
    assert "The answer is" in capsys.readouterr().out
