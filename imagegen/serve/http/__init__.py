"""The HTTP layer of the service: a FastAPI app of thin routes over the render service.

``app.build_api(ingress)`` makes the app of one ingress replica; the replica's state (config,
metrics, stores, the render service) lives on the ``Ingress`` deployment object, reachable from
routes and middleware as ``app.state.ingress``. Routes parse, authorise, call one service and map
its typed result to a response model.
"""
