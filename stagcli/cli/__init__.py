"""The `stag` command line: thin Typer commands over plain functions (one module per command)."""
import typer

app = typer.Typer(help="Turn pretrained Hugging Face decoders into StagFormer models: convert, "
                       "fine-tune, evaluate, generate and benchmark.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)



@app.callback()
def _root():
    """Runs before every command: keep transformers' own progress bars and advisories off our screen."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


from . import convert, finetune, eval, generate, bench, experiment  # noqa: E402,F401  (each registers its command)


def main():
    app()
