"""Ray serving: the HTTP routes (``http/``), the render service (``service.py``), the ingress and renderer
deployments, the actors that host pipelines, and jobs (the client is :mod:`imagegen.client`)."""
