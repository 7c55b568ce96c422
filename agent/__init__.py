"""The agent process: config, CLI, scheduler, flow runner, retry policy, templates, logging."""
