"""kdrun: knowledge-distillation experiments, teacher -> scratch -> distill -> compare."""

__version__ = "0.1.0"
