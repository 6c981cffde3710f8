"""``cnnreg validate``: check a recipe in seconds, on the CPU, with the run's own assembly.

:func:`validate_recipe` calls :func:`cnnreg.assemble.parts.assemble` -- the
function ``cnnreg run`` builds with -- without loading the data: a dataset
that can describe itself is described (an image folder's every header is
read, nothing decoded), so every data problem the run would stop at is
found here too. What is absent on this machine (a data folder, a weights
file, a download) is listed as not checked, and the rest is checked with a
stand-in; ``strict`` makes those errors.
"""

from __future__ import annotations

from dataclasses import dataclass

from cnnreg.assemble.parts import assemble
from cnnreg.core.records import Choice
from cnnreg.core.errors import RecipeError, Unchecked
from cnnreg.config.recipe import Recipe


@dataclass(frozen=True)
class Validation:
    """What validating a recipe found.

    :param summary: one line: the model, its size, the data and its shape.
    :param choices: what the run will choose for what the recipe leaves out.
    :param unchecked: what could not be checked here, and what the run would say without it.
    :param warnings: what the run will warn about before training.
    """

    summary: str
    choices: tuple[Choice, ...] = ()
    unchecked: tuple[Unchecked, ...] = ()
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.summary


def validate_recipe(recipe: Recipe, *, strict: bool = False) -> Validation:
    """Assemble ``recipe`` as a run would, on the CPU, without loading its data.

    :param strict: anything absent (not checked) is an error too.
    :raises RecipeError: every problem the run's assembly would stop at.
    """
    parts = assemble(recipe, load=False)
    if strict and parts.unchecked:
        raise RecipeError([u.problem for u in parts.unchecked])
    parameters = sum(p.numel() for p in parts.model.parameters())
    height, width = parts.info.image_size
    shape = f"{parts.channels}x{height}x{width}"
    data = (f"a stand-in batch of {shape}: the data is not here" if parts.data_absent
            else f"{parts.info.num_classes} classes, {shape}")
    summary = (f"{recipe.model.name} ({parameters / 1e6:.2f}M parameters) on {recipe.data.name} "  # type: ignore[attr-defined]
               f"({data})")
    return Validation(summary, parts.choices, parts.unchecked, parts.warnings)
