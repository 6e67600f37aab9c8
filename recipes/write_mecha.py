"""Write the example `.mecha` files next to this script from the recipe functions.

    python recipes/write_mecha.py

Model paths are placeholders relative to the working directory (or an sd-mecha model dir).
Loading a file needs `import sd_mecha_rebasin` first: it registers the `git_rebasin` method.
"""

from __future__ import annotations

import functools
import pathlib

import add_difference_rebasin
import align_many
import block_weights_rebasin
import merge_many
import rebasin_average
import sd_mecha
import ties_many
import ties_rebasin

HERE = pathlib.Path(__file__).resolve().parent

#: file stem -> (recipe function, placeholder model files in argument order)
RECIPES = {
    "rebasin_average": (rebasin_average.recipe, ["A.safetensors", "B.safetensors"]),
    "ties_rebasin": (
        ties_rebasin.recipe,
        ["base.safetensors", "M1.safetensors", "M2.safetensors", "M3.safetensors"],
    ),
    "add_difference_rebasin": (
        add_difference_rebasin.recipe,
        ["A.safetensors", "B.safetensors", "C.safetensors"],
    ),
    "align_many": (
        align_many.recipe,
        ["ref.safetensors", "M1.safetensors", "M2.safetensors", "M3.safetensors"],
    ),
    # SD1 (the placeholder files cannot be inspected): sd-mecha's sd1-supermerger_blocks conversion
    "block_weights_rebasin": (
        functools.partial(block_weights_rebasin.recipe, config="sd1-ldm"),
        ["A.safetensors", "B.safetensors"],
    ),
    "merge_many": (merge_many.recipe, ["M1.safetensors", "M2.safetensors", "M3.safetensors"]),
    "ties_many": (
        ties_many.recipe,
        ["base.safetensors", "M1.safetensors", "M2.safetensors", "M3.safetensors"],
    ),
}

HEADER = (
    "# needs `import sd_mecha_rebasin` before sd_mecha.deserialize: it registers the merge method git_rebasin"
)
HEADER_MANY = HEADER.replace("git_rebasin", "git_rebasin_many")


def mecha_text(stem: str) -> str:
    """sd_mecha.serialize of the recipe, with comment lines after the version line."""
    fn, models = RECIPES[stem]
    version, *lines = sd_mecha.serialize(fn(*models), finalize=False).split("\n")
    module = getattr(fn, "func", fn).__module__
    models_line = f"# models: {' '.join(models)} ({module}.py)"
    # no newline at the end: sd-mecha 1.1.8 fails on an empty line
    header = HEADER_MANY if "git_rebasin_many" in "\n".join(lines) else HEADER
    return "\n".join([version, header, models_line, *lines])


def main() -> None:
    for stem in RECIPES:
        path = HERE / f"{stem}.mecha"
        path.write_text(mecha_text(stem))
        print(path)


if __name__ == "__main__":
    main()
