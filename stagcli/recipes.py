"""YAML recipes: reading them, and checking their keys against the dataclasses that declare the
options (Layout, TrainConfig), so that a typo fails before any work. Shared by `stag finetune
--recipe` and `stag experiment`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import StagError


def load_yaml(path) -> dict:
    import yaml
    path = Path(path)
    if not path.is_file():
        raise StagError(f"recipe not found: {path}")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise StagError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise StagError(f"recipe {path}: expected a mapping at the top, not {type(recipe).__name__}")
    return recipe


def check_keys(section: dict, known, where: str):
    unknown = sorted(set(section or {}) - set(known))
    if unknown:
        raise StagError(f"{where}: unknown keys {unknown}; known: {', '.join(sorted(known))}")


# --- stag finetune --recipe -----------------------------------------------------------------------
RECIPE_KEYS = {"name", "description", "model", "convert", "finetune"}
CONVERT_EXTRA = {"source", "dtype", "out"}  # besides the Layout fields


def load_recipe(path) -> dict:
    """A fine-tuning recipe: `convert:` (a Layout + source, dtype, optional out) or `model:`, and
    `finetune:` (TrainConfig fields)."""
    from .layout import FIELDS as LAYOUT_FIELDS
    from .train import TrainConfig
    recipe = load_yaml(path)
    check_keys(recipe, RECIPE_KEYS, f"recipe {path}")
    convert = recipe.get("convert") or {}
    check_keys(convert, set(LAYOUT_FIELDS) | CONVERT_EXTRA, f"recipe {path}: convert")
    if convert and "source" not in convert:
        raise StagError(f"recipe {path}: convert needs a source")
    TrainConfig.from_dict(recipe.get("finetune") or {}, where=f"recipe {path}")  # fail early on typos
    return recipe


def recipe_model(recipe: dict, out_dir, on_convert=None) -> Optional[str]:
    """The model a recipe trains: its `model`, or the output of its `convert` step (run once, on the
    main process; reused when it already exists, e.g. on --resume)."""
    from .layout import FIELDS as LAYOUT_FIELDS, Layout
    from .train import process_state
    convert = dict(recipe.get("convert") or {})
    if not convert:
        return recipe.get("model")
    target = Path(convert.pop("out", None) or Path(out_dir) / "converted")
    source, dtype = convert.pop("source"), convert.pop("dtype", "float32")
    layout = Layout.from_dict({k: v for k, v in convert.items() if k in LAYOUT_FIELDS}, where="recipe convert")
    state = process_state()
    with state.main_process_first():
        if state.is_main_process and not (target / "config.json").is_file():
            from .convert import convert as run_convert
            if on_convert:
                on_convert(source, target)
            run_convert(str(source), str(target), layout, dtype=dtype)
    return str(target)
