"""stag: turn pretrained Hugging Face decoders into StagFormer (time-staggered) models.

`from stagcli import StagForCausalLM` (or `import stagcli.model`) registers the "stag" model type
with transformers' Auto classes. Imports are lazy so that `stag --help` starts fast.
"""
__version__ = "0.1.0"
__all__ = ["StagConfig", "StagForCausalLM", "__version__"]


def __getattr__(name):
    if name in ("StagConfig", "StagForCausalLM"):
        from . import model
        return getattr(model, name)
    raise AttributeError(name)
