"""The OpenAI-compatible HTTP API and Prometheus /metrics, served in the daemon process."""
