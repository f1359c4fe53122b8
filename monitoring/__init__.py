"""Operator integrations: Prometheus metrics, health, incident routing to Alertmanager and webhooks, and operators'
feedback on incidents (docs/monitoring.md).

- `records`: the incident record the router reads and the `flead.feedback/1` record the API publishes.
- `notifications`, `suppression`: pure rules (payloads, back-off, suppression); the false-positive rule a device
  applies is `scoring.feedback` (it runs in the stream job).
- `router`, `deliveries`, `receivers`: the incident router service (`flead router start|stop`).
- `metrics`, `sources`, `lag`, `health`: what `/metrics`, `/healthz` and `flead health` read.
"""
