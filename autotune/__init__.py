"""``ubpdsl.autotune``: ``ubpdsl tune``, the search space, persistent Optuna studies (SQLite or
PostgreSQL), the timing worker (local or over ssh), llvm-mca estimates and the tuned-config cache."""
