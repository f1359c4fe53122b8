"""Telemetry ingestion: the message contract (`schema`), input readers (`readers`), evaluation arrays
(`datasets`), Kafka replay and inspection tools (`producer`, `consumer`, `cli`) and synthetic samples (`synthetic`)."""
