"""What a run reports: its table and CSV files (table.py), size and side-by-side speed
(measure.py), ONNX export (export.py), TensorBoard and MLflow loggers."""
