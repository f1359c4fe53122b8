"""The committed synthetic samples are what the generator writes, small and labelled as synthetic."""
import json

from telemetry.synthetic import ANOMALIES_FILE, SAMPLES_DIR, write_samples


def test_committed_samples_are_reproducible_and_small(tmp_path):
    files = write_samples(tmp_path)
    for path in files:
        assert path.read_bytes() == (SAMPLES_DIR / path.name).read_bytes(), "regenerate: python -m telemetry.synthetic"
    assert sum(p.stat().st_size for p in SAMPLES_DIR.iterdir()) < 500_000
    assert "SYNTHETIC" in (SAMPLES_DIR / "README.md").read_text()
    anomalies = json.loads((SAMPLES_DIR / ANOMALIES_FILE).read_text())
    assert anomalies["synthetic"] is True and len(anomalies["anomalies"]) == 4
