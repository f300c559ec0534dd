"""loragen's model side: task encoder, T2L hypernetwork, checkpoints and PEFT adapter export.

No HTTP here: `service/` is this package's only user inside the project.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loragen")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

from pathlib import Path

# The demo bundle shipped in the repository (`loragen train demo` rebuilds it): what `loragen serve`
# serves when no checkpoint is configured.
DEMO_BUNDLE = Path(__file__).resolve().parent / "demo"
DEMO_CHECKPOINTS = {"demo": DEMO_BUNDLE / "t2l-sft", "demo-recon": DEMO_BUNDLE / "t2l-recon"}
