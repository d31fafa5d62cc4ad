"""casakv's Prometheus series: worker counters and the API server's collector."""
