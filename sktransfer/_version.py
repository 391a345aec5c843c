"""The release of sktransfer: read by the package, by pickles' version checks and by the build."""

__version__ = "0.1.0"
