"""The ingress deployment: what Serve needs and nothing else.

Each replica is one complete pipeline: its constructor builds the `BagelService`, which creates
the replica's stage workers in the placement group Serve reserved for it (`build_app` sets the
bundles, cluster/topology.py) in the background, and starts watching the encoder and decoder
deployments. The Python handle methods delegate to the service, `check_health` tells Serve when
the replica must be replaced, and the HTTP app (`http.py`) reaches the replica's service through
the replica context.
"""
from __future__ import annotations

from ray import serve

from .api import ImageOutput, ImageTask, TextOutput, TextTask
from .args import AppArgs
from .http import create_app
from .service import BagelService


def _replica_service() -> BagelService:
    return serve.get_replica_context().servable_object.service


def _replica_rank() -> int | None:
    """This replica's index among the deployment's replicas (Serve's rank; reused by a
    replacement), None where this Serve version has no ranks."""
    rank = getattr(serve.get_replica_context(), "rank", None)
    return getattr(rank, "rank", rank)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(create_app(_replica_service))
class Orchestrator:
    def __init__(self, args: AppArgs, encoder, decoder, image_store=None):
        self.service = BagelService(args, encoder, decoder, image_store=image_store, replica=_replica_rank())
        self.service.deployments.start()  # watches the encoder's and decoder's Serve status

    async def generate(self, task: ImageTask) -> ImageOutput:
        """Generate one image (text-to-image, editing, interleaved inputs)."""
        return await self.service.generate(task)

    async def understand(self, task: TextTask) -> TextOutput:
        """Answer about text and images."""
        return await self.service.understand(task)

    async def stats(self) -> dict:
        return await self.service.stats()

    async def record_routing_stats(self) -> dict:
        """For the prefix-affinity router (cluster/routing.py): the keys of recent requests."""
        return {"keys": self.service.affinity.snapshot()}

    def check_health(self) -> None:
        """Raises once the stage workers cannot be rebuilt: Serve then replaces this replica."""
        self.service.check_health()
