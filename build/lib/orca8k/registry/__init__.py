"""The model registry's logic, free of MLflow: lineage tags, the promotion gate, the model card and generation
config, and the side-by-side sampling report. `orca8k.stages.register` wires them to MLflow through
`orca8k.tracking` (the only module that imports mlflow)."""
