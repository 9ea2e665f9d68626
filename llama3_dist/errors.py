"""User-facing errors: the CLI prints them as one stderr line and exits non-zero."""


class UserError(Exception):
    """Something the user can fix (bad path, bad config, bad prompt); never a bug."""


class CheckpointError(UserError):
    """A checkpoint is missing, malformed or disagrees with its own metadata."""


class TokenizerError(UserError):
    """A tokenizer file is missing or unsupported."""


class ConfigError(UserError):
    """A config value or key is wrong; the message names the dotted key."""


class CollectiveError(RuntimeError):
    """A peer rank stopped answering (hung, stopped, killed, unreachable): the job cannot go on.

    Not a UserError: the CLI prints it as one line too, but exits 1, on every surviving rank.
    """
