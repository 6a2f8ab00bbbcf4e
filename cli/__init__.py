"""The ``gradcam-batch`` command line: thin click commands over the engine API."""

from __future__ import annotations

import click

from gradcam_batch.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradcam-batch")
def cli() -> None:
    """High-throughput, batched Grad-CAM explanations for whole image datasets."""


def _register() -> None:
    from gradcam_batch.cli.demo import demo

    cli.add_command(demo)
    from gradcam_batch.cli.run import run

    cli.add_command(run)
    from gradcam_batch.cli.layers import layers

    cli.add_command(layers)
    from gradcam_batch.cli.bench import bench

    cli.add_command(bench)
    from gradcam_batch.cli.audit import audit

    cli.add_command(audit)


_register()


def main() -> None:
    cli(prog_name="gradcam-batch")


__all__ = ["cli", "main"]
