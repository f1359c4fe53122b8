"""The stream job's per-device logic, pure and unit-tested: what `flink_jobs/anomaly_job.py` calls.

- `scoring.state.DeviceState`: what the job keeps per device in keyed state (detector, snapshot bookkeeping).
- `scoring.global_models.GlobalModels`: the global models a worker holds, and which one a device adopts.
- `scoring.stream.StreamScoring`: parse and check a message, micro-batch, adopt, score then learn, and the
  records to emit (`Emitted`: scores, alerts, snapshots, dead letters, incidents, drift events, counter increments).

Nothing here imports PyFlink: the Flink operator is a thin adapter that holds state and timers and forwards its
callbacks here, so every decision the job takes is tested without a cluster.
"""
