"""The Gradio web app behind ``app.py``: settings, the engine it builds (``backend.py``) and the UI (one module per tab)."""
