"""`dtgserver simulate`: a fleet of virtual terminals against a server, and what it saw."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
import trio

from ..sim.load import DEFAULT_MIX, Mix, SimConfig, parse_mix, run

DEFAULT_PORT = 9320  # `dtgserver serve`'s default


def _mix(ctx: click.Context, param: click.Parameter, value: str) -> Mix:
    try:
        return parse_mix(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _progress(line: str) -> None:
    # \r and erase-to-end-of-line: one line that rewrites itself; the last call ends it
    sys.stderr.write(f"\r{line}\x1b[K" if line else "\n")
    sys.stderr.flush()


@click.command()
@click.option("--host", default="127.0.0.1", help="Server to connect to.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, help="Server port.")
@click.option("-n", "--terminals", type=click.IntRange(min=1), default=10, help="Number of virtual terminals.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=10.0,
              help="How long to run, in real seconds.")
@click.option("--mix", callback=_mix, default=",".join(f"{k}={w:g}" for k, w in DEFAULT_MIX),
              help="Terminal kinds and their weights: dtg (0x03), obd (0x06), mdt (0x07).")
@click.option("--time-scale", type=click.FloatRange(min=0, min_open=True), default=60.0,
              help="Simulated seconds per real second (cadence mode): 60 = a report a second per driving terminal.")
@click.option("--seed", type=int, help="Make the fleet and its trips reproducible (default: random, reported).")
@click.option("--max-rate", type=click.FloatRange(min=0, min_open=True),
              help="Open loop: start this many sessions per second, whatever the answers (latency under load).")
@click.option("--concurrency", type=click.IntRange(min=1),
              help="Closed loop: keep this many sessions in flight, each starting when the last is answered "
                   "(throughput).")
@click.option("--answer-timeout", type=click.FloatRange(min=0, min_open=True), default=5.0,
              help="Real seconds to wait for an answer before counting a timeout (and resending).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--allow-failures", is_flag=True,
              help="Exit 0 even when sessions could not connect, got no answer in time or an answer other than 0 "
                   "(load tests that push the server into overload on purpose).")
def simulate(host: str, port: int, terminals: int, duration: float, mix: Mix, time_scale: float, seed: int | None,
             max_rate: float | None, concurrency: int | None, answer_timeout: float, as_json: bool,
             allow_failures: bool) -> None:
    """Run N virtual terminals against a server and report sessions, latency and answers.

    By default every terminal drives around Seoul and reports on the spec's cadence (a realtime
    packet a minute while the key is on, a KEY OFF packet every 10 minutes while off), compressed
    by --time-scale, and follows the spec's resend policy. --max-rate and --concurrency are load
    modes for benchmarks. Exit status 1 if the server ever answered with anything but 0x09 and a
    known result code, and (unless --allow-failures) if any session could not connect, got no
    answer in time or was answered other than 0.
    """
    if max_rate is not None and concurrency is not None:
        raise click.UsageError("--max-rate (open loop) and --concurrency (closed loop) exclude each other")
    config = SimConfig(host=host, port=port, terminals=terminals, duration_s=duration, mix=mix,
                       time_scale=time_scale, seed=seed, max_rate=max_rate, concurrency=concurrency,
                       answer_timeout_s=answer_timeout)
    progress = _progress if sys.stderr.isatty() else None
    try:
        summary = trio.run(run, config, progress)
    except OSError as error:
        click.echo(f"dtgserver: error: {error}", err=True)
        sys.exit(1)
    except (KeyboardInterrupt, BaseExceptionGroup) as error:  # a second Ctrl-C: no report
        if isinstance(error, BaseExceptionGroup) and error.subgroup(KeyboardInterrupt) is None:
            raise
        click.echo("\ndtgserver: interrupted", err=True)
        sys.exit(130)
    click.echo(json.dumps(summary, ensure_ascii=False) if as_json else format_summary(summary))
    if summary["interrupted"]:
        click.echo("dtgserver: interrupted: the report covers the run up to Ctrl-C", err=True)
        sys.exit(130)
    if summary["bad_answers"]:
        click.echo(f"dtgserver: error: {summary['bad_answers']} answers were not 0x09 + a known result code",
                   err=True)
        sys.exit(1)
    not_ok = sum(summary["results"].values()) - summary["results"]["ok"]
    failed = summary["connection_errors"] + summary["timeouts"] + not_ok
    if failed and not allow_failures:
        click.echo(f"dtgserver: error: {failed} of {summary['sessions']} sessions failed: "
                   f"{summary['connection_errors']} could not connect, {summary['timeouts']} got no answer in time, "
                   f"{not_ok} were answered other than 0 (--allow-failures to exit 0 all the same)", err=True)
        sys.exit(1)


def format_summary(s: dict[str, Any]) -> str:
    """The summary for a person: one topic per line."""
    mode = {"cadence": f"×{s.get('time_scale', 0):g} ({s.get('simulated_s', 0):g} s simulated)",
            "open_loop": f"open loop at {s.get('max_rate', 0):g} sessions/s",
            "closed_loop": f"closed loop, {s.get('concurrency')} in flight"}[s["mode"]]
    lat = s["latency_ms"]
    gen = s["generator"]
    per_session = "-" if gen["cpu_us_per_session"] is None else f"{gen['cpu_us_per_session']:g} µs/session"
    lines = [
        f"{s['terminals']} terminals against {s['host']}:{s['port']} for {s['window_s']:g} s, {mode}, "
        f"seed {s['seed']}",
        f"sessions {s['sessions']} ({s['sessions_per_s']:g}/s)  bodies {s['bodies']} ({s['bodies_per_s']:g}/s)  "
        f"by kind: {', '.join(f'{k} {v}' for k, v in s['packets_by_kind'].items()) or '-'}",
        "results: " + ", ".join(f"{name} {n}" for name, n in s["results"].items()),
        "latency ms: " + "  ".join(f"{k} {'-' if v is None else f'{v:g}'}" for k, v in lat.items()),
        f"timeouts {s['timeouts']}  connection errors {s['connection_errors']}  bad answers {s['bad_answers']}  "
        f"resends {s['resends']}  probes {s['probes']}  back-offs {s['backoffs']}  "
        f"dropped {s['dropped_packets']}  stopped terminals {s['stopped_terminals']}",
        f"generator CPU {gen['cpu_s']:g} s (user {gen['cpu_user_s']:g}, system {gen['cpu_system_s']:g}; "
        f"{gen['cpu_pct_of_one_core']:g}% of one core, {per_session})",
    ]
    if s["elapsed_s"] - s["window_s"] > 0.05:
        lines[0] += f" (then {s['elapsed_s'] - s['window_s']:.2f} s for the last answers)"
    if "backlog_packets" in s:
        lines[-2] += f"  backlog left {s['backlog_packets']}"
    if s["skipped_sessions"]:
        lines[-2] += f"  skipped (in-flight limit) {s['skipped_sessions']}"
    if s["errors_seen"]:
        lines.append("errors: " + "; ".join(f"{e} ×{n}" for e, n in s["errors_seen"].items()))
    return "\n".join(lines)


COMMANDS = [simulate]
