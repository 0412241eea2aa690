"""`llmbatch serve`: the HTTP API (OpenAI Files and Batches), the dashboard and /metrics."""
