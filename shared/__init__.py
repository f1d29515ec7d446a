"""Common code imported by every role: records, config, crypto, policy, audit log, CLI."""
