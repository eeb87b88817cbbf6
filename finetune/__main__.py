"""`python -m finetune`: fine-tuning (full / PEFT) and its jobs: evaluate, predict, export, continual, serve,
embed, tune, update, rollback. The parsers live in `finetune/cli.py`; this file only dispatches."""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
