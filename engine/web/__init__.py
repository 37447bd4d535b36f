"""The web process's side (besides handlers/): its services, the status poller, the schemas, the API documents, the metrics."""
