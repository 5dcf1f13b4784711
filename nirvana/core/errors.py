"""The exceptions a stage turns into one clean line (see `nirvana.core.stage.run_stage`). This module imports
nothing, so a module that only needs to raise or catch them pulls no other code into a stage's deps."""


class InputError(ValueError):
    """An input file or folder is missing, corrupt, or disagrees with the model or params.yaml."""


class NativeCrash(RuntimeError):
    """Native code (llama.cpp) died by a signal in a child process; the message names the file and signal."""
