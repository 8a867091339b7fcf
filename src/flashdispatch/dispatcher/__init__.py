"""The dispatcher: problem description, capabilities, registry, policy and selection."""
