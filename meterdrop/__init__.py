"""meterdrop: the command line that composes the file servers and the processor."""

__version__ = "0.1.0"
