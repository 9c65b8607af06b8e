"""What every `moetrim` command shares: consoles, one-line errors and exit codes, option declarations,
checks made before anything loads, and loading a model and its tokenizer quietly.

Exit codes: 0 done; 2 a usage mistake (bad option, bad input file, an --out that would touch an
input); 1 a failure (bad checkpoint, disk full, a bug); 130 interrupted; 143 terminated, with nothing
written (a signal that lands once every output is in place exits 0 and says the output is complete).
Every error is one line on stderr; `MOETRIM_DEBUG=1` shows the traceback of unexpected ones.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup, TyperOption

from moetrim.checkpoint import outputs
from moetrim.checkpoint.atomic import Terminated, describe_os_error
from moetrim.cli.ranges import check_numbers, option_names
from moetrim.errors import MoetrimError, UsageError

_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _console(stderr: bool = False) -> Console:
    # Piped output keeps whole table rows instead of cutting them at rich's default 80 columns.
    stream = sys.stderr if stderr else sys.stdout
    wide = None if stream.isatty() else 240
    return Console(stderr=stderr, width=wide)


out = _console()
err = _console(stderr=True)


class OneLineErrors(TyperGroup):
    """Click's own usage errors (unknown option, bad number) as one line and exit 2, like ours."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name="moetrim", complete_var=complete_var, standalone_mode=False, **extra)
        except _ClickException as exc:
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has already printed the help
                ctx = getattr(exc, "ctx", None)
                where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
                err.print(f"[bold red]error:[/] {escape(exc.format_message().rstrip('.'))}{escape(where)}", highlight=False, soft_wrap=True)
            rv = exc.exit_code
        except typer.Abort:
            rv = 130
        except Terminated as exc:  # a signal outside any command's own handling (parsing, imports, after it returned)
            rv = stopped(f"terminated ({exc})", 143)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


# typer labels flags "<bool>" as if they took a value; they take none.
if hasattr(TyperOption, "display_type_rich"):
    _display_type_rich = TyperOption.display_type_rich

    def _flag_has_no_type(self, ctx):
        return None if getattr(self, "is_flag", False) else _display_type_rich(self, ctx)

    TyperOption.display_type_rich = _flag_has_no_type


def stopped(what: str, code: int) -> int:
    """Say what a signal left on disk; the exit code: `code`, or 0 when every output was already in place."""
    done, pending = outputs.finished_outputs()
    names = ", ".join(escape(str(p)) for p in done)
    if done and not pending:
        err.print(f"{what} after the output was complete: {names} is written in full", highlight=False, soft_wrap=True)
        return 0
    if done:
        err.print(f"{what}: {names} is complete; nothing was written to {', '.join(escape(str(p)) for p in pending)}",
                  highlight=False, soft_wrap=True)
    else:
        err.print(f"{what}; nothing was written to the output")
    return code


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handled(fn):
    """Turn every failure into a one-line message and the right exit code; never a traceback. Every
    numeric option is checked against its range (moetrim.cli.ranges) before the command runs."""
    names = option_names(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        outputs.begin_command()
        try:
            check_numbers(kwargs, names)
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except MoetrimError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            raise typer.Exit(stopped("interrupted", 130))
        except Terminated as exc:
            raise typer.Exit(stopped(f"terminated ({exc})", 143))
        except MemoryError:
            _fail("out of memory; lower --batch-size or --seq-len, or use --dtype bfloat16", 1)
        except OSError as exc:
            _fail(describe_os_error(exc), 1)
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
                _fail("out of device memory; lower --batch-size or --seq-len, or spread the model with --device-map auto "
                      "(calibrate, compress: and --grad-checkpoint)", 1)
            if os.environ.get("MOETRIM_DEBUG"):
                raise
            first = (str(exc).splitlines() or [""])[0][:300]
            _fail(f"internal error ({type(exc).__name__}: {first}); this is a bug in moetrim: "
                  "please report it with the command (MOETRIM_DEBUG=1 shows the traceback)", 1)
        finally:
            outputs.end_command()  # scratch folders (offloaded weights) go with the command

    return wrapper


# -- shared options (typer reads defaults and help from these) ------------------------------------
DeviceOpt = typer.Option("cpu", "--device", help="cpu, cuda or auto")
DtypeOpt = typer.Option("auto", "--dtype", help="load dtype: auto (as saved), float32, bfloat16, float16")
TrustOpt = typer.Option(False, "--trust-remote-code", help="allow code shipped with the checkpoint to run")
SeedOpt = typer.Option(0, "--seed", help="seed for data sampling and random criteria")
OverwriteOpt = typer.Option(False, "--overwrite", help="replace an existing output that moetrim wrote (never an input)")
MaxTokensOpt = typer.Option(None, "--max-tokens", help="calibrate on at most this many tokens (at least 2)")
SeqLenOpt = typer.Option(None, "--seq-len", help="tokens per calibration sequence (default: 512, or the model's context if shorter)")
BatchOpt = typer.Option(4, "--batch-size", help="calibration sequences per forward/backward pass")
FisherModeOpt = typer.Option("sequence", "--fisher-mode", help="square gradients per 'sequence' (default) or per 'batch'")
GranularityOpt = typer.Option("dims", "--granularity", help="dims (trim intermediate dimensions), experts (remove whole experts); "
                              "compress also: replace, naive, merge, d2 (experts become shared bases + low-rank corrections); "
                              "experts --novice: MoNE")
NoviceOpt = typer.Option(False, "--novice", help="experts: removed experts become novices, each its constant mean output "
                         "added with its routing weight (MoNE; criterion mone by default; replaced format)")
RatioOpt = typer.Option(0.5, "--ratio", help="fraction of routed-expert parameters to remove, in [0, 1)")
MinWidthOpt = typer.Option(None, "--min-width", help="dims: smallest width an expert keeps (default 1/32 of the width; 0 lets experts go)")
RoundToOpt = typer.Option(None, "--round-to", help="dims: widths in multiples of N (default 1; uniform rounds to 8 when within 2 points)")
ProtectOpt = typer.Option(0, "--protect", help="dims: never remove the K dims per layer with the largest max|h|")
SequentialOpt = typer.Option(False, "--sequential", help="calibrate one decoder layer at a time, read from the checkpoint's "
                              "files (forward statistics only: no Fisher); for models larger than memory")
StreamingOpt = typer.Option(False, "--streaming", help="work from the checkpoint on disk one decoder layer at a time "
                             "(never holds the whole model: for models larger than memory)")
ExponentsOpt = typer.Option(None, "--exponents", help="with --criterion unified: a,b,p of S(a,b,p) (b, p in 0, 1, 2)")
DeviceMapOpt = typer.Option(None, "--device-map", help="spread the model over devices (accelerate): auto, balanced, sequential, "
                            "or a JSON file {module: device}; 'cpu' and 'disk' entries offload")
MaxMemoryOpt = typer.Option(None, "--max-memory", help="with --device-map auto/balanced: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB")
OffloadFolderOpt = typer.Option(None, "--offload-folder", help="folder for the weights --device-map offloads to disk")
GradCheckpointOpt = typer.Option(False, "--grad-checkpoint", help="Fisher: recompute each decoder layer in backward "
                                 "(the memory of a forward pass, for about one more forward of time; same profile)")
RankOpt = typer.Option(16, "--rank", help="replace/naive: rank of each replaced expert's corrections (d2 picks its own)")
MaxGroupOpt = typer.Option(8, "--max-group", help="replace: most replaced experts sharing one base")
WeightingOpt = typer.Option(None, "--base-weighting", help="how members weigh in their base: usage, uniform, fisher or fisher_usage "
                            "(default: usage; D²-MoE: fisher)")
WhitenOpt = typer.Option(False, "--whiten", help="replace/d2: whiten the corrections' SVD by each matrix's inputs (SVD-LLM, D²-MoE)")


def placement(device_map: Optional[str], max_memory: Optional[str], offload_folder: Optional[Path], device: str,
              inputs: list = (), outputs: dict[str, Optional[Path]] | None = None) -> dict:
    """The placement options as load_model's keyword arguments, checked before anything loads.
    `outputs` ({option: path}) are the command's outputs, which the offload folder must stay clear of;
    the weights themselves go to a hidden folder inside it that lives as long as the command
    (offload_scratch)."""
    from moetrim.calibrate.distributed import env_world_size
    from moetrim.checkpoint.placement import check_placement, parse_device_map, parse_max_memory

    dm, mm = parse_device_map(device_map), parse_max_memory(max_memory)
    check_placement(dm, mm, offload_folder, device)
    if dm is None:
        return {}
    if env_world_size() > 1:
        raise UsageError("--device-map with several processes: each would spread its copy over the same devices; "
                         "run one process with --device-map, or several with --device")
    if offload_folder is not None:
        check_offload_folder(offload_folder, inputs, outputs or {})
    return {"device_map": dm, "max_memory": mm, "offload_folder": offload_folder}


def check_offload_folder(folder: Path, inputs: list, outputs: dict[str, Optional[Path]]) -> None:
    """--offload-folder: not an input nor around one, apart from every output, a folder we can write in."""
    from moetrim.checkpoint.outputs import SCRATCH, check_output, overlap

    for given in inputs:
        if given is not None and overlap(folder, given):
            raise UsageError(f"--offload-folder {folder} {overlap(folder, given)} the input {given}; moetrim writes nothing "
                             "beside its inputs: give the offloaded weights a folder of their own")
    for option, path in outputs.items():
        if path is not None and overlap(folder, path):
            raise UsageError(f"--offload-folder {folder} {overlap(folder, path)} {option} {path}, an output of this command; "
                             "give the offloaded weights a folder of their own")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--offload-folder {folder} is a file; give a folder")
    check_output(folder / SCRATCH, kind="folder", inputs=list(inputs), option="--offload-folder", declare=False)


def offload_scratch(place: dict) -> dict:
    """`place` with the offload folder swapped for a hidden one inside it, removed when the command ends."""
    from moetrim.checkpoint.outputs import scratch_dir

    if place.get("offload_folder") is None:
        return place
    return {**place, "offload_folder": scratch_dir(place["offload_folder"])}


def criterion_option() -> Optional[str]:
    from moetrim import criteria

    dims, experts = ", ".join(criteria.names("dim")), ", ".join(criteria.names("expert"))
    return typer.Option(None, "--criterion", help=f"dims: {dims} (default fisher). experts: {experts} (default reap)")


def allocation_option() -> Optional[str]:
    return typer.Option(None, "--allocation", help="global, layer, uniform or layer_width (dims: one width per layer) "
                        "(default: global for dims, layer for experts)")


def parse_exponents(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError("--exponents takes three numbers a,b,p (e.g. 0,1,1 for REAP)") from None
    if len(vals) != 3:
        raise UsageError("--exponents takes three numbers a,b,p (e.g. 0,1,1 for REAP)")
    return vals


MERGE_METHODS = ("hc-smoe", "ream")
MergeMethodOpt = typer.Option("hc-smoe", "--merge-method", help="merge: hc-smoe (HC-SMoE: groups share one expert, the router "
                              "keeps every row) or ream (REAM: groups merged into their most salient expert after neuron "
                              "matching, the rest leave the router; a standard checkpoint)")


def method_granularity(granularity: str, novice: bool, merge_method: str = "hc-smoe") -> str:
    """--granularity experts --novice is MoNE and --granularity merge --merge-method ream is REAM, planned and
    saved as the replace family's 'novice' and 'ream'."""
    if merge_method not in MERGE_METHODS:
        raise UsageError(f"unknown --merge-method '{merge_method}'; choose from {', '.join(MERGE_METHODS)}")
    if merge_method != "hc-smoe":
        if granularity != "merge":
            raise UsageError(f"--merge-method picks how experts are merged: it applies to --granularity merge, not {granularity}")
        if novice:
            raise UsageError("--novice applies to --granularity experts, not merge")
        return "ream"
    if not novice:
        return granularity
    if granularity != "experts":
        raise UsageError(f"--novice replaces removed experts by constant outputs: it applies to --granularity experts, not {granularity}")
    return "novice"


def resolve_method(granularity: str, criterion: Optional[str], ratio: float, allocation: Optional[str]) -> Optional[str]:
    """Fail before any expensive work on a bad method choice; returns the criterion (its default filled in)."""
    from moetrim.pipeline.compress import check_method

    return check_method(granularity, criterion, ratio, allocation)


def data_files(data: str | None) -> list[Path]:
    """The comma-separated data files of --data, each checked to exist (none without --data)."""
    files = [Path(part) for part in data.split(",")] if data is not None else []
    for f in files:
        if not f.is_file():
            raise UsageError(f"data file not found: {f}")
    return files


def model_dir(model_path: str) -> Path:
    """The folder a model argument names ('reference' is the bundled model)."""
    from moetrim.assets import resolve_model_path

    return resolve_model_path(model_path)


def check_sequential(place: dict, grad_checkpoint: bool, grad_magnitude: bool, device: str | None) -> None:
    """--sequential runs one layer at a time on the CPU in one process, forward only: say what does not combine."""
    from moetrim.calibrate.distributed import env_world_size

    if place:
        raise UsageError("--sequential loads one layer at a time itself: drop --device-map/--max-memory/--offload-folder")
    if grad_checkpoint or grad_magnitude:
        raise UsageError("--sequential records forward statistics only: drop --grad-checkpoint/--grad-magnitude")
    if device not in (None, "cpu"):
        raise UsageError("--sequential runs on the CPU: drop --device")
    if env_world_size() > 1:
        raise UsageError("--sequential runs in one process: drop torchrun/accelerate launch")


# -- loading ----------------------------------------------------------------------------------
def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load(model_path: str, dtype: str, device: str, trust_remote_code: bool, **place):
    """The model, on --device (under torchrun: this process's GPU), or spread by `place` (placement)."""
    from moetrim.calibrate.distributed import rank_device
    from moetrim.checkpoint import load_model

    quiet_transformers()
    with err.status(f"loading {model_path}"):
        return load_model(model_path, dtype=dtype, device=rank_device(device), trust_remote_code=trust_remote_code,
                          **offload_scratch(place))


def calibration_tokenizer(model, model_path: str, seq_len: Optional[int], trust_remote_code: bool):
    """The tokenizer calibration reads text with; warns when --seq-len is longer than the model's context."""
    from moetrim.calibrate.run import model_context
    from moetrim.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    context = model_context(model)
    if seq_len is not None and context and seq_len > context:
        err.print(f"warning: --seq-len {seq_len} is longer than the model's context ({context} tokens); its statistics "
                  "describe positions the model never saw in training")
    return tokenizer


def read_json(path: Path):
    """A file's JSON, or None when it is not JSON (the reader that needs it then says what is wrong)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
