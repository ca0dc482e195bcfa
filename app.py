"""Leffa web app (also the Hugging Face Space entry point).

    python app.py                 # real models, downloaded on first use into ./ckpts
    python app.py --tiny          # offline demo: tiny untrained models, stand-in preprocessing
    python app.py --help          # host, port, device, dtype, queue size, ... (each also an env var)
"""

from webapp.settings import parse_args


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    if not settings.tiny:
        from weightfiles.hub import presence_report

        print(presence_report(settings.checkpoint_dir), flush=True)
    from webapp.predict import build_predictor
    from webapp.ui import create_demo, launch

    launch(create_demo(build_predictor(settings)), settings)


if __name__ == "__main__":
    main()
