"""Errors a user can fix. The CLI prints them as one line and exits 1 for a model file it cannot serve, 2 for
any other mistake (flags, usage); the server maps them to a status."""


class UserError(Exception):
    """A problem with input the user gave (a file, a flag, a field); the message names it."""


class ModelFileError(UserError):
    """A model file is missing, truncated, not a model, or describes something we do not support."""

    def __init__(self, path: object, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class AdapterError(UserError):
    """A LoRA adapter folder that cannot be used with the base model; the message names the folder and
    the problem (the server answers FAILED_PRECONDITION)."""

    def __init__(self, folder: object, problem: str):
        super().__init__(f"adapter {folder}: {problem}")
        self.folder = str(folder)
        self.problem = problem
