"""Service configuration: GPU shares derived from the cluster; the config file's defaults."""
from pathlib import Path

import yaml

from cluster.args import AppArgs, gpu_shares, with_gpu_shares


def test_gpu_shares_fit_the_cluster():
    assert gpu_shares(3, 0) == (0.0, 0.0, 0.0)
    assert gpu_shares(1, 1) == (0.9, 0.05, 0.05)
    assert gpu_shares(3, 1) == (0.26, 0.1, 0.1)  # 3 x 0.26 + 0.2 <= 1
    assert gpu_shares(3, 2) == (0.4, 0.1, 0.1)  # two stages share one GPU
    assert gpu_shares(3, 4) == (1.0, 0.5, 0.5)
    args = with_gpu_shares(AppArgs(num_stages=3, encoder_gpus=0.3), 4)
    assert (args.gpus_per_stage, args.encoder_gpus, args.decoder_gpus) == (1.0, 0.3, 0.5)


def test_ray_config_shows_the_defaults(monkeypatch):
    """ray_config.yaml spells out AppArgs' defaults for the reader; they must stay the defaults."""
    for var in ("BAGEL_CHECKPOINT", "BAGEL_NUM_STAGES", "BAGEL_DEVICE", "BAGEL_DTYPE", "BAGEL_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "ray_config.yaml").read_text())
    listed = config["applications"][0]["args"]
    assert len(listed) > 10 and len(listed["limits"]) > 5
    assert AppArgs(**listed) == AppArgs()
