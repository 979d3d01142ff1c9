"""Plans and schedules sweeps: Hydra config → validation → Ray Tune → MLflow parent run."""
