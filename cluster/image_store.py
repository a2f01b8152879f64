"""Images kept for `response_format: "url"`: a bounded in-memory store with expiry.

`ImageStore` holds encoded images under unguessable ids, for `ttl_s` seconds (OpenAI's URLs last
60 minutes), within a byte and a count budget: expired images go first, and when the budget is
still exceeded the oldest ones go before their time (logged). `GET /v1/images/files/{id}`
serves them; an unknown or expired id is a 404 in OpenAI's error shape. The id is the whole
credential (like a pre-signed URL): the route needs no API key, so an `<img src>` can load it.

The Serve application runs the store as its own deployment (`ImageStoreDeployment`, one
replica) so that every ingress replica resolves every URL, whichever replica made the image
and whichever one the GET reaches. Its images are lost when it restarts (then 404).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ray import serve

from bagel_model.errors import InvalidRequest

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires: float  # on the store's clock


class ImageStore:
    def __init__(self, max_bytes: int, max_images: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_bytes, self.max_images, self.ttl_s, self.clock = max_bytes, max_images, ttl_s, clock
        self._images: OrderedDict[str, StoredImage] = OrderedDict()  # oldest first (all live equally long)
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> str:
        """Keep the image; returns its id."""
        if len(data) > self.max_bytes:
            raise InvalidRequest(f"response_format 'url': the image ({len(data)} bytes) is larger than the URL "
                                 f"store ({self.max_bytes} bytes); ask for b64_json")
        image_id = secrets.token_urlsafe(24)
        with self._lock:
            now = self.clock()
            self._expire(now)
            early = 0
            while self._images and (self._bytes + len(data) > self.max_bytes or len(self._images) >= self.max_images):
                self._drop(next(iter(self._images)))
                early += 1
            if early:
                log.warning("image URL store full (%d bytes, %d images at most): %d images dropped before they "
                            "expired", self.max_bytes, self.max_images, early)
            self._images[image_id] = StoredImage(data, media_type, now + self.ttl_s)
            self._bytes += len(data)
        return image_id

    def get(self, image_id: str) -> tuple[bytes, str, float] | None:
        """(bytes, media type, seconds left), or None when unknown or expired."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            image = self._images.get(image_id)
            return None if image is None else (image.data, image.media_type, image.expires - now)

    def stats(self) -> dict:
        with self._lock:
            self._expire(self.clock())
            return {"images": len(self._images), "bytes": self._bytes, "max_images": self.max_images,
                    "max_bytes": self.max_bytes, "ttl_s": self.ttl_s}

    def _expire(self, now: float) -> None:
        while self._images:
            oldest = next(iter(self._images))
            if self._images[oldest].expires > now:
                break
            self._drop(oldest)

    def _drop(self, image_id: str) -> None:
        self._bytes -= len(self._images.pop(image_id).data)


@serve.deployment(ray_actor_options={"num_cpus": 0}, num_replicas=1, max_ongoing_requests=256)
class ImageStoreDeployment:
    """The application's one `ImageStore`, shared by the ingress replicas."""

    def __init__(self, max_bytes: int, max_images: int, ttl_s: float):
        self.store = ImageStore(max_bytes, max_images, ttl_s)

    def put(self, data: bytes, media_type: str) -> str:
        return self.store.put(data, media_type)

    def get(self, image_id: str) -> tuple[bytes, str, float] | None:
        return self.store.get(image_id)

    def stats(self) -> dict:
        return self.store.stats()


class StoreClient:
    """The store as the service calls it: the application's deployment (through its handle), or
    a store in this process (a service built without Serve)."""

    def __init__(self, store: ImageStore | serve.handle.DeploymentHandle):
        self.store = store

    async def put(self, data: bytes, media_type: str) -> str:
        if isinstance(self.store, ImageStore):
            return self.store.put(data, media_type)
        return await self.store.put.remote(data, media_type)

    async def get(self, image_id: str) -> tuple[bytes, str, float] | None:
        if isinstance(self.store, ImageStore):
            return self.store.get(image_id)
        return await self.store.get.remote(image_id)
