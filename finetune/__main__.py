"""`python -m finetune`: fine-tuning (full / PEFT) and its jobs: evaluate, predict, export, continual, serve,
embed, tune, update, rollback. The parsers live in `finetune/cli.py`; this file only dispatches."""

import os
import sys

from finetune.cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `predict --json | head`: the reader has gone; end quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit would fail again
        sys.exit(1)
