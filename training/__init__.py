"""smolora.training: the mini-CVIT benchmark, base alignment and continual training.

Subpackages and modules: `data/` (mini-CVIT generator, CVIT JSON loader, batching),
`methods/` (one file per continual-learning method), `trainer.py` (the task loop that
publishes a checkpoint after every task), `evaluate.py`, `metrics.py`, `report.py`,
`pretrain.py`, `cli.py`. Imports `smolora.adapters`; never `smolora.server`.
"""
