"""The runtime library shared by the model families (``leffa/`` and the ones to come): memory presets and placement
of a model's modules by the phases it declares, memory figures, speed options, and images as
tensors. It knows no model's module names; each family declares its own (``leffa.memory``).

It sits below the model libraries and above ``weightfiles`` and ``errors``, the only packages of
the project it imports. Importing it imports nothing else: each submodule is imported by name
(``runtime.presets`` stays torch-free for the command line's ``--help``).
"""
