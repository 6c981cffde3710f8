"""The README's recipe reference and the shipped schema are what the options say now."""

from __future__ import annotations

import json
from pathlib import Path

from cnnreg.config import reference
from cnnreg.config.recipe import json_schema
from cnnreg.plugin.catalog import build_catalog
from cnnreg.plugin.manager import plugin_manager

REPO = Path(__file__).parent.parent


def test_the_readme_reference_is_generated_from_the_current_options():
    """Regenerate with `python -m cnnreg.config.reference` after changing an option."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert reference.BEGIN in readme and reference.END in readme
    assert reference.render() in readme


def test_the_reference_lists_every_trainer_option_with_its_description():
    from cnnreg.core.options import TrainerOptions

    text = reference.render()
    for name, field in TrainerOptions.model_fields.items():
        assert f"| `{name}` |" in text and " ".join(field.description.split()) in text


def test_the_shipped_schema_is_current():
    """recipe.schema.json (which the recipes name in "$schema") is what
    `cnnreg schema` prints for the built-ins."""
    shipped = json.loads((REPO / "recipes" / "recipe.schema.json").read_text())
    assert shipped == json.loads(json.dumps(json_schema(build_catalog(plugin_manager()))))
