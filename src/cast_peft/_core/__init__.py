"""What every stage shares: the exceptions and warnings, atomic file I/O and hashing, peft/bitsandbytes shims."""
