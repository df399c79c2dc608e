"""Coverage-guided fuzz target (atheris/libFuzzer) for the sans-io framer and the packet decoder.

The checks are in fuzz/framer_oracle.py (shared with tests/test_hostile_clients.py); this file
instruments the protocol core and hands the oracle to libFuzzer. See fuzz/README.md.

    .venv/bin/python fuzz/fuzz_framer.py fuzz/corpus -max_total_time=600
    .venv/bin/python fuzz/fuzz_framer.py --check fuzz/crashes/crash-*   # replay inputs, no libFuzzer
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    if sys.argv[1:2] == ["--check"]:
        import framer_oracle

        for name in sys.argv[2:]:
            framer_oracle.check_input(Path(name).read_bytes())
            print(f"{name}: ok")
        return

    import atheris

    with atheris.instrument_imports(include=["dtgserver.protocol", "framer_oracle"]):
        oracle = importlib.import_module("framer_oracle")
    # The codec's fast path is compiled with exec() at import, which instrument_imports cannot see:
    # instrument every function loaded by now (the generated codecs and construct included).
    atheris.instrument_all()

    corpora = [a for a in sys.argv[1:] if not a.startswith("-")]
    if not corpora:
        corpora = [str(oracle.ROOT / "fuzz" / "corpus")]
        sys.argv.append(corpora[0])
    corpus = Path(corpora[0])
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in oracle.seeds().items():
        (corpus / name).write_bytes(data)
    atheris.Setup(sys.argv, oracle.check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
