"""The Typer app and the options every subcommand shares."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from .. import __version__
from ..config import TrainJob, nested, parse_override, to_dict

OFF = "off"  # the default shown for a flag
GLOBAL_OPTIONS = {"--threads": 1, "--quiet": 0, "-q": 0, "--trust-code": 1}  # root options, how many values each takes


class GlobalOptionsFirst(TyperGroup):
    """Accept the root options after the subcommand too (`lmcx train --threads 1 ...`) by moving them
    in front of it; anything after `--` is left alone."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        front: list[str] = []
        rest: list[str] = []
        i = 0
        while i < len(args):
            if args[i] == "--":
                rest += args[i:]
                break
            name = args[i].split("=", 1)[0]
            if name in GLOBAL_OPTIONS and rest:  # before the subcommand it is already where it belongs
                takes = 0 if "=" in args[i] else GLOBAL_OPTIONS[name]
                front += args[i:i + 1 + takes]
                i += 1 + takes
                continue
            rest.append(args[i])
            i += 1
        return super().parse_args(ctx, front + rest)


app = typer.Typer(
    cls=GlobalOptionsFirst,
    name="lmcx",
    help="Linear mode connectivity experiments: train, match permutations, interpolate, calibrate, analyse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lmcx {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, show_default=OFF,
                                          help="Print the version and exit.")] = False,
    threads: Annotated[Optional[str], typer.Option(
        "--threads", metavar="N|auto", show_default="auto",
        help="CPU threads for PyTorch (else $LMCX_THREADS, else the config's `threads` key, else OMP_NUM_THREADS "
             "if set, else auto: the cores "
             "other processes leave free, 1 for small models). Also accepted after the subcommand.")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", show_default=OFF, help="No progress bars or progress lines (also $LMCX_QUIET=1); results and errors still print.")] = False,
    trust_code: Annotated[Optional[list[str]], typer.Option(
        "--trust-code", metavar="MODULE", show_default="none",
        help="Allow checkpoints whose model.arch is MODULE:callable (your own model factory) to import MODULE, "
             "i.e. run its code (repeatable; also $LMCX_TRUST_CODE=MODULE,...). Also accepted after the subcommand.")] = None,
) -> None:
    """Linear mode connectivity experiments."""
    from .. import threads as thread_policy
    from ..arch import trust_code as allow_modules
    from ..console import set_quiet

    set_quiet(quiet)
    thread_policy.apply(threads)
    allow_modules(*(trust_code or []))


# Options shared by subcommands: YAML first, then these flags, then --set. Every option shows its default;
# a flag that stands for a config key shows the key and its built-in default (a -c file may change it).


def key_default(cls: type, key: str) -> str:
    """`key = value` of a dotted config key's built-in default, for show_default."""
    value: Any = to_dict(cls())
    for part in key.split("."):
        value = value[part]
    return f"{key} = {value:g}" if isinstance(value, float) else f"{key} = {value}"


def set_option(example: str):
    """--set, with an example key of the command's own config."""
    return Annotated[Optional[list[str]], typer.Option(
        "--set", show_default="none", help=f"Override any config key (repeatable), e.g. --set {example}.")]


def out_option(default: str):
    """--out, showing the command's default directory (README, Outputs)."""
    return Annotated[Optional[Path], typer.Option("--out", "-o", show_default=default, help="Output directory.")]


ConfigOption = Annotated[Optional[Path], typer.Option(
    "--config", "-c", show_default="none: built-in defaults", help="YAML config file.")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", show_default="auto", help="auto | cpu | cuda | cuda:N.")]
DataRootOption = Annotated[Optional[Path], typer.Option(
    "--data-root", show_default="data.root, else $LMCX_DATA_ROOT, else ~/.cache/lmcx/data",
    help="Where datasets live.")]
ForceOption = Annotated[bool, typer.Option("--force", show_default=OFF,
                                           help="Redo the step even if its outputs are complete.")]
TrackOption = Annotated[Optional[str], typer.Option(
    "--track", show_default="track = none",
    help="none | tensorboard: event files in <run>/tensorboard/ (pip install 'lmcx[tensorboard]').")]
# The model a run directory holds, for the commands that make one (train, import)
ArchOption = Annotated[Optional[str], typer.Option(
    help="mlp | vgg11 | vgg16 | resnet20 | torchvision.<name> | package.module:callable (README, Any model).",
    show_default=key_default(TrainJob, "model.arch"))]
WidthOption = Annotated[Optional[float], typer.Option(
    help="Width multiplier.", show_default=key_default(TrainJob, "model.width"))]
ModelAOption = Annotated[Path, typer.Option("--a", help="Model A: model.safetensors or a run directory.")]
PermOption = Annotated[Optional[Path], typer.Option(
    "--perm", show_default="none", help="Permutation file applied to B (lmcx match).")]
BPermutedOption = Annotated[Optional[Path], typer.Option(
    "--b-permuted", show_default="none", help="Already permuted checkpoint of B.")]


def step_ran(run_dir: Path, status: str) -> bool:
    """Say why a step did not run (rundir.run_once's "skipped" / "busy"); True when it ran. A busy directory
    ends the command with BUSY_EXIT_CODE: its outputs are not there yet, so what follows must not go on."""
    from ..console import console
    from ..errors import BUSY_EXIT_CODE

    if status == "skipped":
        console.print(f"{run_dir}: already complete (use --force to redo)", markup=False)
    elif status == "busy":
        console.print(f"{run_dir}: another process is working on it; skipped (exit code {BUSY_EXIT_CODE})",
                      markup=False)
        raise typer.Exit(BUSY_EXIT_CODE)
    return status == "done"


def overrides(flags: dict[str, Any], sets: list[str] | None) -> list[dict[str, Any]]:
    """Flags given on the command line (dotted key -> value, None = not given), then --set items."""
    out = []
    for key, value in flags.items():
        if value is not None:
            out.append(nested(key, str(value) if isinstance(value, Path) else value))
    out += [parse_override(s) for s in sets or []]
    return out
