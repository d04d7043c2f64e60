"""Real pcsc-lite of other versions (Debian chroots) for cross-version tests."""
