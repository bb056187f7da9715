"""The ``ubpdsl`` command line: prune, inspect, compile, emit, tune, bench.

Each subcommand lives beside the code it drives and is attached here; user errors
(:class:`ubpdsl.errors.UbpError`) become a one-line ``error: ...`` and exit code 1, and so,
as a last resort, do file system errors (``OSError``) and ``MemoryError``.
"""

from __future__ import annotations

import sys

import click

from ubpdsl.errors import UbpError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ubpdsl")
def cli() -> None:
    """ubpdsl: unaligned block pruning and fast sparse kernels for mobile CPUs.

    \b
    Example:
      ubpdsl prune --model mobilenetv2 --sparsity 0.75 --block 4 -o masks.npz
      ubpdsl compile --mask masks.npz --target aarch64-sve -o build/
    """


def _attach() -> None:
    """Attach the subcommands defined in the feature modules."""
    import importlib

    for module, names in [
        ("ubpdsl.prune.cli", ["prune", "inspect"]),
        ("ubpdsl.compile_cli", ["compile", "emit"]),
        ("ubpdsl.autotune.cli", ["tune"]),
        ("ubpdsl.bench_cli", ["bench"]),
        ("ubpdsl.export", ["export"]),
    ]:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a feature not built yet
            if exc.name and module.startswith(exc.name):
                continue
            raise
        for name in names:
            cmd = getattr(mod, name, None)
            if cmd is not None:
                cli.add_command(cmd, name)


_attach()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    try:
        cli.main(args=argv, prog_name="ubpdsl", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except UbpError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except OSError as exc:  # last resort: a file system problem no check above anticipated
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        return 1
    except MemoryError:
        click.echo("error: out of memory (the input is too large for this machine)", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
