"""What a run reports, in three parts: the logs written while it trains (logs.py:
metrics.csv, events.jsonl; TensorBoard and MLflow loggers), the statistics of the
comparison (statistics.py: the paired gain, its test and verdict), and the rendering
(table.py: the printed table and summary.csv); size and side-by-side speed (measure.py),
ONNX export (export.py)."""
