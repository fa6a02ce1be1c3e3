"""Checkpoint admin endpoints and the version manager behind them and the registry watcher."""
