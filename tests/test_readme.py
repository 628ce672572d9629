"""The README's equation -> code table names functions that exist, and covers every section of PAPER.md."""
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_SECTIONS = ("User model f_P", "Personalized LM", "P-DPO (eq. pdpo)", "P-RM", "Experiments", "Experiment 1",
                  "Experiment 2", "Experiment 3")
CODE = re.compile(r"`([\w/]+)\.py` `([\w.]+)`")  # `prlhf.py` `pdpo_loss`, `prepare/tldr.py` `tldr_to_pairs`


def equation_table() -> list[tuple[str, str, str]]:
    """(PAPER.md section, equation, code cell) of each row under "## The paper in the code"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## The paper in the code", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    return [tuple(cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:4]) for row in rows]


def test_every_function_the_equation_table_names_exists():
    rows = equation_table()
    assert len(rows) >= 15
    named = 0
    for section, equation, code in rows:
        places = CODE.findall(code)
        assert places, f"row {section!r} / {equation!r} names no `file.py` `function`"
        for path, name in places:
            module = importlib.import_module(path.replace("/", "."))
            target = module
            for part in name.split("."):
                assert hasattr(target, part), f"README: {path}.py has no {name} (row {equation!r})"
                target = getattr(target, part)
            assert callable(target), f"README: {path}.py {name} is not a function or class"
            named += 1
    assert named >= len(rows)


def test_the_equation_table_covers_every_section_of_the_paper():
    assert {section for section, _, _ in equation_table()} == set(PAPER_SECTIONS)


def test_a_wrong_name_would_be_caught():
    """The checker itself: a row naming a function that is not there fails."""
    path, name = CODE.findall("`prlhf.py` `no_such_loss`")[0]
    assert not hasattr(importlib.import_module(path), name)
