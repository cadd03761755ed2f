"""Training: the fit loop (fit.py), many models trained as one stacked model
(stacked.py), feature taps (features.py), a stage's progress (progress.py)."""
