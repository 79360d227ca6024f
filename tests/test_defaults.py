"""The defaults a user gets are the ones the README states (and says why), and ``repair="auto"`` resolves per
kind of model as the panel (examples/panel.py) chose."""

import re
from pathlib import Path

import hubmerge
from hubmerge.options import MergeOptions
from hubmerge.repair import resolve

from conftest import labelled, make

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_defaults() -> dict[str, str]:
    """option → default as written in the README's options table (``| `a`, `b` | 1, 2 | ... |`` rows)."""
    text = README.read_text()
    table = text[text.index("| option | default | meaning |"):]
    found = {}
    for row in table.splitlines()[2:]:
        if not row.startswith("|"):
            break
        names, defaults = (cell.strip() for cell in row.strip("|").split("|")[:2])
        names = re.findall(r"`(\w+)`", names)
        values = [v.strip().strip("`") for v in defaults.split(",")]
        assert len(names) == len(values), row
        found.update(zip(names, values))
    return found


def test_the_readme_states_every_default_as_the_library_has_it():
    stated = readme_defaults()
    fields = MergeOptions.model_fields
    assert set(stated) == set(fields), "options missing from (or unknown to) the README's table"
    for name, value in stated.items():
        assert value == str(fields[name].default), name


def test_auto_repair_is_reset_repair_with_batchnorm_and_repair_without():
    assert resolve("auto", make("mlp_bn", 0)) == "reset_repair"
    assert resolve("auto", make("mlp", 0)) == "repair"
    assert resolve("reset", make("mlp", 0)) == "reset" and resolve(None, make("mlp_bn", 0)) is None


def test_a_merge_records_what_auto_was_for_its_endpoints():
    result = hubmerge.merge(make("mlp_bn", 1), make("mlp_bn", 2), labelled("mlp_bn"), repair="auto", gamma=0.3)
    assert result.report.options["repair"] == "reset_repair"
    assert result.model.settings["repair"] == "reset_repair"
