"""Service configuration: GPU shares derived from the cluster and the topology; the config file's defaults."""
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cluster.args import AppArgs, with_gpu_shares
from cluster.topology import Shares, Topology, gpu_shares


def test_gpu_shares_fit_the_cluster():
    assert gpu_shares(Topology(1, 1, 3), 0) == Shares(0.0, 0.0, 0.0)
    assert gpu_shares(Topology(1, 1, 1), 1) == Shares(0.9, 0.05, 0.05)
    assert gpu_shares(Topology(1, 1, 3), 1) == Shares(0.26, 0.1, 0.1)  # 3 x 0.26 + 0.2 <= 1
    assert gpu_shares(Topology(1, 1, 3), 2) == Shares(0.4, 0.2, 0.2)  # two stages share one GPU
    assert gpu_shares(Topology(1, 1, 3), 4) == Shares(1.0, 0.5, 0.5)
    args = with_gpu_shares(AppArgs(num_stages=3, encoder_gpus=0.3), 4)
    assert (args.gpus_per_stage, args.encoder_gpus, args.decoder_gpus) == (1.0, 0.3, 0.5)


def test_ray_config_shows_the_defaults(monkeypatch):
    """ray_config.yaml spells out AppArgs' defaults for the reader; they must stay the defaults."""
    for var in ("BAGEL_CHECKPOINT", "BAGEL_NUM_STAGES", "BAGEL_NUM_REPLICAS", "BAGEL_CFG_PARALLEL", "BAGEL_DEVICE",
                "BAGEL_DTYPE", "BAGEL_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "cluster" / "ray_config.yaml").read_text())
    listed = config["applications"][0]["args"]
    assert len(listed) > 10 and len(listed["limits"]) > 5
    assert AppArgs(**listed) == AppArgs()


def test_gpu_shares_count_every_replica_and_branch_group():
    assert gpu_shares(Topology(2, 1, 1), 1) == Shares(0.4, 0.05, 0.05)  # 2 workers + 2 encoders + 2 decoders
    assert gpu_shares(Topology(1, 2, 2), 1) == Shares(0.2, 0.1, 0.1)
    assert gpu_shares(Topology(2, 3, 1), 8) == Shares(1.0, 0.5, 0.5)  # 6 GPUs for workers, 2 for 4 others
    assert gpu_shares(Topology(2, 1, 3), 6) == Shares(0.9, 0.1, 0.1)  # each GPU: a worker and 0.1 left
    # Autoscaling plans for its largest replica count.
    args = with_gpu_shares(AppArgs(autoscaling_config={"min_replicas": 1, "max_replicas": 4}), 4)
    assert args.topology == Topology(4, 1, 1) and args.gpus_per_stage == 0.9


def test_topology_fields_validate():
    assert AppArgs(num_replicas=2, cfg_parallel=3, num_stages=2).topology == Topology(2, 3, 2)
    with pytest.raises(ValidationError, match="cfg_parallel"):
        AppArgs(cfg_parallel=4)
    with pytest.raises(ValidationError, match="not both"):
        AppArgs(num_replicas=2, autoscaling_config={"max_replicas": 3})
    with pytest.raises(ValidationError, match="below min_replicas"):
        AppArgs(autoscaling_config={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValidationError, match="placement_strategy"):
        AppArgs(placement_strategy="ANYWHERE")
