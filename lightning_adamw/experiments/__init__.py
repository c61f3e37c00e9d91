"""The experiment runner behind ``python -m lightning_adamw compare`` (variants x seeds, tables, plots, Ray).

Not imported by ``import lightning_adamw``: it needs the runner's own dependencies (PyYAML, TensorBoard's event
reader, matplotlib, scipy; Ray for ``--launcher ray``), which a user of the callbacks does not.
"""
