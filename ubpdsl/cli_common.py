"""Options shared by several ``ubpdsl`` subcommands, declared once.

:func:`model_options` adds ``--model``, ``--weights``, ``--input-shape``, ``--input-dtype`` and
``--batch`` (the model a command works on, see :func:`ubpdsl.models.resolve_model`);
:func:`load_model` turns the parsed values into a :class:`~ubpdsl.models.LoadedModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = ["MODEL_HELP", "load_model", "model_options"]

MODEL_HELP = ("Model: a built-in name (digits-cnn, mobilenetv2), FILE.py:FACTORY, MODULE:FACTORY "
              "(a class or function returning an nn.Module) or a torch.export program FILE.pt2.")


def model_options(required: bool = False, what: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding the model options (parameter names: model_spec, weights, input_shape,
    input_dtype, batch)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        opts = [
            click.option("--model", "model_spec", required=required, default=None, metavar="SPEC",
                         help=MODEL_HELP + (f" {what}" if what else "")),
            click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
                         help="State dict (.pt) for the model, read weights-only."),
            click.option("--input-shape", default=None, metavar="DIMS",
                         help="One example input without the batch dimension, e.g. 3,32,32 (built-in models "
                              "know theirs)."),
            click.option("--input-dtype", type=click.Choice(["float32", "int64"]), default=None,
                         help="dtype of the example input (int64 for token ids) [default: float32]."),
            click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
                         help="Batch size the model is deployed with: each layer's n = pixels (or tokens) "
                              "x batch."),
        ]
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return wrap


def load_model(model_spec: str, weights: Path | None = None, input_shape: str | None = None,
               input_dtype: str | None = None, batch: int = 1, *, pretrained: bool = True, seed: int = 0) -> Any:
    """The :class:`~ubpdsl.models.LoadedModel` for the parsed model options."""
    from ubpdsl.models import parse_input_shape, resolve_model

    return resolve_model(model_spec, weights=weights, input_shape=parse_input_shape(input_shape), batch=batch,
                         input_dtype=input_dtype, pretrained=pretrained, seed=seed)
