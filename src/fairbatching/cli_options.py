"""The command line's shared option groups, and the consoles it prints on.

A command takes a group as one parameter (``w: WorkloadArgs``); ``grouped`` spreads the group's fields into
the command's options for typer and gathers them back into the dataclass for the command, so an option is
declared once however many commands take it.

Declaring the options imports only typer, rich and ``fairbatching.config`` (where the policies, their options
and the library's defaults are declared): ``--help`` runs without numpy or the simulator (a test holds this).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_type_hints

import typer
from rich.console import Console
from typer.core import TyperOption

from fairbatching.config import DEFAULT_QPS, DEFAULT_TPOT_S, DEFAULT_TTFT_S, POLICY_CONFIGS
from fairbatching.errors import ConfigError
from fairbatching.validate import (
    at_least_one,
    at_least_two,
    check_output_dir,
    non_negative,
    parse_policy_options,
    positive,
    staged_dir,
)

if TYPE_CHECKING:
    from fairbatching.core.request import SLO
    from fairbatching.metrics.summary import Summary
    from fairbatching.runs import Experiment, WorkloadSpec

POLICY_NAMES = tuple(POLICY_CONFIGS)

console = Console(stderr=True, soft_wrap=True)
# Tables fit the terminal, or $COLUMNS when set; output piped without either is read in a file, where a table
# need not fold (rich would assume 80 columns).
out_console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)

_option_type = getattr(TyperOption, "display_type_rich", None)


def _flag_type(self: TyperOption, ctx: Any) -> str | None:
    """An on/off flag takes no value, so its help shows none: typer 0.29 shows ``--json <bool>``, which reads as
    ``--json true`` (a usage error). Older typer (which has no such hook) shows no type for a flag."""
    assert _option_type is not None
    return None if self.is_flag else _option_type(self, ctx)


if _option_type is not None:
    TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]

F = TypeVar("F", bound=Callable[..., Any])


def grouped(command: F) -> F:
    """``command`` with each option-group parameter spread into that group's options (see the module doc)."""
    hints = get_type_hints(command, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for p in inspect.signature(command).parameters.values():
        kind = hints[p.name]
        if isinstance(kind, type) and is_dataclass(kind):
            groups[p.name] = kind
            group_hints = get_type_hints(kind, include_extras=True)
            params += [
                inspect.Parameter(f.name, p.KEYWORD_ONLY, default=f.default, annotation=group_hints[f.name])
                for f in fields(kind)
            ]
        else:
            params.append(p.replace(kind=p.KEYWORD_ONLY, annotation=kind))

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        for name, kind in groups.items():
            kwargs[name] = kind(**{f.name: kwargs.pop(f.name) for f in fields(kind)})
        return command(**kwargs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper  # type: ignore[return-value]


PolicyOpt = Annotated[str, typer.Option("--policy", "-p", help=f"One of: {', '.join(POLICY_NAMES)}")]
PoliciesOpt = Annotated[str, typer.Option("--policies", help="Comma-separated policies")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="Profile name or JSON path (see `profiles`)")]
PolicyOptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--policy-option",
        "-o",
        help="policy.key=value, e.g. sarathi.token_budget=2048 (repeatable); `fairbatching options` lists them",
    ),
]
AdmissionOpt = Annotated[
    str,
    typer.Option(
        "--admission",
        help="Node admission control on the PAB: none, reject or defer (refused requests count as missed)",
    ),
]
UnderTestOpt = Annotated[
    str | None,
    typer.Option(
        "--under-test",
        help="The policy the others are baselines for: its gain is against the best of them (default: fairbatching "
        "when it runs)",
    ),
]
WideOpt = Annotated[bool, typer.Option("--wide", help="Show every column (files always carry them all)")]
RequestsOpt = Annotated[int, typer.Option("--num-requests", "-n", help="Requests per run", callback=at_least_one)]
WorkloadOpt = Annotated[str, typer.Option("--workload", "-w", help="Family name or trace path")]
SeedsOpt = Annotated[int, typer.Option("--seeds", help="Seeds (trace windows) per load point", callback=at_least_one)]


@dataclass
class WorkloadArgs:
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            help="Bundled trace name (see `traces`) or a trace file (Azure CSV, BurstGPT CSV, Mooncake JSONL; "
            ".gz too); default: embedded",
        ),
    ] = None
    fmt: Annotated[str, typer.Option("--format", help="Trace format: auto, azure, burstgpt, mooncake")] = "auto"
    num: Annotated[
        int | None,
        typer.Option(
            "--num-requests", "-n", help="Use this many requests (default: all / 2000)", callback=at_least_one
        ),
    ] = None
    start: Annotated[
        int, typer.Option("--start", help="Skip this many requests of the trace first", callback=non_negative)
    ] = 0
    qps: Annotated[
        float | None,
        typer.Option(
            "--qps", help=f"Rescale arrivals to this mean rate (default workload: {DEFAULT_QPS})", callback=positive
        ),
    ] = None
    seed: Annotated[
        int,
        typer.Option("--seed", help="Seed of a generated workload (the default, or --workload)", callback=non_negative),
    ] = 0
    generated: Annotated[
        str | None,
        typer.Option(
            "--workload",
            "-w",
            help="A generated workload instead of a trace: mixed-slo (two SLO classes, reported per class), "
            "multi-turn (turns share their history)",
        ),
    ] = None

    def spec(self) -> WorkloadSpec:
        from fairbatching.runs import WorkloadSpec

        if self.generated is not None and (self.trace is not None or self.start):
            flag = "--trace" if self.trace is not None else "--start"
            raise ConfigError(f"--workload {self.generated!r}: generated, so {flag} does not apply")
        return WorkloadSpec(
            str(self.trace) if self.trace else None, self.fmt, self.num, self.start, self.qps, self.seed, self.generated
        )


PrefixCachingOpt = Annotated[
    bool,
    typer.Option(
        "--prefix-caching",
        help="Cache KV blocks by prefix hash (as vLLM's automatic prefix caching); prefill skips cached prefixes",
    ),
]


@dataclass
class SloArgs:
    ttft: Annotated[float, typer.Option("--ttft-slo", help="TTFT SLO in seconds", callback=positive)] = DEFAULT_TTFT_S
    tpot: Annotated[float, typer.Option("--tpot-slo", help="TPOT SLO in seconds", callback=positive)] = DEFAULT_TPOT_S

    @property
    def slo(self) -> SLO:
        from fairbatching.core.request import SLO

        return SLO(self.ttft, self.tpot)


@dataclass
class NodeArgs:
    profile: ProfileOpt = None
    timeout: Annotated[
        float | None, typer.Option("--queue-timeout", help="Drop requests waiting longer (s)", callback=positive)
    ] = None
    max_len: Annotated[
        int, typer.Option("--max-model-len", help="Reject requests longer than this (tokens)", callback=at_least_two)
    ] = 131072
    admission: AdmissionOpt = "none"
    policy_option: PolicyOptionOpt = None
    prefix_caching: PrefixCachingOpt = False


@dataclass
class SweepArgs:
    cache: Annotated[Path, typer.Option("--cache", help="Result cache folder (makes sweeps resumable)")] = Path(
        "out/cache"
    )
    workers: Annotated[
        int | None, typer.Option("--workers", help="Local worker processes (default: all cores)", callback=at_least_one)
    ] = None
    ray: Annotated[
        str | None, typer.Option("--ray", help="Run on a Ray cluster at this address ('local' starts one here)")
    ] = None

    def sweeper(self) -> Any:
        from fairbatching.evaluation import Sweeper

        check_output_dir(self.cache, "--cache")
        return Sweeper(self.cache, self.workers, self.ray)


@dataclass
class EngineArgs:
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Preset (llama-3-8b, llama-3.2-1b, ...), preset@LAYERS, or checkpoint dir"),
    ] = "llama-3-8b"
    device: Annotated[str | None, typer.Option("--device", help="cuda or cpu (default: cuda if available)")] = None
    num_blocks: Annotated[
        int | None, typer.Option("--num-blocks", help="KV blocks (default: 90% of free GPU memory)")
    ] = None
    block_size: Annotated[int, typer.Option("--block-size", help="Tokens per KV block")] = 16


@dataclass
class BackendArgs(EngineArgs):
    """What runs the steps: the simulator, or (``--backend gpu``) engines built as the engine options say."""

    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="sim (the simulator) or gpu (real-time replays, one engine per GPU, the simulator beside)",
        ),
    ] = "sim"
    max_context: Annotated[
        int, typer.Option("--max-context", help="With --backend gpu: longest sequence an engine serves (tokens)")
    ] = 16384
    gpus: Annotated[
        int | None,
        typer.Option(
            "--gpus", help="With --backend gpu: engines to start, one per GPU (default: every visible GPU)", min=1
        ),
    ] = None


def build_experiment(w: WorkloadArgs, slo: SloArgs, node: NodeArgs) -> Experiment:
    from fairbatching.costmodel.profile import load_profile
    from fairbatching.runs import Experiment

    options = parse_policy_options(node.policy_option or [])
    workload = w.spec().build()
    if workload.meta.get("skipped_rows"):
        console.print(f"note: skipped {workload.meta['skipped_rows']} trace rows of failed requests (zero tokens)")
    return Experiment(
        workload,
        load_profile(node.profile),
        slo.slo,
        node.max_len,
        node.timeout,
        node.admission,
        options,
        prefix_caching=node.prefix_caching,
    )


def save_summary(s: Summary, out: Path) -> None:
    """``summary.json`` and ``requests.csv`` of one run, moved into ``out`` only once both are written."""
    with staged_dir(out) as tmp:
        s.write_json(tmp / "summary.json")
        s.write_requests_csv(tmp / "requests.csv")
