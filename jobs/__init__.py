"""llmbatch job domain: settings, models, input parsing, service, export, CLI."""
