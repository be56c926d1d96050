"""Baseline training and reporting tools for LymphAtlas (run from a checkout; not part of the wheel).

``tools/README.md`` says which script does what; ``python tools/train_baseline.py --help`` is the entry point.
"""
