"""The `moetrim` command line: one command per stage (calibrate, plan, apply), `compress` for all of
them, fine-tuning and recovery, evaluation, and the task-suite data. It sits above the library:
each command parses, checks its outputs before any work, calls the Python API and prints. User
mistakes end in one line and exit code 2; other failures in one line and exit code 1; never a
traceback for either (moetrim.cli.common).

common    consoles, one-line errors, shared options, loading     ranges    the range of every numeric option
stages    inspect, calibrate, plan, apply, merge                 results   plans shown, compressed models saved
compress  compress                                               evaluate  eval, routing, demo
train     finetune, recover                                      data      tasks
"""

import typer

from moetrim.checkpoint.atomic import raise_on_termination
from moetrim.cli import compress, data, evaluate, stages, train
from moetrim.cli.common import OneLineErrors

app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make Mixture-of-Experts models smaller and faster: calibrate once, plan, apply, save.",
)

# Every command, in the order `moetrim --help` lists them.
COMMANDS = {
    "inspect": stages.inspect,
    "calibrate": stages.calibrate_cmd,
    "plan": stages.plan_cmd,
    "apply": stages.apply_cmd,
    "compress": compress.compress,
    "merge": stages.merge,
    "eval": evaluate.eval_cmd,
    "demo": evaluate.demo,
    "finetune": train.finetune_cmd,
    "recover": train.recover_cmd,
    "tasks": data.tasks_cmd,
    "routing": evaluate.routing_cmd,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


def main() -> None:
    """Console-script entry point: SIGTERM and SIGHUP unwind like Ctrl-C, so temporaries are removed."""
    raise_on_termination()
    app()
