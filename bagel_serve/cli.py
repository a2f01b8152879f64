"""The `bagel` command line: BAGEL's tasks on this machine, one request per run.

    bagel generate "a red fox in the snow" -o fox.png
    bagel edit fox.png "make it night" -o night.png
    bagel understand --image fox.png "What animal is this?"
    bagel serve                                  # the HTTP service (the packaged Serve config)
    bagel config my.yaml                         # an editable copy of that config
    bagel plan --gpus 1 --gpu-memory 24          # which layout and weight format fit

The model comes from --checkpoint, else $BAGEL_CHECKPOINT, else the built-in demo model (tiny,
RANDOM weights: its images are noise and its text is gibberish). A bad request, input image or
checkpoint prints one `error: ...` line on stderr and exits with status 2.

Adding a subcommand is one function: `add_<name>(subparsers)` adds its parser and sets
`run=<function(args) -> exit code>` with `set_defaults`; list it in `COMMANDS`. Building the
parsers imports nothing heavy (no torch, Ray or httpx): commands import what they use when they run.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import CliError
from .plan import add_plan, quantize_arg, quantize_choices
from .serve import add_config, add_loadtest, add_serve

EXIT_OK = 0
EXIT_ERROR = 2  # bad request, input or checkpoint (argparse uses 2 for bad arguments too)
EXIT_INTERRUPTED = 130

CHECKPOINT_ENV = "BAGEL_CHECKPOINT"


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bagel",
        description="BAGEL-7B-MoT on this machine: text-to-image, image editing and image/text understanding.",
        epilog=f"The model is --checkpoint, else ${CHECKPOINT_ENV}, else the built-in demo model "
               "(RANDOM weights: outputs are noise).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS.values():
        add(subparsers)
    return parser


def add_generate(subparsers) -> None:
    from pipelines.params import ImageParams

    p = subparsers.add_parser("generate", help="text-to-image",
                              description="Generate an image from a text prompt.")
    p.add_argument("prompt", metavar="PROMPT", help="what to draw")
    _add_output(p)
    p.add_argument("--height", type=int, metavar="H",
                   help="output height in pixels, a multiple of the latent stride (default: the model's largest, "
                        "1024 for BAGEL-7B-MoT)")
    p.add_argument("--width", type=int, metavar="W",
                   help="output width in pixels (default: the model's largest)")
    _add_think(p, "plan the image in text first and print the plan")
    _add_image_knobs(p, ImageParams())
    _add_text_knobs(p, think_only=True)
    _add_common(p)
    p.set_defaults(run=run_generate)


def add_edit(subparsers) -> None:
    from pipelines.params import EDIT_DEFAULTS

    p = subparsers.add_parser("edit", help="edit an image following an instruction",
                              description="Edit IMAGE following PROMPT. The output has the input's size after the "
                                          "model's VAE resize.")
    p.add_argument("image", metavar="IMAGE", help="input image file")
    p.add_argument("prompt", metavar="PROMPT", help="the edit instruction")
    _add_output(p)
    _add_think(p, "plan the edit in text first and print the plan")
    _add_image_knobs(p, EDIT_DEFAULTS)
    _add_text_knobs(p, think_only=True)
    _add_common(p)
    p.set_defaults(run=run_edit)


def add_understand(subparsers) -> None:
    p = subparsers.add_parser("understand", help="answer a question about images and/or text",
                              description="Answer PROMPT (about the --image files, if any); the answer is streamed "
                                          "to stdout.")
    p.add_argument("--image", dest="images", action="append", default=[], metavar="IMG",
                   help="an input image file, placed before the prompt (repeat for several, in order)")
    p.add_argument("prompt", metavar="PROMPT", help="the question or instruction")
    _add_think(p, "reason in <think> ... </think> before answering (the reasoning is printed too)")
    _add_text_knobs(p, think_only=False)
    p.add_argument("--seed", type=int, help="random seed for --do-sample (default: a random one)")
    _add_common(p)
    p.set_defaults(run=run_understand)


# Subcommands in help order; each entry adds its parser to the subparsers action.
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "generate": add_generate,
    "edit": add_edit,
    "understand": add_understand,
    "serve": add_serve,
    "plan": add_plan,
    "config": add_config,
    "loadtest": add_loadtest,
}


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="where to write the image; the format follows the extension (.png, .jpg, .webp, ...)")


def _add_think(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--think", action="store_true", help=text)


def _add_image_knobs(p: argparse.ArgumentParser, base) -> None:
    """A flag for every sampler knob (pipelines/params.py), showing this task's default."""
    from typing import Literal, get_args, get_origin

    from pipelines.params import image_knobs

    g = p.add_argument_group("image knobs (official BAGEL names; defaults are this task's)")
    for knob in image_knobs():
        default = getattr(base, knob.name)
        kwargs: dict = {"metavar": knob.metavar or ("N" if knob.type is int else "X"), "type": knob.type}
        if get_origin(knob.type) is Literal:
            kwargs = {"choices": get_args(knob.type)}
        elif get_origin(knob.type) is tuple:
            kwargs.update(type=get_args(knob.type)[0], nargs=len(get_args(knob.type)))
            default = " ".join(map(str, default))
        g.add_argument(f"--{knob.name.replace('_', '-')}", help=f"{knob.help} (default: {default})", **kwargs)
    g.add_argument("--negative-prompt", metavar="TEXT",
                   help="what to steer away from: the text guidance branch's context instead of no text")
    g.add_argument("--seed", type=int, help="random seed (default: a random one, printed on stderr)")


def _add_text_knobs(p: argparse.ArgumentParser, think_only: bool) -> None:
    from pipelines.params import TextParams

    base = TextParams()
    title = "text knobs (with --think: the plan)" if think_only else "text knobs"
    g = p.add_argument_group(title)
    g.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"most tokens to generate (default: {base.max_new_tokens})")
    g.add_argument("--do-sample", action="store_true", help="sample tokens instead of greedy decoding")
    g.add_argument("--temperature", type=float, metavar="T",
                   help=f"sampling temperature with --do-sample, in [0, 10] (default: {base.temperature})")


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="DIR",
                   help=f"BAGEL checkpoint folder (default: ${CHECKPOINT_ENV}, else the built-in demo model "
                        "with RANDOM weights)")
    g.add_argument("--device", type=_device,
                   help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="weights dtype of the LLM and ViT; the VAE stays float32 (default: bfloat16 on cuda, "
                        "float32 on cpu)")
    g.add_argument("--stages", type=int, default=1, metavar="N",
                   help="split the LLM layers into N pipeline stages run one after another (default: 1)")
    g.add_argument("--quantize", choices=quantize_choices(),
                   help="weight format of the LLM's linear layers: none (default: exact), df11 (lossless, ~70%% of "
                        "the memory), int8, nf4, fp8 (APPROXIMATE; fp8 needs an Ada or newer GPU), auto (what the "
                        "memory planner picks for this device)")
    g.add_argument("--quantize-vit", action="store_true", help="also the ViT's linear layers, in the same format")


def _device(text: str):
    import torch

    try:
        return torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: {e}") from None


# --------------------------------------------------------------------------- commands


def run_generate(args: argparse.Namespace) -> int:
    from pipelines.params import ImageParams

    output = _check_output(args.output)
    params = _image_params(args, ImageParams(), height=args.height, width=args.width)
    return _run_image_task(args, [args.prompt], params, output)


def run_edit(args: argparse.Namespace) -> int:
    from pipelines.params import EDIT_DEFAULTS

    image = _open_image(args.image)
    output = _check_output(args.output)
    return _run_image_task(args, [image, args.prompt], _image_params(args, EDIT_DEFAULTS), output)


def run_understand(args: argparse.Namespace) -> int:
    from pipelines.tasks import understand

    items = [_open_image(path) for path in args.images] + [args.prompt]
    text_params = _text_params(args).validate()
    executor = load_model(args)
    understand(executor, items, text_params, think=args.think, seed=args.seed, on_text=_print_stream)
    _end_stream()
    return EXIT_OK


def _run_image_task(args: argparse.Namespace, items: list, params, output: Path) -> int:
    from pipelines.noise import NoiseSource, random_seed
    from pipelines.tasks import generate_image

    text_params = _text_params(args).validate()
    executor = load_model(args, params)
    seed = args.seed if args.seed is not None else random_seed()
    if args.seed is None:
        _info(f"seed {seed}")
    progress = _StepBar()
    try:
        result = generate_image(executor, items, params, think=args.think, text_params=text_params,
                                noise=NoiseSource(seed), negative_prompt=args.negative_prompt, on_step=progress,
                                on_text=_print_stream)
    finally:
        progress.close()
    try:
        result.image.save(output)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot write {output}: {e}") from e
    width, height = result.image.size
    _info(f"wrote {output} ({width}x{height})")
    return EXIT_OK


# --------------------------------------------------------------------------- model


def resolve_checkpoint(arg: str | None) -> tuple[Path, bool]:
    """The checkpoint folder to use and whether it is the demo model (random weights)."""
    from bagel_model.demo import demo_checkpoint_dir, is_demo_checkpoint
    from bagel_model.errors import CheckpointError

    explicit = arg or os.environ.get(CHECKPOINT_ENV)
    if not explicit:
        return demo_checkpoint_dir(), True
    path = Path(explicit).expanduser()
    if not path.is_dir():
        source = "--checkpoint" if arg else f"${CHECKPOINT_ENV}"
        raise CheckpointError(f"checkpoint folder not found: {path} (from {source})")
    return path, is_demo_checkpoint(path)


def load_model(args: argparse.Namespace, image_params=None):
    """Resolve the checkpoint, check the request against its configuration, then load it;
    returns the executor."""
    import torch

    from bagel_model.config import BagelConfig
    from bagel_model.demo import DEMO_LABEL
    from bagel_model.devices import default_device, default_dtype
    from bagel_model.errors import InvalidRequest
    from pipelines.local import LocalExecutor

    device = args.device or default_device()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {device}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    checkpoint, demo = resolve_checkpoint(args.checkpoint)
    if demo:
        _warn(f"the model is {DEMO_LABEL}. For real outputs pass --checkpoint DIR or set ${CHECKPOINT_ENV} "
              "to a BAGEL-7B-MoT folder.")
    # Cheap checks before the (possibly long) weight load.
    config = BagelConfig.from_checkpoint_dir(checkpoint)
    if image_params is not None:
        image_params.validate(config.max_image_side, config.latent_downsample)
    layers = config.llm.num_hidden_layers
    if not 1 <= args.stages <= layers:
        raise InvalidRequest(f"stages must be in [1, {layers}] (the model has {layers} layers), got {args.stages}")
    quantize, graphs = _quantize(args, config, device)
    _info(f"loading {checkpoint} on {device} ({str(dtype).removeprefix('torch.')}, "
          f"{args.stages} stage{'s' if args.stages > 1 else ''}{', weights ' + quantize if quantize else ''})")
    return LocalExecutor.from_checkpoint(checkpoint, num_stages=args.stages, device=device, dtype=dtype,
                                         quantize=quantize, quantize_vit=args.quantize_vit, graphs=graphs)


def _quantize(args: argparse.Namespace, config, device) -> tuple[str | None, bool | None]:
    """--quantize, with auto resolved by the memory planner for this one process and device,
    and whether to capture CUDA graphs (False where the plan says they would not fit; None:
    the executor's default)."""
    import torch

    from bagel_model.errors import InvalidRequest
    from bagel_model.memory_plan import plan_memory

    quantize = quantize_arg(args.quantize)
    if device.type != "cuda":
        return (None if quantize == "auto" else quantize), None
    try:
        plan = plan_memory(config, 1, torch.cuda.get_device_properties(device).total_memory, num_stages=args.stages,
                           quantize=quantize, quantize_vit=args.quantize_vit, processes="local")
    except InvalidRequest:
        if quantize == "auto":
            raise
        return quantize, None  # a format set by hand runs as asked
    _info(plan.describe())
    return plan.quantize, plan.graphs


# --------------------------------------------------------------------------- helpers


def _image_params(args: argparse.Namespace, base, **extra):
    from pipelines.params import image_knobs, with_overrides

    overrides = {k.name: getattr(args, k.name) for k in image_knobs() if getattr(args, k.name) is not None}
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return with_overrides(base, overrides)


def _text_params(args: argparse.Namespace):
    from pipelines.params import TextParams, with_overrides

    overrides = {"do_sample": args.do_sample}
    if args.max_new_tokens is not None:
        overrides["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        overrides["temperature"] = args.temperature
    return with_overrides(TextParams(), overrides)


def _open_image(path: str):
    from bagel_model.transforms import InvalidImage, open_image

    if not os.path.exists(path):
        raise CliError(f"input image not found: {path}")
    if os.path.isdir(path):
        raise CliError(f"input image is a folder: {path}")
    try:
        return open_image(path)
    except OSError as e:
        raise CliError(f"cannot read input image {path}: {e.strerror or e}") from e
    except InvalidImage as e:  # not an image, truncated, or too large
        raise InvalidImage(f"input image {path}: {e}") from e


def _check_output(path: str) -> Path:
    from PIL import Image

    out = Path(path).expanduser()
    if out.suffix.lower() not in Image.registered_extensions():
        raise CliError(f"output {path}: unknown image extension {out.suffix!r} (use .png, .jpg, .webp, ...)")
    if not out.parent.is_dir():
        raise CliError(f"output folder does not exist: {out.parent}")
    if out.is_dir():
        raise CliError(f"output is a folder: {out}")
    return out


_stream_open = False


def _print_stream(delta: str) -> None:
    global _stream_open
    _stream_open = True
    sys.stdout.write(delta)
    sys.stdout.flush()


def _end_stream() -> None:
    """End streamed text with a newline (also when nothing was streamed)."""
    global _stream_open
    _stream_open = False
    sys.stdout.write("\n")
    sys.stdout.flush()


class _StepBar:
    """A tqdm bar over denoising steps on stderr, opened at the first step (after any thought)."""

    def __init__(self):
        self.bar = None

    def __call__(self, progress) -> None:
        if self.bar is None:
            from tqdm import tqdm

            if _stream_open:
                _end_stream()
            self.bar = tqdm(total=progress.num_steps, desc="denoising", unit="step", file=sys.stderr,
                            dynamic_ncols=True)
        self.bar.update(progress.step - self.bar.n)

    def close(self) -> None:
        if _stream_open:
            _end_stream()
        if self.bar is not None:
            self.bar.close()


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run the `bagel` command line; returns the exit status."""
    global _stream_open
    _stream_open = False
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument (argparse printed why)
        return e.code if isinstance(e.code, int) else EXIT_ERROR

    from bagel_model.errors import BagelError

    try:
        return args.run(args)
    except (BagelError, CliError) as e:
        if _stream_open:
            _end_stream()
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if _stream_open:
            _end_stream()
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
