"""Python client of the imagegen HTTP API (for platform backends, the tests and the demo).

It needs httpx and Pillow only: nothing of the service (Ray, FastAPI) is imported, so a
platform backend can use it without the serving stack.

    from imagegen.client import Client

    with Client("http://127.0.0.1:8000", api_key) as client:
        client.create_character("mia", "Mia", files, provenance={"kind": "synthetic", "creator": "studio"})
        client.approve_character("mia")
        render = client.render(prompt="mia at a cafe", preset="tiny-flux", character="mia", seed=7)
        render.images[0].image.save("mia.png")
        job = client.submit_job(prompt="a park", num_images=2)
        for event in client.events(job["job_id"]):
            print(event.type, event.data)
        done = client.wait_job(job["job_id"])

Errors come back as ``ApiClientError`` with the server's ``status``, ``code``, ``message``,
``field`` and ``retry_after``.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image

DEFAULT_TIMEOUT = httpx.Timeout(330.0, connect=10.0)


class ApiClientError(Exception):
    """An error response (or a transport failure, status 0)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ):
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after
        self.request_id = request_id

    @property
    def retryable(self) -> bool:
        return self.status in (429, 503)


@dataclass
class RenderedPNG:
    """One image of a render: PNG bytes plus what the server said about it."""

    png: bytes | None
    info: dict[str, Any]

    @property
    def seed(self) -> int:
        return int(self.info["seed"])

    @property
    def image(self) -> Image.Image:
        if self.png is None:
            raise ValueError(f"image {self.info.get('index')} came out unusable: {self.info.get('problem')}")
        return Image.open(io.BytesIO(self.png))

    def save(self, path: str) -> None:
        if self.png is None:
            raise ValueError("no image to save")
        with open(path, "wb") as handle:
            handle.write(self.png)


@dataclass
class RenderResponse:
    request_id: str
    raw: dict[str, Any]
    images: list[RenderedPNG] = field(default_factory=list)


@dataclass
class Event:
    """One server-sent event."""

    id: int | None
    type: str
    data: dict[str, Any]


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message, field_name = error["code"], error["message"], error.get("field")
    except (ValueError, KeyError, TypeError):
        code, message, field_name = "http_error", response.text[:500], None
    retry = response.headers.get("retry-after")
    raise ApiClientError(
        response.status_code,
        code,
        message,
        field_name,
        float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
        response.headers.get("x-request-id"),
    )


def _render_response(data: dict[str, Any]) -> RenderResponse:
    images = []
    for info in data.get("images", []):
        encoded = info.pop("png_base64", None)
        images.append(RenderedPNG(base64.b64decode(encoded) if encoded else None, info))
    return RenderResponse(request_id=data.get("request_id", ""), raw=data, images=images)


class Client:
    """Synchronous client (thread-safe: one ``httpx.Client`` connection pool)."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiClientError(0, "transport_error", f"{type(exc).__name__}: {exc}") from exc
        _raise_for(response)
        return response

    # -- health ------------------------------------------------------------------------------------
    def healthz(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()

    def readyz(self) -> dict[str, Any]:
        return self._request("GET", "/readyz").json()

    def wait_ready(self, timeout_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.readyz()
            except ApiClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    # -- characters --------------------------------------------------------------------------------
    def create_character(
        self,
        character_id: str,
        name: str,
        files: list[tuple[str, bytes]],
        provenance: dict[str, Any],
        card: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Register a character from (filename, bytes) references; returns the reference report."""
        form = {"id": character_id, "name": name, "provenance": json.dumps(provenance)}
        if card is not None:
            form["card"] = json.dumps(card)
        uploads = [("references", (filename, data, "application/octet-stream")) for filename, data in files]
        return self._request("POST", "/v1/characters", data=form, files=uploads).json()

    def list_characters(self, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else None
        return self._request("GET", "/v1/characters", params=params).json()["characters"]

    def get_character(self, character_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/characters/{character_id}").json()

    def approve_character(self, character_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/characters/{character_id}/approve").json()

    def delete_character(self, character_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/characters/{character_id}").json()

    # -- renders -----------------------------------------------------------------------------------
    def render(self, **body: Any) -> RenderResponse:
        """Render synchronously (fields of ``RenderBody``: prompt, preset, seed, num_images, character ...)."""
        return _render_response(self._request("POST", "/v1/renders", json=body).json())

    def check_provenance(self, image: bytes, content_type: str = "image/png") -> dict[str, Any]:
        """What an image's provenance still says (``POST /v1/provenance/check``): surviving layers,
        signer, watermark and, for this key's tenant's renders, the audit record and request id."""
        return self._request(
            "POST", "/v1/provenance/check", content=image, headers={"Content-Type": content_type}
        ).json()

    def render_png(self, **body: Any) -> tuple[bytes, dict[str, str]]:
        """One image as PNG bytes, with the response headers (X-Seed, X-Image-Id ...)."""
        response = self._request("POST", "/v1/renders", json=body, headers={"Accept": "image/png"})
        return response.content, dict(response.headers)

    # -- jobs --------------------------------------------------------------------------------------
    def submit_job(self, **body: Any) -> dict[str, Any]:
        return self._request("POST", "/v1/jobs", json=body).json()

    def get_job(self, job_id: str, include_images: bool = False) -> dict[str, Any]:
        params = {"include_images": "true"} if include_images else None
        return self._request("GET", f"/v1/jobs/{job_id}", params=params).json()

    def list_jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/jobs", params={"limit": limit}).json()["jobs"]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()

    def job_image(self, job_id: str, index: int) -> bytes:
        return self._request("GET", f"/v1/jobs/{job_id}/images/{index}").content

    def events(self, job_id: str, last_event_id: int | None = None) -> Iterator[Event]:
        """The job's server-sent events until it ends (done, failed or cancelled).

        A stream the server closes after its lifetime ends with a ``reconnect`` event: this
        reconnects with ``Last-Event-ID`` (the last id seen), so no event is lost or repeated.
        """
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id is not None:
                headers["Last-Event-ID"] = str(last_event_id)
            reconnect = False
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
                    if response.status_code >= 400:
                        response.read()
                        _raise_for(response)
                    for event in parse_sse(response.iter_lines()):
                        if event.type == "reconnect":
                            reconnect = True
                            break
                        if event.id is not None:
                            last_event_id = event.id
                        yield event
            except httpx.TransportError as exc:
                raise ApiClientError(0, "transport_error", f"{type(exc).__name__}: {exc}") from exc
            if not reconnect:
                return

    def wait_job(self, job_id: str, timeout_s: float = 300.0, poll_s: float = 0.2) -> dict[str, Any]:
        """Poll until the job ends; returns it with its images inline."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if job["status"] in ("done", "failed", "cancelled"):
                return self.get_job(job_id, include_images=True) if job["status"] == "done" else job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s:.0f}s")
            time.sleep(poll_s)

    @staticmethod
    def job_images(job: dict[str, Any]) -> list[RenderedPNG]:
        return _render_response(dict(job.get("result") or {})).images


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events from a stream of lines (``id``, ``event``, ``data``; comments skipped)."""
    event_id: int | None = None
    kind = "message"
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                payload = "\n".join(data)
                try:
                    parsed = json.loads(payload)
                except ValueError:
                    parsed = {"raw": payload}
                yield Event(event_id, kind, parsed)
            event_id, kind, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            event_id = int(value) if value.isdigit() else None
        elif name == "event":
            kind = value
        elif name == "data":
            data.append(value)
