''''true; r="$(cd "$(dirname "$0")/.." && pwd)"; p="$r/.venv/bin/python"; [ -x "$p" ] || p=python3; PYTHONPATH="$r${PYTHONPATH:+:$PYTHONPATH}" exec "$p" -u -m finetune "$@" #'''
''':' <<'#END_OF_PYTHON' #'''
# This file is valid bash AND valid Python, so every launcher works:
#   bash launch/finetune.sh --config ...                    one process (RANK/WORLD_SIZE/MASTER_* defaulted)
#   deepspeed --num_gpus 2 launch/finetune.sh --config ...  the launcher runs "python -u launch/finetune.sh" per rank
#   deepspeed --hostfile launch/hostfile launch/finetune.sh --config ...   several nodes (launch/CLUSTER.md)
#   torchrun --nproc_per_node 2 -m finetune --config ...    the same module without this file
# bash runs line 1 (the repo's .venv/bin/python when present) and never gets further; line 2 makes the
# rest a here-document so 'bash -n' accepts it. Python reads lines 1-2 as strings and runs the code below.
import os
import runpy
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if root not in sys.path:
    sys.path.insert(0, root)
sys.argv[0] = "finetune"
runpy.run_module("finetune", run_name="__main__", alter_sys=True)
#END_OF_PYTHON
