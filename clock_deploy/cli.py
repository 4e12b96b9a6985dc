"""`clock-deploy` command line.

Sub-commands live next to the code they drive and are imported only when
called, so `clock-deploy --help` is instant and the runtime path never needs torch.
"""
import importlib
import logging
import signal
import sys
import threading

import click

from clock_deploy import __version__
from clock_deploy.errors import UserError

COMMANDS = {
    "data": ("clock_deploy.data.commands", "data", "Synthesize, convert and inspect KITTI / COCO data."),
    "eval": ("clock_deploy.eval.commands", "eval_cmd", "KITTI AP (R40/R11) and COCO mAP of detection files."),
    "train": ("clock_deploy.training.commands", "train", "Train a teacher or a baseline student."),
    "distill": ("clock_deploy.training.commands", "distill", "Distill a student from a teacher (CLoCK, KD-DETR, FGD)."),
    "import": ("clock_deploy.convert.commands", "import_cmd",
               "Convert a pretrained DETR (transformers folder, official .pth) into a checkpoint."),
    "export": ("clock_deploy.export.commands", "export",
               "Export a checkpoint to ONNX (FP32/FP16/INT8) and TensorRT."),
    "engine": ("clock_deploy.export.commands", "engine",
               "Build a TensorRT engine from an exported ONNX, on the device."),
    "calibrate": ("clock_deploy.export.commands", "calibrate",
                  "Choose an INT8 calibration set and write its manifest."),
    "bench": ("clock_deploy.measure.commands", "bench", "Latency and accuracy of models x backends, side by side."),
    "pipeline": ("clock_deploy.pipeline", "pipeline", "Synthesize -> train -> distill -> export -> bench, resumable."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_text) for name, (_, _, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="clock-deploy")
def cli():
    """Distill compact DETR detectors, export them and benchmark them for embedded GPUs."""


def main(argv=None):
    run(cli, argv)


def _message(error):
    """The message of a UserError; one raised in a DataLoader worker arrives wrapped in the worker's
    traceback, whose last line is the original message."""
    text = str(error)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


def _exit_on_sigterm(signum, frame):
    # unwind like Ctrl-C: `finally` blocks remove temporary files and kill child processes
    raise SystemExit(128 + signum)


LOG_HANDLER_NAME = "clock_deploy.cli"


def _log_handler():
    """A RichHandler that prints INFO records as the bare message (they are the command's running
    commentary, read by people and scripts alike) and warnings / errors with their level; progress
    bars step aside for each record, as for tqdm.write."""
    # start-up: rich and tqdm only once a command runs, so `clock-deploy --help` stays instant
    from rich.console import Console
    from rich.logging import RichHandler
    from tqdm import tqdm

    class Handler(RichHandler):
        def render(self, *, record, traceback, message_renderable):
            if record.levelno <= logging.INFO:
                return message_renderable
            return super().render(record=record, traceback=traceback, message_renderable=message_renderable)

        def emit(self, record):
            with tqdm.external_write_mode():
                super().emit(record)

    handler = Handler(console=Console(soft_wrap=True), show_time=False, show_path=False, markup=False)
    handler.set_name(LOG_HANDLER_NAME)
    return handler


def setup_logging(level=logging.INFO):
    """Show the library's log records (loggers under `clock_deploy`) on stdout; installed once. The
    library itself only calls logging.getLogger(__name__), so an application embedding it decides."""
    logger = logging.getLogger("clock_deploy")
    if not any(h.get_name() == LOG_HANDLER_NAME for h in logger.handlers):
        logger.addHandler(_log_handler())
    logger.setLevel(level)


def run(command, argv=None):
    """Run a click command; user errors become one red line and exit code 2, not a traceback."""
    setup_logging()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        command.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.secho(f"error: {_message(e)}", fg="red", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    main()
