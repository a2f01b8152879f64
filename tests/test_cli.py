"""The `bagel` command line, run in-process through `main()` on the demo model (tiny, random
weights) and once through `python -m bagel_serve.cli`; small sizes keep it fast on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from bagel_model.demo import DEMO_LABEL, demo_config
from bagel_serve import cli
from bagel_serve.cli import main

REPO = Path(__file__).resolve().parent.parent
FAST = ["--num-timesteps", "3", "--seed", "0"]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(autouse=True)
def _demo_env(monkeypatch, demo_dir):
    monkeypatch.setenv("BAGEL_DEMO_DIR", str(demo_dir))
    monkeypatch.delenv("BAGEL_CHECKPOINT", raising=False)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, demo_dir) -> Path:
    """A 96x64 (WxH) PNG written by `bagel generate` on the demo model."""
    out = tmp_path_factory.mktemp("gen") / "gen.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BAGEL_DEMO_DIR", str(demo_dir))
        mp.delenv("BAGEL_CHECKPOINT", raising=False)
        assert main(["generate", "a red fox", "-o", str(out), "--height", "64", "--width", "96", *FAST]) == 0
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_writes_png_of_requested_size(tmp_path, capsys):
    out = tmp_path / "fox.png"
    code, stdout, stderr = run(capsys, "generate", "a red fox", "-o", str(out), "--height", "64", "--width", "96",
                               *FAST)
    assert code == 0, stderr
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (96, 64)
    assert stdout == ""
    assert DEMO_LABEL in stderr and "RANDOM" in stderr  # the random-weights warning
    assert "denoising" in stderr and "2/2" in stderr  # the progress bar (3 timesteps = 2 steps)
    assert f"wrote {out}" in stderr


def test_generate_same_seed_same_image(tmp_path, capsys, generated):
    out = tmp_path / "again.png"
    code, _, stderr = run(capsys, "generate", "a red fox", "-o", str(out), "--height", "64", "--width", "96", *FAST)
    assert code == 0, stderr
    with Image.open(out) as a, Image.open(generated) as b:
        assert a.tobytes() == b.tobytes()


def test_generate_negative_prompt_changes_the_image(tmp_path, capsys, generated):
    out = tmp_path / "negative.png"
    code, _, stderr = run(capsys, "generate", "a red fox", "-o", str(out), "--height", "64", "--width", "96", *FAST,
                          "--negative-prompt", "blurry")
    assert code == 0, stderr
    with Image.open(out) as a, Image.open(generated) as b:
        assert a.size == b.size and a.tobytes() != b.tobytes()


def test_generate_think_prints_the_thought(tmp_path, capsys):
    out = tmp_path / "think.png"
    code, stdout, stderr = run(capsys, "generate", "a cat", "-o", str(out), "--height", "32", "--width", "32",
                               "--think", "--max-new-tokens", "8", *FAST)
    assert code == 0, stderr
    assert stdout.strip() and stdout.endswith("\n")
    with Image.open(out) as img:
        assert img.size == (32, 32)


def test_edit_writes_the_vae_resized_size(tmp_path, capsys, generated):
    out = tmp_path / "edit.png"
    code, stdout, stderr = run(capsys, "edit", str(generated), "make it night", "-o", str(out), *FAST)
    assert code == 0, stderr
    expected = demo_config().vae_transform.target_size(96, 64)
    assert expected != (96, 64)  # the demo's VAE rule (short side >= 128) does resize it
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == expected
    assert stdout == "" and DEMO_LABEL in stderr


def test_understand_streams_the_answer(monkeypatch, capsys, generated):
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    code = main(["understand", "--image", str(generated), "What is this?", "--max-new-tokens", "12"])
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    text = "".join(writes)
    assert text.strip() and text.endswith("\n")
    assert len(writes) > 2  # streamed token by token, then the final newline
    assert DEMO_LABEL in stderr


def test_understand_text_only_with_think(capsys):
    code, stdout, stderr = run(capsys, "understand", "Why is the sky blue?", "--think", "--max-new-tokens", "6",
                               "--do-sample", "--temperature", "0.7", "--seed", "3")
    assert code == 0, stderr
    assert stdout.strip() and stdout.endswith("\n")


@pytest.mark.parametrize("argv, needle", [
    (["--cfg-renorm-type", "local"], "invalid choice: 'local'"),  # argparse
    (["--num-timesteps", "1"], "num_timesteps"),  # ImageParams.validate -> InvalidRequest
    (["--cfg-interval", "0.9", "0.1"], "cfg_interval"),
    (["--height", "1000"], "height"),  # above the demo model's largest side
    (["--stages", "9"], "stages"),
])
def test_bad_knob_exits_2(tmp_path, capsys, argv, needle):
    out = tmp_path / "x.png"
    code, _, stderr = run(capsys, "generate", "a fox", "-o", str(out), *argv)
    assert code == 2
    assert needle in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_edit_rejects_an_output_size(tmp_path, capsys, generated):
    code, _, stderr = run(capsys, "edit", str(generated), "x", "-o", str(tmp_path / "x.png"), "--height", "64")
    assert code == 2 and "--height" in stderr


@pytest.mark.parametrize("command", ["edit", "understand"])
def test_non_image_input_exits_2(tmp_path, capsys, command):
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not an image\n")
    argv = ([command, str(bogus), "x", "-o", str(tmp_path / "x.png")] if command == "edit"
            else [command, "--image", str(bogus), "x"])
    code, _, stderr = run(capsys, *argv)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")  # fails before any model work
    assert str(bogus) in stderr and "not a decodable image" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("command", ["edit", "understand"])
def test_missing_input_image_exits_2(tmp_path, capsys, command):
    missing = tmp_path / "missing.png"
    argv = ([command, str(missing), "x", "-o", str(tmp_path / "x.png")] if command == "edit"
            else [command, "--image", str(missing), "x"])
    code, _, stderr = run(capsys, *argv)
    assert code == 2
    assert stderr.startswith("error: ") and "not found" in stderr and str(missing) in stderr


def test_bad_output_path_exits_2(tmp_path, capsys):
    code, _, stderr = run(capsys, "generate", "x", "-o", str(tmp_path / "out.txt"))
    assert code == 2 and "extension" in stderr
    code, _, stderr = run(capsys, "generate", "x", "-o", str(tmp_path / "nope" / "out.png"))
    assert code == 2 and "does not exist" in stderr


def test_empty_checkpoint_dir_exits_2(tmp_path, capsys):
    empty = tmp_path / "ckpt"
    empty.mkdir()
    code, _, stderr = run(capsys, "generate", "x", "-o", str(tmp_path / "x.png"), "--checkpoint", str(empty))
    assert code == 2
    assert stderr.startswith("error: ") and "missing" in stderr and "llm_config.json" in stderr
    assert "Traceback" not in stderr and DEMO_LABEL not in stderr


def test_checkpoint_env_is_used(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BAGEL_CHECKPOINT", str(tmp_path / "absent"))
    code, _, stderr = run(capsys, "understand", "hi")
    assert code == 2 and "BAGEL_CHECKPOINT" in stderr and "absent" in stderr


def test_fixture_checkpoint_float32(tmp_path, capsys, checkpoint_dir):
    out = tmp_path / "fixture.png"
    code, _, stderr = run(capsys, "generate", "a blue square", "-o", str(out), "--checkpoint", str(checkpoint_dir),
                          "--dtype", "float32", "--device", "cpu", "--height", "64", "--width", "64", *FAST)
    assert code == 0, stderr
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)
    assert DEMO_LABEL not in stderr and "float32" in stderr


def test_quantized_weights_on_the_fixture(tmp_path, capsys, checkpoint_dir):
    """--quantize df11 loads the fixture compressed and draws the same image as the exact run."""
    images = []
    for extra in ([], ["--quantize", "df11", "--quantize-vit"]):
        out = tmp_path / f"q{len(extra)}.png"
        code, _, stderr = run(capsys, "generate", "a blue square", "-o", str(out), "--checkpoint", str(checkpoint_dir),
                              "--dtype", "float32", "--device", "cpu", "--height", "64", "--width", "64", *FAST, *extra)
        assert code == 0, stderr
        images.append(Image.open(out).tobytes())
    assert "weights df11" in stderr and images[0] == images[1]
    code, _, stderr = run(capsys, "generate", "x", "-o", str(tmp_path / "x.png"), "--quantize", "int4")
    assert code == 2 and "invalid choice: 'int4'" in stderr


def test_plan_prints_the_arithmetic_or_what_would_fit(capsys):
    code, out, _ = run(capsys, "plan", "--gpus", "3", "--gpu-memory", "24")
    assert code == 0 and "plan: 3 stages on 3 GPUs of 24.00 GiB, weights bf16 (exact)" in out
    assert "KV budget per stage" in out
    code, out, _ = run(capsys, "plan", "--gpus", "1", "--gpu-memory", "24", "--local", "--quantize", "int8")
    assert code == 0 and "weights int8 (APPROXIMATE)" in out and "one process" in out
    code, _, err = run(capsys, "plan", "--gpus", "1", "--gpu-memory", "24", "--concurrency", "64")
    assert code == 2 and err.startswith("error: no layout fits 64 concurrent") and "holds" in err
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "plan", "--gpu-memory", "24")  # no GPU here and none given
        assert code == 2 and "pass --gpus" in err


def test_help_and_usage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("generate", "edit", "understand"))
    assert main([]) == 2  # a command is required
    assert main(["generate", "--help"]) == 0
    assert "--cfg-renorm-type" in capsys.readouterr().out


def test_a_subcommand_is_one_function(monkeypatch, capsys):
    def add_hello(subparsers):
        p = subparsers.add_parser("hello")
        p.set_defaults(run=lambda args: print("hi") or 0)

    monkeypatch.setitem(cli.COMMANDS, "hello", add_hello)
    assert main(["hello"]) == 0 and capsys.readouterr().out == "hi\n"


def test_python_m_entry_point(tmp_path, demo_dir):
    out = tmp_path / "sub.png"
    env = {**os.environ, "BAGEL_DEMO_DIR": str(demo_dir)}
    env.pop("BAGEL_CHECKPOINT", None)
    proc = subprocess.run([sys.executable, "-m", "bagel_serve.cli", "generate", "a fox", "-o", str(out),
                           "--height", "64", "--width", "64", *FAST],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert DEMO_LABEL in proc.stderr
    with Image.open(out) as img:
        assert img.size == (64, 64) and img.mode == "RGB"


def test_help_imports_no_torch_ray_or_httpx():
    """`bagel --help` (and a subcommand's help) answers without importing the heavy libraries."""
    code = ("import sys\nfrom bagel_serve.cli import main\n"
            "for argv in (['--help'], ['generate', '--help'], ['serve', '--help']):\n"
            "    assert main(argv) == 0\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'httpx'}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout[-300:]


def test_config_writes_an_editable_copy_of_the_packaged_config(tmp_path, capsys):
    import yaml

    from cluster.args import AppArgs

    out = tmp_path / "mine.yaml"
    code, _, stderr = run(capsys, "config", str(out))
    assert code == 0 and str(out) in stderr
    config = yaml.safe_load(out.read_text())
    assert config["http_options"]["host"] == "127.0.0.1"  # loopback unless configured otherwise
    [app] = config["applications"]
    assert app["import_path"] == "cluster.app:build_app"
    AppArgs(**app["args"])  # every key is an AppArgs field
    code, _, stderr = run(capsys, "config", str(out))
    assert code == 2 and "--force" in stderr
    assert run(capsys, "config", str(out), "--force")[0] == 0
    code, stdout, _ = run(capsys, "config", "-")
    assert code == 0 and stdout == out.read_text()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_serve_refuses_a_public_address_without_an_api_key(capsys, monkeypatch, host):
    monkeypatch.delenv("BAGEL_API_KEY", raising=False)
    code, _, stderr = run(capsys, "serve", "--host", host)
    assert code == 2 and "refusing to listen" in stderr and "--allow-no-api-key" in stderr


def test_serve_config_file_must_exist(capsys, tmp_path):
    code, _, stderr = run(capsys, "serve", "--config", str(tmp_path / "absent.yaml"))
    assert code == 2 and "config file not found" in stderr and "bagel config" in stderr


def test_loadtest_help_is_the_load_testers_whole_description(capsys):
    assert main(["loadtest", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bagel loadtest") and "--concurrency" in out
    assert "with a configurable task mix." in out  # the first paragraph, not its first line only


def test_constraints_pin_versions_the_package_accepts():
    """constraints.txt pins Ray and torch for every node; the pins satisfy pyproject's bounds."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    pins = {Requirement(line).name: Requirement(line) for line in (REPO / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert set(pins) == {"ray", "torch"}
    declared = {r.name: r for r in map(Requirement, requires("bagel-serve")) if r.marker is None}
    for name, pin in pins.items():
        [spec] = pin.specifier
        assert spec.operator == "==" and declared[name].specifier.contains(spec.version), (pin, declared[name])
