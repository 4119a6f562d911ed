"""The operator's side: the management API (HTTP/JSON) and Prometheus /metrics."""
