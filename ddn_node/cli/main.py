"""``ddn-node``: the command line for administrators and ML engineers.

Each group of commands lives with what it drives (``node_cmds``, ``model_cmds``,
``ops_cmds``, ``monitor_cmds``, ``promotion_cmds``, ``bench_cmds``); this module only assembles them.
"""

from __future__ import annotations

import os

import typer

from ddn_node.cli import (
    bench_cmds,
    conflict_cmds,
    model_cmds,
    monitor_cmds,
    node_cmds,
    ops_cmds,
    promotion_cmds,
)

app = typer.Typer(
    name="ddn-node",
    help="AI triage node for radiology: a DICOM AE that analyses studies and returns results to the PACS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
node_cmds.register(app)
model_cmds.register(app)
ops_cmds.register(app)
conflict_cmds.register(app)
monitor_cmds.register(app)
promotion_cmds.register(app)
bench_cmds.register(app)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # Spool, database, results and logs hold patient data: whatever umask the caller (a
    # shell, cron, a container) has, what the node creates is for its own user only
    # (0600 files, 0700 folders). systemd's UMask= says the same for the unit.
    os.umask(0o077)
    app(prog_name="ddn-node")


if __name__ == "__main__":  # pragma: no cover
    main()  # typer exits with the command's status itself
