"""Ray: actors that host pipelines, the Serve app and jobs (the client is :mod:`imagegen.client`)."""
