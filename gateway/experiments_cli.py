"""`kimi-gateway experiments report NAME` (the report as tables) and `experiments promote NAME [--variant V]`,
through the admin API; URL, admin key, exit codes and --json as for `kimi-gateway adapters` (adapters_cli)."""
from __future__ import annotations

import argparse
from typing import Any

from gateway.adapters_cli import adapter_name, common_options, emit, format_table, run_command
from gateway.admin_client import AdminClient


def add_commands(commands: argparse._SubParsersAction) -> None:
    experiments = commands.add_parser("experiments", help="an experiment's report, or promote its winner")
    actions = experiments.add_subparsers(dest="action", required=True, metavar="{report,promote}")
    report = actions.add_parser("report", parents=[common_options()], help="the experiment's report as tables")
    report.add_argument("name", metavar="NAME", type=adapter_name)
    report.set_defaults(run=run_command, action_run=cmd_report, change=False)
    promote = actions.add_parser("promote", parents=[common_options()],
                                 help="make the winner the route's adapter (through a swap of the control)")
    promote.add_argument("name", metavar="NAME", type=adapter_name)
    promote.add_argument("--variant", help="promote this variant even without a decision")
    promote.set_defaults(run=run_command, action_run=cmd_promote, change=True)


def cmd_report(client: AdminClient, args: argparse.Namespace) -> None:
    emit(args, client.get_experiment(args.name), render_report)


def cmd_promote(client: AdminClient, args: argparse.Namespace) -> None:
    emit(args, client.promote_experiment(args.name, args.variant), lambda body: body.get("detail", ""))


def number(value: Any, digits: int = 3) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def interval(value: dict | None) -> str | None:
    if not value:
        return None
    return f"{value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}] n={value['n']}"


def render_report(report: dict) -> str:
    variants = format_table(
        ("variant", "weight", "requests", "error rate", "ttft p50", "ttft p95", "lat p50", "lat p95", "tokens out",
         "score (95% CI)", "label (95% CI)"),
        [(v["name"] + (" (control)" if v["name"] == report["control"] else ""), number(v["weight"], 0),
          v["requests"], number(v["error_rate"]), number(v["ttft_p50_s"]), number(v["ttft_p95_s"]),
          number(v["latency_p50_s"]), number(v["latency_p95_s"]), number(v["completion_tokens_mean"], 1),
          interval(v["score"]), interval(v["label"])) for v in report["variants"]])
    rows = []
    for comparison in report["comparisons"]:
        for metric in ("score", "label", "error_rate"):
            result = comparison.get(metric)
            if result:
                rows.append((f"{comparison['candidate']} - {comparison['control']}", metric,
                             f"{result['difference']:+.4f} [{result['low']:+.4f}, {result['high']:+.4f}]",
                             f"{result['p_value']:.4f}", f"{result['sequential_p_value']:.4f}",
                             "yes" if result["decided"] else "no"))
    comparisons = format_table(("comparison", "metric", "difference (95% CI)", "p (fixed)", "p (always valid)",
                                "decided"), rows) if rows else "  (not enough data to compare yet)"
    parts = [f"experiment {report['experiment']}: sticky by {report['sticky_by']}, allocation {report['allocation']}",
             "", variants, "", comparisons, ""]
    parts += [f"  {c['candidate']}: {c['decision']}" for c in report["comparisons"]]
    if report.get("shadow"):
        parts += ["", format_table(("shadow", "calls", "errors", "lat p50", "lat p95", "tokens out", "chars out"),
                                   [(s["variant"], s["calls"], s["errors"], number(s["latency_p50_s"]),
                                     number(s["latency_p95_s"]), number(s["completion_tokens_mean"], 1),
                                     number(s["output_chars_mean"], 1)) for s in report["shadow"]])]
    if report.get("events"):
        parts += ["", "events:"] + [f"  {e['kind']} {e['variant'] or ''}: {e['detail']}" for e in report["events"]]
    parts += ["", f"decision: {report['decision']}"]
    return "\n".join(parts)
