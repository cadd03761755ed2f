"""Training: the one epoch driver (epochs.py) that every loop runs under: one model
(fit.py), many models as one stacked model (stacked.py), a data-free student and its
generator (data_free.py); the teacher's targets (targets.py), the optimiser and schedule
(optim.py), feature taps (features.py), a stage's progress (progress.py)."""
