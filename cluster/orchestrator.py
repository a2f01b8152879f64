"""The ingress deployment: what Serve needs and nothing else.

Its constructor builds the `BagelService` (which creates the pipeline's stage workers, as one
gang), the Python handle methods delegate to it, `check_health` tells Serve when the replica must
be replaced, and the HTTP app (`http.py`) reaches the replica's service through the replica
context.
"""
from __future__ import annotations

from ray import serve

from .api import ImageOutput, ImageTask, TextOutput, TextTask
from .args import AppArgs
from .http import create_app
from .service import BagelService


def _replica_service() -> BagelService:
    return serve.get_replica_context().servable_object.service


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(create_app(_replica_service))
class Orchestrator:
    def __init__(self, args: AppArgs, encoder, decoder, image_store=None):
        self.service = BagelService(args, encoder, decoder, image_store=image_store)

    async def generate(self, task: ImageTask) -> ImageOutput:
        """Generate one image (text-to-image, editing, interleaved inputs)."""
        return await self.service.generate(task)

    async def understand(self, task: TextTask) -> TextOutput:
        """Answer about text and images."""
        return await self.service.understand(task)

    async def stats(self) -> dict:
        return await self.service.stats()

    def check_health(self) -> None:
        """Raises once the stage workers cannot be rebuilt: Serve then replaces this replica."""
        self.service.check_health()
