"""The Gradio web app behind ``app.py``: settings, predictor (models + preprocessing) and UI."""
