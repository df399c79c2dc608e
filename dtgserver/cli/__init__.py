"""The `dtgserver` command: one click group; each command is one call into the Python API."""

from __future__ import annotations

import signal

import click

from .. import __version__


@click.group(context_settings={"auto_envvar_prefix": "DTGSERVER", "show_default": True,
                               "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dtgserver")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Ingestion server for Korean DTG/OBD/MDT terminals (Triphos DTG Upload Protocol v0.5)."""
    if ctx.invoked_subcommand != "serve":  # the program starts with them blocked for serve (__main__.py)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _register() -> None:
    from . import bridge_cmds, codec_cmds, prune_cmds, report_cmds, server_cmds, sim_cmds

    for module in (codec_cmds, server_cmds, prune_cmds, bridge_cmds, report_cmds, sim_cmds):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
