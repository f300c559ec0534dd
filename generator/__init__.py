"""loragen's model side: task encoder, T2L hypernetwork, checkpoints and PEFT adapter export.

No HTTP here: `service/` is this package's only user inside the project.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loragen")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
