"""The command line (an application, like the web app): ``python -m leffa tryon|pose ...``.

It combines photo preprocessing (``preprocess``) with the model library (``leffa``), so it
lives on top of both; ``leffa/__main__.py`` only forwards ``python -m leffa`` here.
"""
