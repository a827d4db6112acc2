"""Infrastructure every stage stands on: storage, MLflow tracking, the Ray connection, quiet output, progress, devices."""
