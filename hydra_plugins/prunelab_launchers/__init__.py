"""PruneLab's Hydra launcher plugins (``hydra/launcher=gpus``: one multirun job per GPU, in parallel).

Hydra discovers this package because it lives in the ``hydra_plugins`` namespace package; its
modules are imported at discovery, so they import nothing heavy (torch is imported in the workers).
"""
