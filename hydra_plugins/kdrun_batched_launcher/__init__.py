"""hydra/launcher=batched, shipped with kdrun and found by Hydra's plugin discovery
(plugins live in the ``hydra_plugins`` namespace package)."""
