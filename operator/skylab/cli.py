"""The `skylab` command line."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from skylab import __version__, history
from skylab.config import load_experiment
from skylab.console import Console
from skylab.durations import parse_duration
from skylab.errors import UserError
from skylab.experiments import resolve_experiment
from skylab.home import Home
from skylab.local_run import CampaignInterrupted, RunRequest
from skylab.local_run import run as run_campaign
from skylab.store import open_database
from skylab.store.db import Store

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except UserError as exc:
        print(f"skylab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CampaignInterrupted as exc:
        print(
            f"skylab: interrupted; continue with `skylab run --resume --tag {exc}`", file=sys.stderr
        )
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skylab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"skylab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "experiment",
            nargs="?",
            help="experiment directory or bundled name (default: gpt-pretrain)",
        )
        sub.add_argument(
            "--home", help="skylab home directory (default: $SKYLAB_HOME or ./.skylab)"
        )

    prepare = commands.add_parser("prepare", help="download or build the experiment's data")
    common(prepare)
    prepare.add_argument("--profile", help="a profile from experiment.toml, e.g. cpu")
    prepare.add_argument(
        "--source",
        type=Path,
        help="build the corpus from local text or parquet files instead of downloading",
    )
    prepare.add_argument(
        "--data-dir",
        type=Path,
        help="where the data goes, e.g. a volume trainer pods mount (default: in the home)",
    )
    prepare.set_defaults(handler=_prepare)

    run = commands.add_parser("run", help="run a research campaign on this machine")
    common(run)
    run.add_argument(
        "--strategy",
        help="how changes are proposed: sweep or llm (default: sweep; on --resume: the campaign's)",
    )
    run.add_argument("--profile", help="a profile from experiment.toml, e.g. cpu")
    run.add_argument(
        "--max-trials", type=_positive_int, help="stop after N trials, baseline included"
    )
    run.add_argument("--budget", type=_duration, help="wall-clock budget, e.g. 90m or 8h")
    run.add_argument("--tag", type=_tag, help="campaign name (default: experiment + time)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the campaign named by --tag, or the experiment's latest one",
    )
    run.add_argument(
        "--database-url",
        help="PostgreSQL URL (default: $SKYLAB_DATABASE_URL, else an embedded server in the home)",
    )
    run.set_defaults(handler=_run)

    hist = commands.add_parser("history", help="show a campaign's trials")
    common(hist)
    hist.add_argument(
        "--tag",
        type=_campaign,
        help="campaign name, NAMESPACE/NAME for an operator's (default: the latest)",
    )
    hist.add_argument("--best", action="store_true", help="show only the best kept trial")
    hist.add_argument(
        "--export", type=Path, metavar="RESULTS_TSV", help="write autoresearch's results.tsv"
    )
    hist.add_argument(
        "--database-url",
        help="PostgreSQL URL (default: $SKYLAB_DATABASE_URL, else the embedded server in the home)",
    )
    hist.set_defaults(handler=_history)

    op = commands.add_parser("operator", help="run the Kubernetes operator (in a cluster)")
    op.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; default: all namespaces)",
    )
    op.add_argument(
        "--peering", help="kopf peering name: replicas with the same one stand by for each other"
    )
    op.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the least severe lines logged (default: info; debug adds kopf's own)",
    )
    op.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line (default: text)",
    )
    op.set_defaults(handler=_operator)

    crds = commands.add_parser("crds", help="write the CustomResourceDefinitions")
    crds.add_argument(
        "--output",
        type=Path,
        action="append",
        help="directory, repeatable (default: crds/ and the Helm chart's charts/skylab/crds/)",
    )
    crds.set_defaults(handler=_crds)
    return parser


def _operator(args: argparse.Namespace) -> int:
    # Imported here: kopf and the kubernetes client belong to the operator extra.
    from skylab.controller.events import configure_logging
    from skylab.controller.main import run_operator
    from skylab.controller.settings import OperatorSettings

    settings = OperatorSettings.from_env()
    configure_logging(args.log_level, args.log_format)
    run_operator(settings, args.namespace, args.peering)
    return 0


def _crds(args: argparse.Namespace) -> int:
    # Imported here: the API's YAML dependency belongs to the operator extra.
    from skylab.api.crds import RESOURCES, write_crds

    for directory in args.output or [Path("crds"), Path("charts/skylab/crds")]:
        changed = write_crds(directory)
        for resource in RESOURCES:
            path = directory / resource.filename
            print(f"{path}: {'written' if path in changed else 'unchanged'}", file=sys.stderr)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    config = load_experiment(resolve_experiment(args.experiment), args.profile)
    data_dir = (args.data_dir or Home.resolve(args.home).data_dir(config.name)).resolve()
    command = [*config.prepare.command.split(), "--data-dir", str(data_dir), *config.prepare.args]
    if args.source is not None:
        if not args.source.exists():
            raise UserError(f"--source: {args.source} does not exist")
        command += ["--source", str(args.source.resolve())]
    if command[0] == "python":
        command[0] = sys.executable
    print(f"preparing {config.name} data in {data_dir}", file=sys.stderr)
    return subprocess.call(command, cwd=config.root)


def _run(args: argparse.Namespace) -> int:
    config = load_experiment(resolve_experiment(args.experiment), args.profile)
    request = RunRequest(
        experiment=config,
        strategy=args.strategy,
        tag=args.tag,
        resume=args.resume,
        max_trials=args.max_trials,
        budget_seconds=args.budget,
        home=Home.resolve(args.home),
        database_url=args.database_url,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    campaign = run_campaign(request, Console())
    return 0 if campaign.status == "succeeded" else 1


def _history(args: argparse.Namespace) -> int:
    home = Home.resolve(args.home)
    experiment = None
    if args.experiment:
        experiment = load_experiment(resolve_experiment(args.experiment)).name
    if (
        not args.database_url
        and not os.environ.get("SKYLAB_DATABASE_URL")
        and not home.postgres_dir.exists()
    ):
        raise UserError(f"no skylab database in {home.root}: run a campaign first")
    with open_database(args.database_url, home.postgres_dir) as url, Store.connect(url) as store:
        campaign = store.get_campaign(args.tag) if args.tag else store.latest_campaign(experiment)
        if campaign is None:
            raise UserError("no such campaign" if args.tag else "no campaigns yet")
        trials = store.trials(campaign.id)
        best = store.best_trial(campaign.id, campaign.config.get("direction", "minimize"))
    metric = str(campaign.config.get("metric", "metric"))
    if args.export is not None:
        rows = history.export_tsv(trials, args.export, metric_name=metric)
        print(f"wrote {rows} trials to {args.export}", file=sys.stderr)
    if args.best:
        if best is None:
            raise UserError(f"campaign {campaign.name!r} has no kept trial yet")
        print(history.best_line(best))
        return 0
    reason = f": {campaign.stop_reason}" if campaign.stop_reason else ""
    profile = f", profile {campaign.profile}" if campaign.profile else ""
    print(
        f"campaign {campaign.name} ({campaign.experiment}, {campaign.strategy}{profile}): "
        f"{campaign.status}{reason}"
    )
    print(history.format_table(trials, metric))
    spend = history.usage_line(trials)
    if spend is not None:
        print(spend)
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds is None or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90m, 8h or 1h30m")
    return seconds


def _tag(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", text) or len(text) > 50:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use lowercase letters, digits and '-' (at most 50 characters)"
        )
    return text


def _campaign(text: str) -> str:
    namespace, _, name = text.rpartition("/")
    if namespace:
        _tag(namespace)
    _tag(name)
    return text


if __name__ == "__main__":
    sys.exit(main())
