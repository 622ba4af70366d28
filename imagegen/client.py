"""``imagegen.client``: the Python client of the HTTP service, for platform backends.

The implementation lives beside the service it talks to (:mod:`imagegen.serve.client`); this
module is the short, stable import path::

    from imagegen.client import Client, ApiClientError
"""

from imagegen.serve.client import ApiClientError, Client, Event, RenderedPNG, RenderResponse

__all__ = ["ApiClientError", "Client", "Event", "RenderResponse", "RenderedPNG"]
