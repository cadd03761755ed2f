"""Distillation schemes, who teaches whom: one Scheme subclass each (schemes/base.py says
what every scheme is and can do), registered by name in SCHEMES where it is defined.

Where each lives: offline.py (a frozen teacher: the default), born_again.py
(self-distillation), ensemble.py (several teachers), dml.py (deep mutual learning),
data_free.py (a generator's inputs, no data); for language models, sequence.py (the
teacher's text as a transfer set) and on_policy.py (the student's own text, scored by
the teacher).
To add one: a class in a module of this folder (every module here is imported) with
``@SCHEMES.register("name")``, and ``configs/scheme/<name>.yaml``."""

from kdrun.packages import import_every_module
from kdrun.run.schemes.base import SCHEMES, Scheme, scheme_of

__all__ = ["SCHEMES", "Scheme", "scheme_of"]

import_every_module(__name__, __path__)
