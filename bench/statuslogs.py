"""Status log files: the cost of one log against how many logs of its terminal share its send time.

Writes N logs of one terminal, all with the same send time and different texts, through
`dtgserver.store.logfiles.write_status_log` (what the writer thread runs before each COMMIT: the
file and its directory fsynced), and as a baseline N logs with N different send times in another
data dir, in the same run. Prints the median time of a write over the first and the last 100 of
each, and the ratio last/first (1.0: the cost does not grow with the logs already there).

    .venv/bin/python bench/statuslogs.py                 # 2,000 logs each
    .venv/bin/python bench/statuslogs.py --logs 500 --dir /var/tmp
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtgserver.protocol import StatusLog  # noqa: E402
from dtgserver.store.logfiles import write_status_log  # noqa: E402

MODEM = "01055556666"
SENT = datetime.datetime(2026, 11, 21, 8, 0, 0)
WINDOW = 100


def run(data_dir: Path, logs: int, *, same_time: bool) -> list[float]:
    seconds = []
    for k in range(logs):
        sent = SENT if same_time else SENT + datetime.timedelta(seconds=k)
        record = StatusLog(MODEM, sent, f"log {k}: GPS 수신 양호\nmodem ok")
        started = time.perf_counter()
        write_status_log(data_dir, record)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logs", type=int, default=2000, help="logs written in each of the two runs")
    parser.add_argument("--dir", type=Path, default=None, help="where to make the data dirs (default: the temp dir)")
    args = parser.parse_args()
    if args.logs < 2 * WINDOW:
        parser.error(f"--logs: at least {2 * WINDOW}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = []
        for label, same_time in (("different send times (baseline)", False), ("one send time", True)):
            data_dir = Path(tmp) / label.split()[0]
            data_dir.mkdir()
            seconds = run(data_dir, args.logs, same_time=same_time)
            first = statistics.median(seconds[:WINDOW])
            last = statistics.median(seconds[-WINDOW:])
            rows.append((label, first, last))
        print(f"{args.logs} status logs of one terminal, median ms per write (file + directory fsynced):")
        print(f"{'':34} {'first 100':>10} {'last 100':>10} {'last/first':>10}")
        for label, first, last in rows:
            print(f"{label:34} {first * 1000:10.2f} {last * 1000:10.2f} {last / first:10.2f}")
        print(f"one send time / baseline, last 100: {rows[1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
