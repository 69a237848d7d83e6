"""What every stage shares: the exceptions and warnings, atomic file I/O and hashing, peft/bitsandbytes shims.

`_core` imports nothing from the rest of the package, so any stage may import it.
"""

__version__ = "0.1.0"
