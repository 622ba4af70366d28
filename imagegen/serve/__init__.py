"""Ray: actors that host pipelines, the Serve app, jobs and the client."""
