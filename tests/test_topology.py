"""Topologies: replicas x CFG-parallel branch groups x stages.

Without Ray: the GPU shares and the placement check on described clusters (3 x 24 GB, one
H200, 8 GPUs, two nodes), the bundles each replica asks Serve for, and where the executor puts
each context.

With the real Serve app on the CPU (float32): 1x2x1, 1x3x1, 2x1x1, 2x1x3 and 1x2x3 give the same
images as the in-process pipeline (within one pixel level: branches run as separate forwards,
which changes float summation order slightly) for text-to-image (2 branches) and editing (3
branches); /health lists every worker of the answering replica; requests spread over the
replicas; a worker killed in one replica fails only that replica's requests; autoscaling adds a
replica under load and removes it afterwards.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from ray import serve

from bagel_model.config import BagelConfig
from bagel_model.demo import demo_config, demo_tokenizer, write_checkpoint
from bagel_model.memory_plan import stage_weight_bytes
from bagel_model.segments import Segment
from bagel_model.simulated import SimulatedRunner, Simulation
from bagel_model.stage import split_layers
from bagel_model.transforms import open_image
from cluster.executor import ClusterExecutor
from cluster.topology import Cluster, Shares, Topology, TopologyError, check_fits, fitting, gpu_shares, replica_bundles
from pipelines.context import context_name
from pipelines.guidance import Branch
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, ImageParams
from pipelines.previews import render_preview
from pipelines.step import EulerStep
from pipelines.tasks import generate_image

from .service_app import APP_NAME, data_url, max_pixel_diff, running_app, sse_events

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

GIB = 2**30
BAGEL = BagelConfig()  # the released 7B model's shapes


@functools.lru_cache(maxsize=None)
def even_split(stages: int) -> tuple[int, ...]:
    """bf16 weight bytes of each stage (the memory planner's count)."""
    return tuple(stage_weight_bytes(BAGEL, spec, None) for spec in split_layers(BAGEL.llm.num_hidden_layers, stages))


def fits(topology: str, cluster: Cluster, **kw) -> None:
    t = Topology(*map(int, topology.split("x")))
    check_fits(t, kw.pop("shares", gpu_shares(t, cluster.gpus)), cluster, even_split(t.stages), even_split, **kw)


# -- placement arithmetic (no Ray) ------------------------------------------------------------

def test_three_24gb_gpus_take_three_stages_and_not_three_branch_groups():
    cluster = Cluster((3,), 24 * GIB)
    fits("1x1x3", cluster)
    with pytest.raises(TopologyError) as e:
        fits("1x3x1", cluster)
    message = str(e.value)
    assert "26.4 GiB" in message and "use more stages" in message  # a whole model per group
    assert "fit with automatic GPU shares: 1x1x3, 1x1x2" in message
    with pytest.raises(TopologyError, match="fit with automatic GPU shares: 1x1x3"):
        fits("1x1x1", cluster)


def test_one_big_gpu_holds_every_topology_of_the_gpu_run():
    h200 = Cluster((1,), 141 * GIB)
    for topology in ("2x1x1", "1x2x1", "1x3x1", "1x2x2", "2x1x3"):
        fits(topology, h200)
    # 24 GiB caps: one whole model per process does not fit, half of it does.
    fits("1x2x2", h200, memory_fraction=24 / 141)
    with pytest.raises(TopologyError, match="more than the 24.0 GiB"):
        fits("1x2x1", h200, memory_fraction=24 / 141)
    # Four whole models (106 GiB) fit 141 GiB; a fifth does not.
    with pytest.raises(TopologyError, match="one GPU would hold 132.0 GiB"):
        fits("5x1x1", h200)


def test_explicit_shares_are_checked_against_the_gpu_count():
    cluster = Cluster((8,), 141 * GIB)
    fits("2x3x1", cluster, shares=Shares(1.0, 0.5, 0.5))
    with pytest.raises(TopologyError) as e:
        fits("3x3x1", cluster, shares=Shares(1.0, 0.5, 0.5))
    assert "9 stage workers of 1.0 GPU need 9 GPUs" in str(e.value)
    assert "4x2x1, 8x1x1" in str(e.value)  # the suggestions use every GPU
    with pytest.raises(TopologyError, match="runs on one GPU"):
        fits("1x1x1", cluster, shares=Shares(2.0, 0.5, 0.5))
    with pytest.raises(TopologyError, match="no GPUs"):
        fits("1x1x1", Cluster(()), shares=Shares(1.0, 0.5, 0.5))
    fits("4x1x1", Cluster(()), shares=Shares(0.0, 0.0, 0.0))  # CPU: nothing to place


def test_strict_pack_keeps_a_replica_on_one_node():
    two_nodes = Cluster((4, 4), 80 * GIB)
    fits("2x2x2", two_nodes, shares=Shares(1.0, 0.0, 0.0), strategy="STRICT_PACK")
    fits("1x3x2", two_nodes, shares=Shares(1.0, 0.0, 0.0), strategy="PACK")  # spread over both nodes
    with pytest.raises(TopologyError, match="STRICT_PACK puts a replica's 6 stage workers"):
        fits("1x3x2", two_nodes, shares=Shares(1.0, 0.0, 0.0), strategy="STRICT_PACK")
    assert fitting(Cluster((8,), 141 * GIB), even_split, limit=3) == [
        Topology(4, 2, 1), Topology(8, 1, 1), Topology(2, 2, 2)]


def test_each_replica_asks_for_its_ingress_and_every_worker():
    assert replica_bundles(Topology(2, 3, 2), 0.25) == [{"CPU": 0.01}] + [{"GPU": 0.25}] * 6
    assert replica_bundles(Topology(1, 1, 3), 0.0) == [{"CPU": 0.01}] * 4  # a bundle cannot be empty


def test_contexts_are_placed_by_branch_and_requests_spread_over_groups():
    assert context_name("req7/cfg_text12") == ("req7", "cfg_text")
    executor = ClusterExecutor(None, None, SimpleNamespace(num_stages=1, num_groups=3), None, None)
    place = executor._place
    assert [place(f"a/{n}") for n in ("cond0", "cfg_text1", "cfg_img2")] == [0, 1, 2]
    assert place("a/decode3", source=0) == 0  # a decode fork stays with its source
    # The next request's COND goes to the group with the fewest requests based there.
    assert [place(f"b/{n}") for n in ("cond0", "cfg_text1", "cfg_img2")] == [1, 2, 0]
    two = ClusterExecutor(None, None, SimpleNamespace(num_stages=1, num_groups=2), None, None)
    assert [two._place(f"c/{n}") for n in ("cond0", "cfg_text1", "cfg_img2")] == [0, 1, 1]
    executor._forget(["a/cond0", "a/cfg_text1", "a/cfg_img2", "a/decode3"])
    assert "a" not in executor._requests and place("d/cond0") == 0


def test_previews_are_asked_of_the_image_state_owner():
    """predicted_clean goes to the last stage of the group holding the image's COND branch
    (where its sampler state lives), not to group 0's."""
    asked = []
    stages = SimpleNamespace(num_stages=2, num_groups=2,
                             call_last=lambda method, *args, group: asked.append((method, args, group)))
    executor = ClusterExecutor(None, None, stages, None, None)
    assert [executor._place(c) for c in ("a/cond0", "b/cond0")] == [0, 1]
    executor.predicted_clean("b/cond0")
    executor.predicted_clean("a/cond0")
    assert asked == [("predicted_clean", ("b/cond0",), 1), ("predicted_clean", ("a/cond0",), 0)]


class RecordingStages:
    """`StageGroup`'s submission interface for `ClusterExecutor.denoise`, recording what is
    submitted and waited for, in order."""

    def __init__(self, num_stages: int, num_groups: int = 1):
        self.num_stages, self.num_groups, self.log = num_stages, num_groups, []

    def rank(self, group: int, stage: int) -> int:
        return group * self.num_stages + stage

    @contextlib.contextmanager
    def ordered(self):
        yield self

    def share(self, owner, key, firsts):
        self.log.append(("share", key))
        return ("share", key)

    def chain(self, group, segments, parts=None, latents=None, owners=None):
        [part] = parts
        self.log.append(("chain", part.key, part.step.index))
        return ("chain", part.key, part.step.index)

    def gather(self, owner, parts, calls):
        return ("gather",)

    def wait(self, calls):
        self.log.append(("wait", *sorted({c[1:] for c in calls if c[0] == "chain"})))
        return [None] * len(calls)


@pytest.mark.parametrize("num_stages", [1, 3])
def test_a_step_that_would_stall_the_stages_waits_for_its_latents(num_stages):
    """One image alone runs one step ahead. With another image being denoised, a step whose first
    stages wait for the previous step's latents (several stages) is submitted only once that
    step has finished, so it never holds the other image's ready work up at a stage's head of
    queue; with one stage the latents never leave it, and steps still queue back to back."""
    stages = RecordingStages(num_stages)
    executor = ClusterExecutor(None, None, stages, None, None)
    grid = (2, 2)
    x0 = torch.zeros(4, 64)

    def step(key: str, index: int) -> None:
        euler = EulerStep(index, 1.0, 0.1, (Branch.COND,), (), T2I, final=False)
        latents = x0 if index == 0 else None
        executor.denoise([Segment.noise(f"{key}/cond0", latents, grid, 1.0, 0)], euler)

    step("a", 0), step("a", 1)
    assert stages.log[-1] == ("wait", ("a/cond0", 0))  # alone: step 1 submitted, then step 0 awaited
    step("b", 0)
    stages.log.clear()
    step("a", 2)
    if num_stages == 1:
        assert stages.log == [("chain", "a/cond0", 2), ("wait", ("a/cond0", 1))]
    else:
        assert stages.log == [("wait", ("a/cond0", 1)), ("share", "a/cond0"), ("chain", "a/cond0", 2)]


def test_a_context_moves_between_runners_whole(checkpoint_dir, h200_simulation):
    """A fork whose copy runs on another branch group: `export_context` / `import_context` carry
    every layer's K/V (the real runner) or the token count after the link's time (simulated)."""
    source, target = (LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32).runners[0] for _ in range(2))
    source.run([Segment.text("r/cond0", list(range(5, 12)), 0)])
    target.import_context("r/cfg_text0", source.export_context("r/cond0"))
    for layer in source.cache.layers:
        for a, b in zip(source.cache.get("r/cond0", layer), target.cache.get("r/cfg_text0", layer), strict=True):
            assert torch.equal(a, b)
    assert source.export_context("unknown") is None
    with pytest.raises(ValueError, match="already exists"):
        target.import_context("r/cfg_text0", source.export_context("r/cond0"))

    config = BagelConfig()
    spec = split_layers(config.llm.num_hidden_layers, 2)[0]
    sim_source, sim_target = (SimulatedRunner(config, spec, h200_simulation, torch.bfloat16) for _ in range(2))
    sim_source.cache.append("r/cond0", 3000)
    t = time.perf_counter()
    sim_target.import_context("r/cfg_text0", sim_source.export_context("r/cond0"))
    elapsed = time.perf_counter() - t
    link = h200_simulation.profile.link.seconds(3000 * sim_source.cache.bytes_per_token)
    assert sim_target.cache.length("r/cfg_text0") == 3000 and sim_source.link_s == pytest.approx(link)
    assert link * h200_simulation.time_scale <= elapsed
    assert sim_source.export_context("unknown") is None


@pytest.fixture
def h200_simulation() -> Simulation:
    return Simulation.named("h200", time_scale=1.0)


# -- the Serve app ----------------------------------------------------------------------------

STEPS = 4
T2I = ImageParams(num_timesteps=STEPS, height=64, width=64)  # cfg_img 1.0: COND and text-free
EDIT = replace(EDIT_DEFAULTS, num_timesteps=STEPS)  # COND, text-free and image-free
PROMPT, EDIT_PROMPT = "A red fox in the snow.", "Make it purple."
TOPOLOGIES = {"1x2x1": "fixture", "1x3x1": "fixture", "2x1x3": "demo4", "1x2x3": "demo4"}  # 2x1x1: below


@pytest.fixture(scope="session")
def demo4(tmp_path_factory) -> Path:
    tok = demo_tokenizer()
    return write_checkpoint(tmp_path_factory.mktemp("topology-demo4"), demo_config(num_layers=4, vocab_size=len(tok)), tok)


@pytest.fixture(scope="session")
def input_png(fixture_dir: Path) -> bytes:
    return (fixture_dir / "inputs" / "input_gradient.png").read_bytes()


@pytest.fixture(scope="session")
def expected(checkpoint_dir, demo4, input_png) -> dict:
    """In-process images per checkpoint: (text-to-image, edit)."""
    out = {}
    for name, folder in (("fixture", checkpoint_dir), ("demo4", demo4)):
        executor = LocalExecutor.from_checkpoint(folder, dtype=torch.float32)
        t2i = generate_image(executor, [PROMPT], T2I, noise=NoiseSource(1)).image
        edit = generate_image(executor, [open_image(input_png), EDIT_PROMPT], EDIT, noise=NoiseSource(2)).image
        out[name] = (t2i, edit)
    return out


def app_args(topology: str, folder: Path, **extra) -> dict:
    replicas, groups, stages = map(int, topology.split("x"))
    return {"checkpoint_dir": str(folder), "device": "cpu", "dtype": "float32", "num_replicas": replicas,
            "cfg_parallel": groups, "num_stages": stages, **extra}


def t2i_body(**extra) -> dict:
    return {"prompt": PROMPT, "size": "64x64", "num_timesteps": STEPS, "seed": 1, **extra}


def edit_body(input_png: bytes) -> dict:
    return {"prompt": EDIT_PROMPT, "image": data_url(input_png), "num_timesteps": STEPS, "seed": 2}


def healths(client: httpx.Client, replicas: int, timeout_s: float = 60) -> dict[int, dict]:
    """/health of every replica (Serve routes each call to one; poll until all have answered)."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < replicas:
        r = client.get("/health")
        if r.status_code == 200:
            seen[r.json()["replica"]] = r.json()
        if time.monotonic() > deadline:
            pytest.fail(f"only replicas {sorted(seen)} of {replicas} answered /health")
    return seen


def replica_health(client: httpx.Client, replica: int, timeout_s: float = 30) -> dict:
    """The /health answer of one replica (whatever its status)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        doc = client.get("/health").json()
        if doc.get("replica") == replica:
            return doc
    pytest.fail(f"replica {replica} did not answer /health within {timeout_s} s")


def workers(health: dict) -> list[tuple[int, int, int]]:
    return sorted((s["replica"], s["branch_group"], s["stage"]) for s in health["stages"])


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_topology_serves_the_in_process_images(topology, ray_url, checkpoint_dir, demo4, expected, input_png):
    replicas, groups, stages = map(int, topology.split("x"))
    which = TOPOLOGIES[topology]
    folder = {"fixture": checkpoint_dir, "demo4": demo4}[which]
    with running_app(ray_url, app_args(topology, folder)), httpx.Client(base_url=ray_url, timeout=120) as client:
        for replica, health in healths(client, replicas).items():
            assert health["topology"] == topology
            assert workers(health) == [(replica, g, k) for g in range(groups) for k in range(stages)]
            pids = [s["pid"] for s in health["stages"]]
            assert len(set(pids)) == groups * stages
            for pid in pids:
                os.kill(pid, 0)  # a live process of this machine
        t2i = client.post("/v1/images/generations", json=t2i_body())
        edit = client.post("/v1/images/edits", json=edit_body(input_png))
        for what, r, image in (("text-to-image", t2i, expected[which][0]), ("edit", edit, expected[which][1])):
            assert r.status_code == 200, r.text
            diff = max_pixel_diff(r.json()["data"][0]["b64_json"], image)
            assert diff <= 1, f"{topology} {what}: max pixel difference {diff}"
        if topology == "1x2x1":
            assert_previews(client, checkpoint_dir)
        for health in healths(client, replicas).values():
            assert all(s["live_contexts"] == 0 and not s["latent_states"] for s in health["stages"])


def assert_previews(client: httpx.Client, checkpoint_dir: Path) -> None:
    """Two streamed requests at once (the second's COND branch lands on group 1): each one's
    previews come from its state owner and equal the in-process pipeline's."""
    executor, previews = LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32), []
    params = replace(T2I, num_timesteps=6)
    generate_image(executor, [PROMPT], params, noise=NoiseSource(1), previews=2, on_preview=previews.append)
    expected = [render_preview(executor, p.latent(), "linear") for p in previews]
    streams: list[list] = []

    def stream() -> None:
        body = t2i_body(num_timesteps=6, partial_images=2, stream=True)
        with client.stream("POST", "/v1/images/generations", json=body) as response:
            streams.append([e for e in sse_events(response.iter_lines()) if isinstance(e, dict)])

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(streams) == 2
    for events in streams:
        partials = [e for e in events if e["type"] == "image_generation.partial_image"]
        assert events[-1]["type"] == "image_generation.completed", events[-1]
        assert len(partials) == 2
        for event, image in zip(partials, expected, strict=True):
            assert max_pixel_diff(event["b64_json"], image) <= 1


def test_replicas_share_the_load_and_fail_alone(ray_url, checkpoint_dir, expected):
    """2x1x1: concurrent requests land on both replicas, with the in-process images. Then, with
    requests in flight on both, the worker of replica A is killed: A's requests fail with 503,
    B's succeed, and B keeps its worker and its `ok`."""
    args = app_args("2x1x1", checkpoint_dir, limits={"max_num_timesteps": 1000})
    with running_app(ray_url, args), httpx.Client(base_url=ray_url, timeout=120) as client:
        before = healths(client, 2)
        for replica, health in before.items():
            assert workers(health) == [(replica, 0, 0)]
        responses = run_concurrently(client, 6, t2i_body())
        assert [r.status_code for r in responses] == [200] * 6
        assert all(max_pixel_diff(r.json()["data"][0]["b64_json"], expected["fixture"][0]) <= 1 for r in responses)
        after = healths(client, 2)
        done = {r: after[r]["requests_completed"] - before[r]["requests_completed"] for r in after}
        assert sum(done.values()) == 6 and min(done.values()) >= 1, f"requests per replica: {done}"

        assert_affinity(client, app_handle(), checkpoint_dir)

        a, b = sorted(after)
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(client.post(
            "/v1/images/generations", json=t2i_body(num_timesteps=600)).status_code)) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: all(h["requests_in_system"] > 0 for h in healths(client, 2).values()), 60)
        os.kill(after[a]["stages"][0]["pid"], signal.SIGKILL)
        for t in threads:
            t.join(timeout=180)
        assert sorted(set(results)) == [200, 503], f"statuses {results}: B's requests succeed, A's fail"
        survivor = replica_health(client, b)
        assert survivor["status"] == "ok"
        assert [s["pid"] for s in survivor["stages"]] == [s["pid"] for s in after[b]["stages"]]


def assert_affinity(client: httpx.Client, handle, checkpoint_dir: Path) -> None:
    """The prefix-affinity router (cluster/routing.py): each chat's follow-up turn (same
    X-Session-ID) lands on the replica that served its first turn, which then reuses the first
    turn's prompt (cached_tokens; by chance: 1 in 2**8). A handle call whose items extend an
    earlier call's lands where that one ran."""
    for i in range(8):
        headers = {"X-Session-ID": f"chat-{i}"}
        first = [{"role": "user", "content": f"Tell me about dog number {i}."}]
        r1 = client.post("/v1/chat/completions", json={"messages": first, "max_tokens": 2}, headers=headers)
        assert r1.status_code == 200, r1.text
        answer = r1.json()["choices"][0]["message"]["content"] or "ok"
        follow_up = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
        r2 = client.post("/v1/chat/completions", json={"messages": follow_up, "max_tokens": 2}, headers=headers)
        assert r2.status_code == 200, r2.text
        usage1, usage2 = r1.json()["usage"], r2.json()["usage"]
        assert usage2["prompt_tokens_details"]["cached_tokens"] == usage1["prompt_tokens"], f"chat {i}: {usage2}"

    from cluster.api import TextTask
    from pipelines.params import TextParams

    prompt, params = "Write about a cat.", TextParams(max_new_tokens=2)
    first = handle.understand.remote(TextTask([prompt], params)).result(timeout_s=60)
    for k in range(4):
        more = handle.understand.remote(TextTask([prompt, f"It is cat {k}."], params)).result(timeout_s=60)
        assert more.cached_tokens == first.prompt_tokens, "the handle call missed the replica with its prefix"


def test_affinity_keys_of_an_extended_request_start_with_the_first_ones():
    from PIL import Image

    from cluster.api import TextTask
    from cluster.inputs import EncodedImage
    from cluster.routing import affinity_keys

    png = b"\x89PNG fake bytes"
    first = affinity_keys("", [TextTask([png, "What is it?"])])
    follow = affinity_keys("s1", [TextTask([EncodedImage(png, (8, 8), 64), "What is it?", "A dog.", "Why?"])])
    assert len(first) == 2 and follow[:2] == first and len(follow) == 5 and follow[-1] == "s:s1"
    assert affinity_keys("", [TextTask(["What is it?", png])])[0] != first[0]  # order matters
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert affinity_keys("", [TextTask([image])]) == affinity_keys("", [TextTask([image.copy()])])
    assert affinity_keys("", [b"http body"]) == [] and affinity_keys("s", []) == ["s:s"]


def app_handle():
    from ray import serve

    return serve.get_app_handle(APP_NAME)


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(ray_url, checkpoint_dir):
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
                   "downscale_delay_s": 1, "metrics_interval_s": 0.5, "look_back_period_s": 1}
    args = app_args("1x1x1", checkpoint_dir, num_replicas=1, autoscaling_config=autoscaling)
    with running_app(ray_url, args), httpx.Client(base_url=ray_url, timeout=120) as client:
        assert running_replicas() == 1
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                client.post("/v1/images/generations", json=t2i_body(num_timesteps=40))

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: running_replicas() == 2, 90)
            healths(client, 2)  # the new replica built its stage workers and serves
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        wait_until(lambda: running_replicas() == 1, 90)


def running_replicas() -> int:
    states = serve.status().applications[APP_NAME].deployments["Orchestrator"].replica_states
    return states.get("RUNNING", 0)


def run_concurrently(client: httpx.Client, n: int, body: dict) -> list[httpx.Response]:
    responses: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: responses.append(client.post("/v1/images/generations", json=body)))
               for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return responses


def wait_until(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout_s} s")
        time.sleep(0.2)


def test_gpu_topology_benchmark_runs_on_cpu(ray_url, checkpoint_dir, tmp_path):
    """bench/serve_gpu.py end to end on the tiny model: placement, links, latencies, throughput
    and the serial reference's output differences land in its report."""
    from bench import serve_gpu

    port = int(ray_url.rsplit(":", 1)[1])
    report, replicas = serve_gpu.main(["--topology", "1x2x1,2x1x1", "--device", "cpu", "--checkpoint",
                                       str(checkpoint_dir), "--size", "64", "--steps", "3", "--requests", "2", "--edit",
                                       "--concurrency", "2", "--reference", "--compile", "off", "--port", str(port),
                                       "--out", str(tmp_path)])
    saved = (tmp_path / "serve_gpu_1x2x1_64.json").read_text()
    assert '"topology": "1x2x1"' in saved and '"compile": false' in saved
    assert sorted(replicas["replicas"]) == [0, 1] and replicas["throughput"]["errors"] == []
    assert replicas["reference"]["t2i"]["max_pixel_diff"] <= 1  # the same serial run as 1x2x1's, deployed once
    [replica] = report["replicas"].values()
    assert [(s["branch_group"], s["stage"]) for s in replica["stages"]] == [(0, 0), (1, 0)]
    assert report["links"] == ["gloo"] and len(report["request_s"]) == 2 and len(report["edit_s"]) == 2
    assert report["throughput"]["errors"] == [] and len(report["throughput"]["latency_s"]) == 2
    for task in ("t2i", "edit"):
        assert report["reference"][task]["max_pixel_diff"] <= 1
