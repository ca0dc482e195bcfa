"""The engine: the one service layer under the app, the command line and ``leffa infer``.

``registry`` (torch-free) lists the models; ``options`` checks the generation options; ``weights``
fetches and reports the files a request needs; ``inputs`` turns photos into model inputs;
``setup`` resolves the device, dtype, memory preset and speed options; ``cache`` keeps loaded
models under a memory budget; ``service.Engine`` runs a request with progress and stop;
``zerogpu`` runs it on a Space's on-demand GPU; ``adapters/`` hold one adapter per model family.
Importing this package imports none of them.
"""
