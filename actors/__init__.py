"""The actors: executor, watcher, correlator, persistence, and the supervisor that runs them."""
