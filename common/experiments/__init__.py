"""Small, self-contained experiments around the LSTM layer.

Each module runs with ``python -m common.experiments.<name>`` and writes its
numbers and figures into an output directory; see ``docs/experiments.md``.
"""
