"""Weight files, the bottom layer: finding them (local folder or the Hub, ``hub.py``) and reading
and strictly checking state dicts (``checkpoint.py``). Imports neither ``leffa`` nor
``preprocess``; both use it."""
