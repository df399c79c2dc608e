"""The `dtgserver` program: `python -m dtgserver`, and the installed `dtgserver` command."""

import signal


def run() -> None:
    # The first thing done: SIGINT and SIGTERM wait (pending) until `serve` has its handler in
    # place, since the imports take a second or more on a busy machine and a signal meanwhile
    # would kill the server half started. Every other command releases them at once (cli.main).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    from .cli import main

    main()


if __name__ == "__main__":
    run()
