"""The update loop: one round = shard a batch of new videos → continual fine-tune from the `@champion` →
evaluate challenger and champion on every catalogued test set → gate → register, promote or refuse.

config.py (what a round takes) · catalog.py (the lineage that travels with a model: shard sets, classes,
replay memory) · gate.py (the decision, a pure function) · promote.py (registry: versions, aliases,
rollback) · train.py (the fine-tune, one process per rank) · round.py (the resumable driver) · lock.py
(one round per model name at a time).
"""
