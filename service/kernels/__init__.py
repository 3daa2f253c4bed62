"""Native kernels (C sources in _native/, built by setup.py) and their Python faces."""
