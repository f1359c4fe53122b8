"""The PyFlink stream job (`anomaly_job.py`), its CLI and a local standalone cluster."""

WORKER_PACKAGES = ("config", "models", "telemetry", "scoring", "flink_jobs")
"""Project packages the job ships to its Python workers (`add_python_file`, `flink run -pyfs`)."""
