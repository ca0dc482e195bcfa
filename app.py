"""Leffa web app (also the Hugging Face Space entry point).

    python app.py                 # real models, downloaded on first use into ./ckpts
    python app.py --tiny          # offline demo: tiny untrained models, stand-in preprocessing
    python app.py --memory low    # weights in CPU memory, one UNet block on the GPU at a time
    python app.py --help          # host, port, device, dtype, memory, queue size, ... (each also an env var)

On a Hugging Face Space with on-demand GPUs (ZeroGPU), the
try-on model is loaded onto the CPU at start and each generation runs inside ``spaces.GPU``.
"""

from errors import UserError
from webapp.settings import parse_args


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    if not settings.tiny:
        from engine.weights import presence_report

        print(presence_report(settings.checkpoint_dir), flush=True)
    from webapp.backend import build_engine
    from webapp.ui import create_demo, launch

    try:
        engine = build_engine(settings)
    except UserError as e:  # a setting that cannot work here, e.g. --device cuda without a GPU
        raise SystemExit(f"error: {e}") from None
    if engine.gpu is not None:  # ZeroGPU: the GPU is lent per call; models wait on the CPU
        engine.preload()
    launch(create_demo(engine), settings)


if __name__ == "__main__":
    main()
