"""User-facing errors: each names the offending input so the CLI can print it without a traceback."""


class FairBatchingError(Exception):
    """Base class for errors caused by user input (files, configs, SLOs), not by bugs."""


class ConfigError(FairBatchingError, ValueError):
    """An invalid setting: impossible SLO, unknown policy or profile, bad numeric range."""


class WorkloadError(FairBatchingError, ValueError):
    """A malformed workload or trace file; the message names the file and line."""


class ProfileError(FairBatchingError, ValueError):
    """A malformed or unusable cost-model profile or profile-row file."""


def install_hint(extra: str) -> str:
    """How to add an optional extra: fairbatching installs from its checkout (no registry has it), so every
    message says it the one way that works."""
    return f"pip install -e '.[{extra}]' in the fairbatching checkout"
