"""vm0fs: vm0 artifacts as a read-only FUSE filesystem."""

__version__ = "0.1.0"
