"""Start dashrl: ``python launch/start.py [train|eval|replay|attach|keys] [--field value ...]``.

    python launch/start.py                  # the default run (SmolLM2-135M on chain_sum)
    python launch/start.py --help           # every config field with its docstring
    python launch/start.py eval --benchmark gsm8k math500 --k 4 --limit 50

The subcommands live in launch/cli.py; a training run's steps in launch/train.py. This
file is only the script a user runs.
"""

import sys
from pathlib import Path


def _drop_script_dir() -> None:
    """Running as a script puts launch/ first on sys.path, where our modules (cli.py,
    train.py, evaluate.py, ...) would shadow unrelated top-level modules of other
    libraries (e.g. Hugging Face's ``evaluate``). Only ``dashrl.*`` is ours."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]


def main() -> None:
    """Entry point of the script (and of ``python -m dashrl.launch.start``)."""
    _drop_script_dir()
    from dashrl.launch.cli import main as cli_main  # only once launch/ is off sys.path

    cli_main()


if __name__ == "__main__":
    main()
